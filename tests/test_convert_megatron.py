"""tools/checkpoint/convert_megatron.py: legacy Megatron-LM / EE-LLM checkpoints -> ours.

The legacy files are written here by hand from a random model of ours, with the key names
and TP/PP sharding of Megatron-LM's and EE-LLM's `state_dict_for_save_checkpoint` (facts
written out below, independently of the converter's key map); the converted checkpoint must
give the same logits, final and per exit."""

import argparse
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

TP, PP, LAYERS = 2, 2, 4
PER_STAGE = LAYERS // PP


# -- a random model of ours ------------------------------------------------------------------


def reference_model(**overrides):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.builder import build_model
    from megatron.early_exit.models.model_config import ModelConfig, TokenizerConfig

    exits = overrides.pop("exits")
    shape = dict(
        num_layers=LAYERS,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=64,
        max_position_embeddings=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        make_vocab_size_divisible_by=32,
        tokenizer=TokenizerConfig("NullTokenizer", vocab_size=60),
        early_exit=EarlyExitConfig(**exits),
    )
    config = ModelConfig(**{**shape, **overrides})
    model = build_model(config, torch.device("cpu"), seed=7).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms start at ones and biases at zero: make every tensor tell
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return model, config


def legacy_args(config, **extra):
    """The Namespace Megatron-LM stores as `args` (its flag names)."""
    from megatron.core.enums import ModelType

    ee = config.early_exit
    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        kv_channels=config.hidden_size // config.num_attention_heads,
        group_query_attention=config.num_query_groups is not None,
        num_query_groups=config.num_query_groups,
        max_position_embeddings=16,
        seq_length=16,
        normalization=config.normalization,
        norm_epsilon=1e-5,
        swiglu=config.swiglu,
        add_bias_linear=not config.disable_bias_linear,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=1.0,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        make_vocab_size_divisible_by=32,
        padded_vocab_size=64,
        tokenizer_type="NullTokenizer",
        vocab_size=60,
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
        virtual_pipeline_model_parallel_size=None,
        exit_layer_nums=list(ee.exit_layer_nums),
        exit_layer_weight=list(ee.exit_layer_weight),
        exit_layer_temperature=list(ee.exit_layer_temperature),
        use_exit_norm=ee.use_exit_norm,
        use_exit_mlp=ee.use_exit_mlp,
        use_exit_block=ee.use_exit_block,
        untie_exit_output_weights=ee.untie_exit_output_weights,
        pre_exit=ee.pre_exit,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder,
        seed=1234,
        **extra,
    )


# -- the legacy layout, by hand ----------------------------------------------------------------
# ColumnParallelLinear and VocabParallelEmbedding: rank t holds rows t*n/TP..; RowParallelLinear:
# columns (its bias whole on every rank); norms and position embeddings whole on every rank.
# SwiGLU's dense_h_to_4h: rank t holds its share of the gate rows, then its share of the up rows.
# query_key_value (checkpoint_version 2 and 3): [groups, heads per group + 2, head dim] rows on
# each rank, as megatron-core's linear_qkv; version 0: [3, heads, head dim] on each rank.


def rows(t, tensor):
    return tensor.chunk(TP, dim=0)[t].clone()


def cols(t, tensor):
    return tensor.chunk(TP, dim=1)[t].clone()


def fc1_shard(t, tensor, swiglu):
    if not swiglu:
        return rows(t, tensor)
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([rows(t, gate), rows(t, up)])


def qkv_shard(t, tensor, version, heads, head_dim):
    shard = rows(t, tensor)
    if version >= 2:
        return shard
    local = heads // TP  # [heads, 3, head dim] -> [3, heads, head dim]
    return shard.view(local, 3, head_dim, *shard.shape[1:]).transpose(0, 1).reshape(shard.shape)


def layer_tensors(t, ref, ours, legacy, config, version, norms=("input_norm", "post_attention_norm")):
    """One transformer layer's legacy tensors (prefix `legacy`) from ours (prefix `ours`)."""
    out = {}
    for kind in ("weight", "bias"):
        if f"{ours}.input_layernorm.{kind}" in ref:
            out[f"{legacy}.{norms[0]}.{kind}"] = ref[f"{ours}.input_layernorm.{kind}"]
            out[f"{legacy}.{norms[1]}.{kind}"] = ref[f"{ours}.pre_mlp_layernorm.{kind}"]
        qkv = f"{ours}.self_attention.linear_qkv.{kind}"
        if qkv in ref:
            out[f"{legacy}.self_attention.query_key_value.{kind}"] = qkv_shard(
                t, ref[qkv], version, config.num_attention_heads, config.hidden_size // config.num_attention_heads
            )
        proj = ref.get(f"{ours}.self_attention.linear_proj.{kind}")
        if proj is not None:
            out[f"{legacy}.self_attention.dense.{kind}"] = cols(t, proj) if kind == "weight" else proj
    out.update(mlp_tensors(t, ref, f"{ours}.mlp", f"{legacy}.mlp", config.swiglu))
    return out


def mlp_tensors(t, ref, ours, legacy, swiglu):
    out = {}
    for kind in ("weight", "bias"):
        if f"{ours}.linear_fc1.{kind}" in ref:
            out[f"{legacy}.dense_h_to_4h.{kind}"] = fc1_shard(t, ref[f"{ours}.linear_fc1.{kind}"], swiglu)
            fc2 = ref[f"{ours}.linear_fc2.{kind}"]
            out[f"{legacy}.dense_4h_to_h.{kind}"] = cols(t, fc2) if kind == "weight" else fc2
    return out


def ee_llm_stage(t, p, ref, config, version):
    """EE-LLM's `model` dict of TP rank t, pipeline stage p (EarlyExitGPTModel)."""
    ee = config.early_exit
    encoder, lm, stage_exits = {}, {}, []
    for j in range(PER_STAGE):
        layer = p * PER_STAGE + j  # 0-based global; layers are renumbered from 0 on each stage
        number, local = layer + 1, f"layers.{j}"
        encoder.update(layer_tensors(t, ref, f"decoder.layers.{layer}", local, config, version))
        if number not in ee.exit_layer_nums:
            continue
        stage_exits.append(number)
        if ee.use_exit_mlp:  # ExitMLP: the layer's MLP is `trunk`, the exit's `branch`
            for key in [k for k in encoder if k.startswith(f"{local}.mlp.")]:
                encoder[key.replace(".mlp.", ".mlp.trunk.")] = encoder.pop(key)
            encoder.update(mlp_tensors(t, ref, f"exits.{number}.mlp", f"{local}.mlp.branch", config.swiglu))
        if ee.use_exit_norm:
            for kind in ("weight", "bias"):
                if f"exits.{number}.norm.{kind}" in ref:
                    encoder[f"{local}.exit_norm.{kind}"] = ref[f"exits.{number}.norm.{kind}"]
        if ee.use_exit_block:
            encoder.update(layer_tensors(t, ref, f"exits.{number}.block", f"{local}.exit_block", config, version))
    if p == 0:
        lm["embedding"] = {"word_embeddings": {"weight": rows(t, ref["embedding.word_embeddings.weight"])}}
        if "embedding.position_embeddings.weight" in ref:
            lm["embedding"]["position_embeddings"] = {"weight": ref["embedding.position_embeddings.weight"]}
    if p == PP - 1:
        for kind in ("weight", "bias"):
            if f"decoder.final_layernorm.{kind}" in ref:
                encoder[f"final_norm.{kind}"] = ref[f"decoder.final_layernorm.{kind}"]
        if config.untie_embeddings_and_output_weights:
            lm["output_layer"] = {"weight": rows(t, ref["output_layer.weight"])}
    if ee.untie_exit_output_weights and stage_exits:  # a ModuleList of this stage's exits
        lm["exit_output_layer"] = {
            f"{k}.weight": rows(t, ref[f"exits.{n}.output_layer.weight"]) for k, n in enumerate(stage_exits)
        }
    lm["encoder"] = encoder
    model = {"language_model": lm}
    tied = not config.untie_embeddings_and_output_weights
    if p > 0 and (p == PP - 1 or stage_exits) and tied:  # the copy of the tied word embedding
        model["word_embeddings_for_head"] = {"weight": rows(t, ref["embedding.word_embeddings.weight"])}
    return model


def write_legacy(
    root,
    ref,
    config,
    version=3.0,
    iteration=20,
    args_extra=None,
    args_drop=(),
    stage=ee_llm_stage,
    pp=PP,
    saved_stages=None,
):
    """DIR/latest_checkpointed_iteration.txt and DIR/iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt
    (of the first `saved_stages` pipeline stages; default all)."""
    args = legacy_args(config, **(args_extra or {}))
    args.pipeline_model_parallel_size = pp
    for name in args_drop:
        delattr(args, name)
    for t in range(TP):
        for p in range(saved_stages or pp):
            rank_dir = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            path = os.path.join(root, f"iter_{iteration:07d}", rank_dir, "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path))
            rng = {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
            }
            torch.save(
                {
                    "args": args,
                    "checkpoint_version": version,
                    "iteration": iteration,
                    "model": stage(t, p, ref, config, version),
                    "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
                    "rng_state": [rng],
                },
                path,
            )
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


# -- checks -------------------------------------------------------------------------------------


def all_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        out = model(tokens, positions, None)
        return {"final": out.final, **{f"exit {e.layer_number}": e.compute_logits() for e in out.exits}}


def convert(load, save):
    from megatron.early_exit.legacy import convert_legacy

    return convert_legacy(str(load), str(save), progress=False)


def assert_same_model(save, ref_model, config):
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    model, _, stored = load_model(str(save), 1, device=torch.device("cpu"))
    assert stored.early_exit == config.early_exit and stored.num_layers == LAYERS
    converted, expected = full_state_dict(model), full_state_dict(ref_model)
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    tokens = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, ref = all_logits(model, tokens), all_logits(ref_model, tokens)
    assert sorted(ours) == ["exit " + str(n) for n in config.exit_layer_nums] + ["final"]
    for name in ref:
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-5, name


CASES = {
    # SwiGLU, RMSNorm, RoPE, grouped-query attention, no biases, untied embeddings; exits with
    # their own norm and MLP and untied output layers, two of them on stage 0 (exit_output_layer.0, .1)
    "mlp_exits_untied": dict(
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=True,
        position_embedding_type="rope",
        num_query_groups=2,
        untie_embeddings_and_output_weights=True,
        exits=dict(
            exit_layer_nums=[1, 2, 3],
            use_exit_norm=True,
            use_exit_mlp=True,
            untie_exit_output_weights=True,
            exit_layer_weight=[0.2, 0.3, 0.4],
            exit_layer_temperature=[1.0, 2.0, 0.5],
        ),
    ),
    # GeLU, LayerNorm with biases, learned positions, tied embeddings; pre-exits with a norm and
    # a block, their output layers tied to the word embedding (word_embeddings_for_head on stage 1)
    "block_exits_tied": dict(
        normalization="LayerNorm",
        position_embedding_type="learned_absolute",
        exits=dict(exit_layer_nums=[2, 3], use_exit_norm=True, use_exit_block=True, pre_exit=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ee_llm_tp2_pp2_converts_to_the_same_logits(dist1, tmp_path, case):
    model, config = reference_model(**CASES[case])
    ref = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    write_legacy(tmp_path / "legacy", ref, config)
    result = convert(tmp_path / "legacy", tmp_path / "ours")
    assert result.source_layout == (TP, PP) and result.iteration == 20
    assert_same_model(tmp_path / "ours", model, config)


def megatron_lm_stage(t, p, ref, config, version):
    """Megatron-LM before its 2023 rename (GPTModel, checkpoint_version 0): *_layernorm names,
    the encoder under `transformer`, [3, heads, head dim] query_key_value rows."""
    encoder = {}
    for layer in range(LAYERS):
        encoder.update(
            layer_tensors(
                t,
                ref,
                f"decoder.layers.{layer}",
                f"layers.{layer}",
                config,
                version,
                norms=("input_layernorm", "post_attention_layernorm"),
            )
        )
    encoder.update({f"final_layernorm.{k}": ref[f"decoder.final_layernorm.{k}"] for k in ("weight", "bias")})
    embedding = {
        "word_embeddings": {"weight": rows(t, ref["embedding.word_embeddings.weight"])},
        "position_embeddings": {"weight": ref["embedding.position_embeddings.weight"]},
    }
    return {"language_model": {"embedding": embedding, "transformer": encoder}}


def test_megatron_lm_version_0_tp2_without_exits(dist1, tmp_path):
    model, config = reference_model(normalization="LayerNorm", position_embedding_type="learned_absolute", exits={})
    ref = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    # Its args predate --normalization, --norm-epsilon and --position-embedding-type.
    write_legacy(
        tmp_path / "legacy",
        ref,
        config,
        version=0,
        stage=megatron_lm_stage,
        pp=1,
        args_extra={"layernorm_epsilon": 1e-5, "use_rotary_position_embeddings": False},
        args_drop=("normalization", "norm_epsilon", "position_embedding_type"),
    )
    os.rename(tmp_path / "legacy" / "iter_0000020", tmp_path / "legacy" / "release")
    (tmp_path / "legacy" / "latest_checkpointed_iteration.txt").write_text("release")
    result = convert(tmp_path / "legacy", tmp_path / "ours")
    assert result.source_layout == (TP, 1) and result.iteration == "release"
    assert_same_model(tmp_path / "ours", model, config)


def test_ee_llm_exits_tuned_on_the_first_stage_merge_onto_the_converted_model(dist1, tmp_path):
    from megatron.early_exit.hf.add_exits import add_exits
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    model, config = reference_model(
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=True,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
        exits=dict(exit_layer_nums=[1, 2], use_exit_norm=True, untie_exit_output_weights=True),
    )
    ref = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    write_legacy(tmp_path / "legacy", ref, config)
    convert(tmp_path / "legacy", tmp_path / "ours")
    # EE-LLM's --tune-exit --tune-exit-pipeline-parallel-size 1 of PP=2 saves stage 0 only.
    tuned = {k: v + 1.0 if k.startswith("exits.") else v for k, v in ref.items()}
    write_legacy(
        tmp_path / "legacy-tuned",
        tuned,
        config,
        saved_stages=1,
        args_extra={"tune_exit": True, "tune_exit_pipeline_parallel_size": 1},
    )
    result = convert(tmp_path / "legacy-tuned", tmp_path / "ours-tuned")
    assert result.source_layout == (TP, 1)
    assert (result.config.num_layers, result.config.first_stages_only) == (PER_STAGE, True)

    add_exits(str(tmp_path / "ours"), str(tmp_path / "merged"), exits_from=str(tmp_path / "ours-tuned"))
    merged = full_state_dict(load_model(str(tmp_path / "merged"), 1, device=torch.device("cpu"))[0])
    assert sorted(merged) == sorted(tuned)
    assert all(torch.equal(merged[k], tuned[k]) for k in tuned)


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"squared_relu": True}, r"args.squared_relu=True \(squared ReLU\) is not supported"),
        (
            {"virtual_pipeline_model_parallel_size": 2},
            r"args.virtual_pipeline_model_parallel_size=2 \(the interleaved pipeline",
        ),
        ({"normalization": "LayerNorm1P"}, r"args.normalization='LayerNorm1P' is not supported"),
        (
            {"tokenizer_type": "BertWordPieceLowerCase"},
            r"args.tokenizer_type 'BertWordPieceLowerCase' is not one of ours",
        ),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/trained/here/gpt2-vocab.json"},
            r"the tokenizer file /trained/here/gpt2-vocab.json stored in args does not exist here: give --vocab-file",
        ),
    ],
)
def test_settings_we_do_not_build_are_named(dist1, tmp_path, setting, message):
    from megatron.early_exit.hf.errors import ConversionError

    model, config = reference_model(exits={})
    ref = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    write_legacy(tmp_path / "legacy", ref, config)
    path = tmp_path / "legacy" / "iter_0000020" / "mp_rank_00_000" / "model_optim_rng.pt"  # the one args are read from
    state = torch.load(path, weights_only=False)  # written above
    vars(state["args"]).update(setting)
    torch.save(state, path)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "legacy", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


class RunsCode:
    """What a malicious checkpoint would hold: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(dist1, tmp_path):
    from megatron.early_exit.checkpoint.errors import UnsafeCheckpointError

    model, config = reference_model(exits=dict(exit_layer_nums=[1], use_exit_norm=True))
    ref = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    marker = tmp_path / "pwned"
    write_legacy(tmp_path / "legacy", ref, config, args_extra={"hook": RunsCode(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"refuses to load posix\.system") as err:
        convert(tmp_path / "legacy", tmp_path / "ours")
    assert "\n" not in str(err.value) and "mp_rank_00_000" in str(err.value)
    assert not marker.exists() and not (tmp_path / "ours").exists()

    # The tool says it in one line naming the file, and runs nothing either.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore"  # this process's group
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "checkpoint", "convert_megatron.py"),
            "--load",
            str(tmp_path / "legacy"),
            "--save",
            str(tmp_path / "ours"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1 and not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    source = tmp_path / "legacy" / "iter_0000020" / "mp_rank_00_000" / "model_optim_rng.pt"
    assert last.endswith(
        f"error: checkpoint file {source}: refuses to load posix.system "
        "(a checkpoint never holds it; it could run code)"
    )
    assert "Traceback" not in proc.stderr
