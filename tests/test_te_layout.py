"""Transformer Engine's module layout, through the CPU stand-in (`te_standin`), against the local spec.

The stand-in has TE's layout (norms as IdentityOp, the norm fused into the next linear,
`_extra_state` on core attention) and must compute exactly what the local spec computes
with the same weights. Checkpoints, Hugging Face exports and decoding must not depend on
the layout. Models have their norms drawn away from 1, so that an exit applying a norm
of its own instead of its layer's shows in the logits.

The choice of layout and of the CPU adapter follows the target device, not the host:
checked in a child process that pretends CUDA is present (and TE imports).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig
from tests.conftest import ROOT
from tests.helpers import (
    HEADS,
    build_ee_gpt,
    ee_loss_and_grads,
    local_names,
    make_batch,
    spread_vectors,
    te_names,
    tiny_transformer_config,
)
from tests.training_fixtures import VOCAB, tiny_run_flags

NORMS = {"rms": dict(normalization="RMSNorm"), "layernorm_bias": dict(normalization="LayerNorm", add_bias_linear=True)}


def build_pair(ee_config, tied=True, seq_length=16, **config):
    """(local model, stand-in model) with the same weights."""
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict

    torch.manual_seed(0)
    local = build_ee_gpt(
        tiny_transformer_config(transformer_impl="local", **config), ee_config, seq_length=seq_length, tied=tied
    )
    spread_vectors(local)
    standin = build_ee_gpt(
        tiny_transformer_config(transformer_impl="te_standin", **config), ee_config, seq_length=seq_length, tied=tied
    )
    load_full_state_dict(standin, te_names(full_state_dict(local)))
    return local, standin


def checkpoint_keys(model) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron.early_exit.checkpoint.reader import model_sharded_state

    return {
        v.key: (tuple(v.global_shape), str(v.dtype)) if isinstance(v, ShardedTensor) else type(v).__name__
        for v in model_sharded_state(model).values()
    }


# -- the stand-in's layout ------------------------------------------------------------------------


@pytest.mark.parametrize("norm", list(NORMS))
def test_standin_has_transformer_engines_module_layout(dist1, norm):
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron.early_exit.models.te_layout import ExtraStateDotProductAttention, LayerNormColumnParallelLinear

    _, model = build_pair(EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True), **NORMS[norm])
    assert model.transformer_impl == "te_standin"
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, IdentityOp) and isinstance(layer.pre_mlp_layernorm, IdentityOp)
    for linear in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
        assert isinstance(linear, LayerNormColumnParallelLinear)
        names = [n for n, _ in linear.named_parameters()]
        assert names[0] == "layer_norm_weight" and ("layer_norm_bias" in names) == (norm == "layernorm_bias")
        assert all(hasattr(p, "sequence_parallel") for n, p in linear.named_parameters() if n.startswith("layer_norm"))
    assert isinstance(layer.self_attention.core_attention, ExtraStateDotProductAttention)
    key = "decoder.layers.0.self_attention.core_attention._extra_state"
    assert key in model.state_dict() and key not in model.sharded_state_dict()  # as TE's attention
    assert not [n for n, _ in model.exits["2"].named_parameters() if "norm" in n]  # the exit MLP owns no norm


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("head", list(HEADS))
def test_same_weights_give_identical_logits_losses_and_grads(dist1, head, norm):
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3], exit_layer_weight=[0.3, 0.7], **HEADS[head])
    local, standin = build_pair(ee_config, num_query_groups=2, **NORMS[norm])
    tokens, labels, pos = make_batch(seed=4)
    with torch.no_grad():
        a, b = local(tokens, pos, None), standin(tokens, pos, None)
        assert torch.equal(a.final, b.final)
        assert [e.layer_number for e in a.exits] == [e.layer_number for e in b.exits] == [1, 3]
        for x, y in zip(a.exits, b.exits):
            assert torch.equal(x.compute_logits(), y.compute_logits()), x.layer_number
    loss_a, grads_a, report_a = ee_loss_and_grads(local, ee_config, (tokens, labels, pos))
    loss_b, grads_b, report_b = ee_loss_and_grads(standin, ee_config, (tokens, labels, pos))
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(report_a.exit_losses[n], report_b.exit_losses[n]) for n in (1, 3))
    grads_b = local_names(grads_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("head", list(HEADS))
def test_checkpoint_keys_and_shapes_do_not_depend_on_the_layout(dist1, head, norm):
    local, standin = build_pair(EarlyExitConfig(exit_layer_nums=[1, 3], **HEADS[head]), **NORMS[norm])
    keys = checkpoint_keys(local)
    assert keys == checkpoint_keys(standin)
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # the layers' norms under TE's names
    assert not [k for k in keys if k.startswith(("exits.1.mlp.", "exits.3.mlp.")) and "layer_norm" in k]


def test_exit_mlp_reads_its_layers_pre_mlp_norm(dist1):
    """Changing the layer's (fused) pre-MLP norm changes the exit MLP's logits."""
    _, model = build_pair(EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True, untie_exit_output_weights=True))
    tokens, _, pos = make_batch()
    with torch.no_grad():
        before = model(tokens, pos, None).exits[0].compute_logits()
        model.decoder.layers[1].mlp.linear_fc1.layer_norm_weight.mul_(2.0)
        assert (model(tokens, pos, None).exits[0].compute_logits() - before).abs().max() > 0.05 * before.abs().max()


# -- checkpoints across layouts ---------------------------------------------------------------------

STRUCTURES = {
    "mlp_untied": {"--use-exit-mlp": None, "--untie-exit-output-weights": None},
    "block_norm_pre": {"--use-exit-block": None, "--pre-exit": None},
}


def _args(impl, structure, **extra):
    from megatron.early_exit.training.arguments import parse_args

    flags = {
        "--mock-data": None,
        "--tokenizer-type": False,
        "--vocab-size": VOCAB,
        "--transformer-impl": impl,
        "--normalization": "LayerNorm",
        "--disable-bias-linear": False,
        **STRUCTURES[structure],
        **extra,
    }
    return parse_args(tiny_run_flags(None, iters=4, **flags), world_size=1)


def _all_logits(model, tokens, pos):
    with torch.no_grad():
        out = model(tokens, pos, None)
        return [out.final] + [e.compute_logits() for e in out.exits]


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("saved,loaded", [("local", "te_standin"), ("te_standin", "local")])
def test_checkpoint_saved_in_one_layout_loads_in_the_other(dist1, tmp_path, structure, saved, loaded):
    from megatron.early_exit.checkpoint.reader import load_weights
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.training.arguments import build_run_config
    from megatron.early_exit.training.trainer import build_model

    args = _args(saved, structure)
    model = build_model(build_run_config(args), torch.device("cpu"), VOCAB)
    spread_vectors(model)
    save_weights(str(tmp_path), vars(args), model)
    back, _, _ = load_model(str(tmp_path), transformer_impl=loaded)
    assert back.transformer_impl == loaded
    tokens, _, pos = make_batch(vocab=VOCAB)
    for want, got in zip(_all_logits(model.eval(), tokens, pos), _all_logits(back, tokens, pos)):
        assert torch.equal(want, got)
    # A model with an exit the checkpoint lacks reads the rest (exit 3 keeps its initialisation).
    wider = build_model(
        build_run_config(_args(loaded, structure, **{"--exit-layer-nums": "1 2 3", "--exit-layer-weight": False})),
        torch.device("cpu"),
        VOCAB,
    )
    load_weights(str(tmp_path / "iter_0000000"), wider, skip_exits=(3,))
    assert torch.equal(_all_logits(wider.eval(), tokens, pos)[0], _all_logits(back, tokens, pos)[0])


def test_torch_checkpoint_exception_becomes_one_line(dist1, tmp_path, monkeypatch):
    """torch's CheckpointException is a BaseException with a multi-rank traceback as text."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.early_exit.checkpoint import reader
    from megatron.early_exit.checkpoint.errors import CheckpointError

    def fail(*args, **kwargs):
        cause = RuntimeError("Missing key in checkpoint state_dict: x/shard_0_1.")
        raise CheckpointException(
            "CheckpointException ranks:dict_keys([0])\nTraceback ...", {0: (cause, traceback.StackSummary())}
        )

    monkeypatch.setattr(reader.dist_checkpointing, "load", fail)
    with pytest.raises(CheckpointError) as err:
        reader.load_weights(str(tmp_path), build_ee_gpt(tiny_transformer_config(), EarlyExitConfig()))
    assert str(err.value) == f"--load {tmp_path}: RuntimeError: Missing key in checkpoint state_dict: x/shard_0_1."


def test_tensor_missing_from_checkpoint_is_named(dist1, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.reader import load_weights
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import build_run_config
    from megatron.early_exit.training.trainer import build_model

    args = _args("local", "mlp_untied", **{"--use-exit-norm": False})
    save_weights(str(tmp_path), vars(args), build_model(build_run_config(args), torch.device("cpu"), VOCAB))
    with_norm = build_model(build_run_config(_args("te_standin", "mlp_untied")), torch.device("cpu"), VOCAB)
    with pytest.raises(CheckpointError, match=r"the checkpoint has no exits\.1\.norm\.bias, exits\.1\.norm\.weight"):
        load_weights(str(tmp_path / "iter_0000000"), with_norm)


# -- training, Hugging Face, decoding ---------------------------------------------------------------


def test_training_losses_equal_between_layouts(dist1, corpus):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    histories = {}
    for impl in ("local", "te_standin"):
        flags = {"--transformer-impl": impl, "--use-exit-mlp": None, "--eval-iters": 0, "--normalization": "LayerNorm"}
        histories[impl] = pretrain(parse_run_config(tiny_run_flags(corpus, iters=4, **flags), world_size=1)).history
    local, standin = histories["local"], histories["te_standin"]
    assert len(local) == len(standin) == 4
    for step, (a, b) in enumerate(zip(local, standin)):
        for key in [k for k in a if k == "lm loss" or k.startswith("early loss")]:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (step, key, a[key], b[key])
    assert local[-1]["lm loss"] < local[0]["lm loss"]


@pytest.mark.parametrize("exported,imported", [("te_standin", "local"), ("local", "te_standin")])
def test_hugging_face_round_trip_across_layouts(dist1, tmp_path, exported, imported):
    from megatron.early_exit.hf.add_exits import add_exits
    from megatron.early_exit.hf.convert import export_llama, import_llama
    from megatron.early_exit.inference.loading import load_model
    from tests.hf_fixtures import batch, save_random_llama

    save_random_llama(tmp_path / "hf", seed=5, num_key_value_heads=2)
    import_llama(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    add_exits(
        str(tmp_path / "ours"),
        str(tmp_path / "ee"),
        {"exit_layer_nums": [1, 3], "use_exit_mlp": True, "use_exit_norm": True, "untie_exit_output_weights": True},
        copy_init=False,
    )
    export_llama(str(tmp_path / "ee"), str(tmp_path / "exported"), progress=False, transformer_impl=exported)
    import_llama(str(tmp_path / "exported"), str(tmp_path / "back"), progress=False, transformer_impl=imported)
    source = load_model(str(tmp_path / "ee"), transformer_impl=exported)[0]
    back = load_model(str(tmp_path / "back"), transformer_impl=imported)[0]
    tokens, pos = batch()
    for want, got in zip(_all_logits(source, tokens, pos), _all_logits(back, tokens, pos)):
        assert torch.equal(want, got)


def _inference_pair(variant):
    """test_inference's model (wide weights, GQA, untied output), norms spread, in both layouts."""
    from tests.inference_models import NUM_LAYERS, VARIANTS

    nums, flags = VARIANTS[variant]
    config = dict(num_layers=NUM_LAYERS, num_query_groups=2, init_method_std=0.3)
    local, standin = build_pair(EarlyExitConfig(exit_layer_nums=nums, **flags), tied=False, seq_length=64, **config)
    return local.eval(), standin.eval()


DECODING = [  # variant, strategy
    ("tied_norm", ("full",)),
    ("untied_mlp", ("early_exit", 0.15, "max_prob", "recompute")),
    ("untied_mlp", ("early_exit", 0.15, "max_prob", "propagate")),
    ("untied_mlp", ("early_exit", 0.15, "max_prob", "pipeline")),  # pipeline.py's stage decoder, one stage
    ("tied_norm", ("early_exit", 0.35, "max_prob", "recompute")),
    ("pre_exit", ("early_exit", 0.2, "margin", "propagate")),
    ("untied_mlp", ("self_speculative", 3, 3)),
    ("tied_norm", ("self_speculative", 3, 2)),
]


@pytest.mark.parametrize("variant,strategy", DECODING, ids=[f"{v}-{'-'.join(map(str, s))}" for v, s in DECODING])
def test_decoding_gives_the_same_tokens_in_both_layouts(dist1, variant, strategy):
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from tests.inference_models import NUM_LAYERS, PROMPTS

    kind, *params = strategy
    chosen = {"full": FullDepth, "early_exit": EarlyExit, "self_speculative": SelfSpeculative}[kind](*params)
    results = [generate(model, PROMPTS, chosen, max_new_tokens=16) for model in _inference_pair(variant)]
    local, standin = results
    assert standin.tokens == local.tokens
    assert standin.exit_layers == local.exit_layers
    assert max(abs(a - b) for r, s in zip(local.logprobs, standin.logprobs) for a, b in zip(r, s)) < 1e-5
    if kind == "early_exit":  # the threshold gives a mix of exits, so the exit heads were used
        assert min(d for row in local.exit_layers for d in row[1:]) < NUM_LAYERS
    if kind == "self_speculative":  # drafts were both accepted and rejected
        assert 0 < local.num_accepted < local.num_drafted and standin.num_accepted == local.num_accepted


# -- the target device decides, not the host (CUDA faked in a child process) ------------------------

_FAKED_CUDA = r"""
import json, os, sys, tempfile
sys.path.insert(0, os.environ["ROOT"])
import torch
torch.cuda.is_available = lambda: True  # a GPU host, as far as anyone asks
import megatron.early_exit
from megatron.early_exit import platform
from megatron.early_exit.models import layer_specs
layer_specs.transformer_engine_importable = lambda: True  # ... with Transformer Engine installed

def main():
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.hf.convert import training_model
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.inference import EarlyExit, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import target_device
    from megatron.early_exit.training.arguments import build_run_config, parse_args, parse_run_config
    from megatron.early_exit.training.trainer import pretrain
    from tests.training_fixtures import tiny_run_flags

    out = {
        "applied_at_import": platform.is_applied(),
        "auto_for_cuda": layer_specs.resolve_transformer_impl(None, torch.device("cuda")),
    }
    save = tempfile.mkdtemp()
    flags = {"--mock-data": None, "--tokenizer-type": False, "--device": "cpu", "--save": save, "--eval-iters": 0,
             "--use-exit-mlp": None}
    state = pretrain(parse_run_config(tiny_run_flags(None, iters=3, **flags), world_size=1))
    out["applied"], out["target"] = platform.is_applied(), str(target_device())
    out["trained_impl"], out["loss"] = state.model.module.transformer_impl, state.history[-1]["lm loss"]
    model = load_model(save)[0]
    out["loaded_impl"] = model.transformer_impl
    out["tokens"] = len(generate(model, [[1, 2, 3]], EarlyExit(0.5), max_new_tokens=4).tokens[0])
    sys.argv = ["reshard.py"]
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tools", "checkpoint"))
    import reshard
    reshard.run_rank(reshard.parse(["--load", save, "--save", tempfile.mkdtemp()]))
    args = parse_args(tiny_run_flags(None, iters=4, **{"--mock-data": None, "--tokenizer-type": False}), world_size=1)
    out["converter_impl"] = training_model(ModelConfig.from_flags(vars(args), 64),
                                           transformer_impl=args.transformer_impl).transformer_impl
    try:
        flags = {"--mock-data": None, "--transformer-impl": "transformer_engine"}
        parse_args(tiny_run_flags(None, iters=4, **flags), world_size=1)
    except ConfigError as err:
        out["refused"] = str(err)
    print("RESULT " + json.dumps(out))

if __name__ == "__main__":
    main()
"""


def test_cpu_target_on_a_cuda_host_uses_the_local_spec_and_the_adapter(tmp_path):
    script = tmp_path / "faked_cuda.py"
    script.write_text(_FAKED_CUDA)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # this process's group
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=600,
        env=dict(env, ROOT=ROOT, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["applied_at_import"] is False and out["auto_for_cuda"] == "transformer_engine"
    assert out["applied"] is True and out["target"] == "cpu"
    assert out["trained_impl"] == out["loaded_impl"] == out["converter_impl"] == "local"
    assert out["loss"] > 0 and out["tokens"] == 4
    assert out["refused"] == (
        "--transformer-impl transformer_engine needs a CUDA device, but the model runs on cpu; "
        "use --transformer-impl local"
    )


def test_transformer_engine_refused_where_it_cannot_run(dist1):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.models.layer_specs import resolve_transformer_impl, transformer_engine_importable

    if transformer_engine_importable():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(
        ConfigError, match=r"^--transformer-impl transformer_engine: Transformer Engine is not installed"
    ):
        resolve_transformer_impl("transformer_engine", torch.device("cuda"))
    assert resolve_transformer_impl(None, torch.device("cuda")) == "local"
    assert resolve_transformer_impl("te_standin", torch.device("cpu")) == "te_standin"
    from megatron.early_exit.training.arguments import parse_args

    with pytest.raises(SystemExit):  # argparse: not a choice
        parse_args(
            tiny_run_flags(None, iters=4, **{"--mock-data": None, "--transformer-impl": "inference_optimized"}),
            world_size=1,
        )


@pytest.mark.gpu
def test_transformer_engine_itself_matches_local(dist1):
    """On a GPU host with TE: the real TE spec owns the local spec's checkpoint tensors and
    computes its logits (to kernel precision), exit MLP included."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron.early_exit.checkpoint.reader import model_sharded_state
    from megatron.early_exit.models.layer_specs import transformer_engine_available
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict

    if not transformer_engine_available(torch.device("cuda")):
        pytest.skip("needs CUDA and Transformer Engine")
    ee_config = EarlyExitConfig(
        exit_layer_nums=[1, 3], use_exit_mlp=True, use_exit_norm=True, untie_exit_output_weights=True
    )
    local = build_ee_gpt(tiny_transformer_config(transformer_impl="local"), ee_config)
    spread_vectors(local)
    te = build_ee_gpt(
        tiny_transformer_config(transformer_impl="transformer_engine", use_cpu_initialization=False), ee_config
    )
    assert te.transformer_impl == "transformer_engine"

    def tensors(model):
        return {
            v.key: tuple(v.global_shape) for v in model_sharded_state(model).values() if isinstance(v, ShardedTensor)
        }

    assert tensors(local) == tensors(te)
    load_full_state_dict(te, te_names(full_state_dict(local)))
    tokens, _, pos = make_batch()
    want = _all_logits(local.cuda().eval(), tokens.cuda(), pos.cuda())
    got = _all_logits(te.eval(), tokens.cuda(), pos.cuda())
    for a, b in zip(want, got):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-4)
