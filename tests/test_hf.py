"""Hugging Face interoperability and EE-Tuning: tools/checkpoint/convert_hf.py and add_exits.py.

Models are random Llama models made with transformers (weights drawn at std 0.3 and norms
away from 1, so that a wrong mapping shows in the logits), converted, and compared with
LlamaForCausalLM, with themselves after a round trip, and across layouts. save_random_hf
(tests/hf_fixtures.py) makes the other families' models the same way (test_hf_families.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, launch_grouped
from tests.hf_fixtures import (
    FFN,
    HIDDEN,
    LLAMA3,
    SEQ,
    VOCAB,
    add_exits,
    batch,
    edit_config,
    export_llama,
    fresh_process_env,
    full_state,
    import_llama,
    leftovers,
    load,
    save_random_llama,
    save_word_tokenizer,
)
from tests.training_fixtures import tiny_run_flags

# ----------------------------------------------------------------------------- logits against transformers

VARIANTS = {
    "untied-mha": {},
    "tied-gqa": {"tie_word_embeddings": True, "num_key_value_heads": 2},
    "mqa-linear-rope": {"num_key_value_heads": 1, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    # theta 500000 puts low frequencies past llama3's 8192-token wavelength, where the scaling acts
    "gqa-llama3-rope": {"num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA3},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_logits_equal_transformers(dist1, tmp_path, variant):
    hf = save_random_llama(tmp_path / "hf", **VARIANTS[variant])
    import_llama(tmp_path / "hf", tmp_path / "ours")
    tokens, pos = batch()
    with torch.no_grad():
        ours = load(tmp_path / "ours")(tokens, pos, None).final
        reference = hf(input_ids=tokens).logits
    assert ours.shape == reference.shape == (2, SEQ, VOCAB)
    assert reference.abs().max() > 1.0  # large enough for 1e-4 to mean something
    assert (ours - reference).abs().max() < 1e-4
    if "rope_scaling" in VARIANTS[variant]:  # the scaling matters: without it the logits differ
        from transformers import LlamaForCausalLM

        plain_config = hf.config.to_dict()
        plain_config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": plain_config["rope_parameters"]["rope_theta"],
        }
        plain = LlamaForCausalLM(type(hf.config).from_dict(plain_config)).eval()
        plain.load_state_dict(hf.state_dict())
        with torch.no_grad():
            assert (plain(input_ids=tokens).logits - reference).abs().max() > 1e-2


def test_pytorch_bin_and_sharded_safetensors_are_read(dist1, tmp_path):
    hf = save_random_llama(tmp_path / "hf", seed=3)
    tokens, pos = batch()
    with torch.no_grad():
        reference = hf(input_ids=tokens).logits
    # pytorch_model.bin
    os.makedirs(tmp_path / "bin")
    os.replace(tmp_path / "hf" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    import_llama(tmp_path / "bin", tmp_path / "from_bin")
    # sharded safetensors with an index, written by our exporter
    export_llama(tmp_path / "from_bin", tmp_path / "sharded", max_shard_bytes=20_000)
    names = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-0") for n in names) > 2
    import_llama(tmp_path / "sharded", tmp_path / "from_sharded")
    with torch.no_grad():
        for root in ("from_bin", "from_sharded"):
            assert (load(tmp_path / root)(tokens, pos, None).final - reference).abs().max() < 1e-4


# ----------------------------------------------------------------------------- round trip

ROUND_TRIPS = {  # exit structure, model
    "norm-mlp-untied": (
        dict(use_exit_norm=True, use_exit_mlp=True, untie_exit_output_weights=True),
        dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "block-norm-tied-pre-tied-model": (
        dict(use_exit_block=True, use_exit_norm=True, pre_exit=True),
        dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3),
    ),
}


@pytest.mark.parametrize("structure", list(ROUND_TRIPS))
def test_export_then_import_is_bit_identical_including_exits(dist1, tmp_path, structure):
    from transformers import LlamaForCausalLM

    exits, model = ROUND_TRIPS[structure]
    save_random_llama(tmp_path / "hf", seed=5, **model)
    save_word_tokenizer(tmp_path / "hf")
    import_llama(tmp_path / "hf", tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours" / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    # Random exits: every exit tensor differs from every backbone tensor.
    add_exits(
        tmp_path / "ours",
        tmp_path / "ee",
        copy_init=False,
        exit_layer_nums=[1, 3],
        exit_layer_temperature=[1.5, 1.0],
        **exits,
    )
    export_llama(tmp_path / "ee", tmp_path / "exported")
    import_llama(tmp_path / "exported", tmp_path / "back")

    before, after = full_state(tmp_path / "ee"), full_state(tmp_path / "back")
    assert sorted(before) == sorted(after)
    assert any(k.startswith("exits.3.") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]

    exported = tmp_path / "exported"
    cfg = json.load(open(exported / "config.json"))
    assert cfg["early_exit"]["exit_layer_nums"] == [1, 3] and cfg["early_exit"]["exit_layer_temperature"] == [1.5, 1.0]
    assert all(cfg["early_exit"][k] == v for k, v in exits.items())
    assert open(exported / "tokenizer.json").read() == open(tmp_path / "hf" / "tokenizer.json").read()
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (VOCAB - 2, VOCAB - 1)
    # The backbone loads in transformers, every tensor used, and computes our final logits.
    hf, info = LlamaForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens, pos = batch()
    with torch.no_grad():
        assert (hf.eval()(input_ids=tokens).logits - load(tmp_path / "ee")(tokens, pos, None).final).abs().max() < 1e-4


def test_converted_directory_loads_and_generates_after_a_move(dist1, tmp_path):
    import shutil

    from megatron.early_exit.checkpoint.reader import read_common, resolve
    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.loading import load_model

    save_random_llama(tmp_path / "hf", seed=19)
    save_word_tokenizer(tmp_path / "hf")
    import_llama(tmp_path / "hf", tmp_path / "ours")
    add_exits(tmp_path / "ours", tmp_path / "ee", exit_layer_nums=[2], use_exit_norm=True)
    prompt = [[1, 2, 3, 4]]
    before = {
        name: generate(load(tmp_path / name), prompt, FullDepth(), max_new_tokens=6).tokens for name in ("ours", "ee")
    }
    os.makedirs(tmp_path / "elsewhere")
    for name in ("ours", "ee"):
        root = shutil.move(str(tmp_path / name), str(tmp_path / "elsewhere" / name))
        assert not os.path.exists(tmp_path / name)
        assert read_common(resolve(root))["model_config"]["tokenizer"]["model"] == "tokenizer"  # stored relative
        model, tokenizer, config = load_model(root, 1, device=torch.device("cpu"))
        assert config.tokenizer.model == os.path.join(root, "tokenizer") and sorted(
            os.listdir(config.tokenizer.model)
        ) == ["tokenizer.json", "tokenizer_config.json"]
        assert (tokenizer.vocab_size, tokenizer.eod) == (VOCAB, VOCAB - 1)
        assert tokenizer.tokenize("w1 w2 w3 w4") == prompt[0]
        tokens = generate(model, [tokenizer.tokenize("w1 w2 w3 w4")], FullDepth(), max_new_tokens=6).tokens
        assert tokens == before[name] and len(tokens[0]) == 6


# ----------------------------------------------------------------------------- add_exits


@pytest.fixture(scope="module")
def converted(dist1, tmp_path_factory):
    """An untied Llama converted once for the add_exits tests."""
    root = tmp_path_factory.mktemp("converted")
    save_random_llama(root / "hf", seed=7, num_key_value_heads=2)
    import_llama(root / "hf", root / "ours")
    return root / "ours"


def _manual_hidden_states(model, tokens, pos):
    """Every layer's output [s, b, h], run module by module (index 0 = the embedding)."""
    states = [model.embedding(input_ids=tokens, position_ids=pos)]
    rotary = model.rotary_pos_emb(tokens.shape[1])
    for layer in model.decoder.layers:
        states.append(layer(hidden_states=states[-1], attention_mask=None, rotary_pos_emb=rotary)[0])
    return states, rotary


COPY_INIT = {
    "norm-untied": dict(use_exit_norm=True, untie_exit_output_weights=True),
    "norm-untied-pre": dict(use_exit_norm=True, untie_exit_output_weights=True, pre_exit=True),
    "mlp-norm-untied": dict(use_exit_mlp=True, use_exit_norm=True, untie_exit_output_weights=True),
    "block-norm-untied": dict(use_exit_block=True, use_exit_norm=True, untie_exit_output_weights=True),
}


@pytest.mark.parametrize("structure", list(COPY_INIT))
def test_add_exits_copy_init_predicts_what_the_copied_modules_compute(dist1, converted, tmp_path, structure):
    flags = COPY_INIT[structure]
    report = add_exits(converted, tmp_path / "ee", exit_layer_nums=[1, 3], **flags)
    assert report.initialised == {1: "copy", 3: "copy"} and not report.kept
    model = load(tmp_path / "ee")
    tokens, pos = batch()
    with torch.no_grad():
        out = model(tokens, pos, None)
        states, rotary = _manual_hidden_states(model, tokens, pos)
        assert (
            out.final - model.output_layer(model.decoder.final_layernorm(states[-1]))[0].transpose(0, 1)
        ).abs().max() < 1e-5
        for pending in out.exits:
            n = pending.layer_number
            hidden = states[n - 1] if flags.get("pre_exit") else states[n]
            if flags.get("use_exit_block"):  # a copy of the last layer, then the final norm and output layer
                hidden = model.decoder.layers[-1](hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)[0]
            expected = model.output_layer(model.decoder.final_layernorm(hidden))[0]
            assert (pending.compute_logits() - expected).abs().max() < 1e-5, n
    # Random initialisation predicts something else.
    add_exits(converted, tmp_path / "random", copy_init=False, exit_layer_nums=[1, 3], **flags)
    with torch.no_grad():
        out = load(tmp_path / "random")(tokens, pos, None)
        expected = model.output_layer(model.decoder.final_layernorm(states[0 if flags.get("pre_exit") else 1]))[0]
        assert (out.exits[0].compute_logits() - expected).abs().max() > 1e-2


def test_add_exits_keeps_matching_exits_and_replaces_others(dist1, converted, tmp_path):
    add_exits(
        converted,
        tmp_path / "a",
        copy_init=False,
        exit_layer_nums=[1, 2],
        use_exit_norm=True,
        untie_exit_output_weights=True,
    )
    report = add_exits(
        tmp_path / "a", tmp_path / "b", exit_layer_nums=[2, 3], use_exit_norm=True, untie_exit_output_weights=True
    )
    assert report.kept == [2] and report.initialised == {3: "copy"}
    a, b = full_state(tmp_path / "a"), full_state(tmp_path / "b")
    assert torch.equal(a["exits.2.output_layer.weight"], b["exits.2.output_layer.weight"])
    assert not any(k.startswith("exits.1.") for k in b)
    assert torch.equal(b["exits.3.output_layer.weight"], b["output_layer.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("exits."))


def test_exits_tuned_on_the_first_stages_go_back_on_the_whole_model(dist1, converted, tmp_path):
    from megatron.early_exit.checkpoint.reader import load_weights, resolve
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.hf.convert import training_model
    from megatron.early_exit.hf.errors import ConversionError
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.training.arguments import stored_args

    add_exits(converted, tmp_path / "ee", exit_layer_nums=[1, 2], use_exit_norm=True, untie_exit_output_weights=True)
    # What --tune-exit-pipeline-parallel-size 1 of 2 saves: layers 1-2 and their exits, tuned.
    path = resolve(str(tmp_path / "ee"))
    args = stored_args(path, 1)
    args.num_layers, args.tune_exit, args.tune_exit_pipeline_parallel_size = 2, True, 1
    model = training_model(ModelConfig.from_flags(vars(args), VOCAB))
    load_weights(path, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("exits."):
                param.add_(1.0)
    save_weights(str(tmp_path / "tuned"), vars(args), model)
    with pytest.raises(ConversionError, match="holds only the first 2 layers: put its exits back on the whole model"):
        export_llama(tmp_path / "tuned", tmp_path / "hf")

    report = add_exits(tmp_path / "ee", tmp_path / "merged", exits_from=tmp_path / "tuned")
    assert report.initialised == {1: f"from {tmp_path / 'tuned'}", 2: f"from {tmp_path / 'tuned'}"}
    ee, tuned, merged = full_state(tmp_path / "ee"), full_state(tmp_path / "tuned"), full_state(tmp_path / "merged")
    assert sorted(merged) == sorted(ee) and "decoder.layers.3.mlp.linear_fc2.weight" in merged
    for key in merged:
        assert torch.equal(merged[key], tuned[key] if key.startswith("exits.") else ee[key]), key
    assert not torch.equal(merged["exits.1.norm.weight"], ee["exits.1.norm.weight"])
    with pytest.raises(ConversionError, match="brings its own exits: drop --exit-layer-nums"):
        add_exits(tmp_path / "ee", tmp_path / "bad", exits_from=tmp_path / "tuned", exit_layer_nums=[1])


# ----------------------------------------------------------------------------- exit tuning


def test_exit_tuning_from_add_exits_changes_only_exit_parameters(dist1, corpus, tmp_path):
    from megatron.early_exit.sharding import full_state_dict
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    save_random_llama(tmp_path / "hf", seed=11, tie_word_embeddings=True)  # tiny_run_flags' shape
    import_llama(tmp_path / "hf", tmp_path / "ours")
    add_exits(
        tmp_path / "ours", tmp_path / "ee", exit_layer_nums=[1, 2], use_exit_norm=True, untie_exit_output_weights=True
    )
    flags = tiny_run_flags(
        corpus,
        iters=3,
        **{
            "--load": str(tmp_path / "ee"),
            "--finetune": None,
            "--tune-exit": None,
            "--untie-exit-output-weights": None,
            "--norm-epsilon": "1e-6",
            "--eval-iters": 0,
            "--lr-warmup-iters": 0,
            "--ffn-hidden-size": FFN,
        },
    )
    state = pretrain(parse_run_config(flags, world_size=1))
    assert len(state.history) == 3 and all("early loss [1]" in h for h in state.history)
    before, after = full_state(tmp_path / "ee"), full_state_dict(state.model)
    assert sorted(before) == sorted(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("exits.")), changed


# ----------------------------------------------------------------------------- TP=2 x PP=2


@pytest.fixture(scope="module")
def hf_tp2_pp2_runs(request):
    """conftest's hf_tp2_pp2_inputs (a converted model and its one-process logits), read at
    TP=2 x PP=2 in the 4-process launch."""
    return launch_grouped("tests.multiproc.cases_hf", request)


@pytest.mark.multiproc
def test_tp2_pp2_load_gives_one_process_logits(hf_tp2_pp2_runs):
    results = hf_tp2_pp2_runs
    case = results["case_tp2_pp2_logits_match_one_process"]
    assert case["ok"], case["error"]
    assert sorted(case["metrics"]) == ["exit 1", "exit 3", "final"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bad")
    save_random_llama(root / "good", seed=17)
    return root / "good"


BAD_CONFIGS = {
    "gpt2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2' .* is not supported"),
    "yarn": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
        "RoPE scaling 'yarn' cannot be represented in megatron-core",
    ),
    "llama3-other-constants": (
        {"rope_parameters": {**LLAMA3, "low_freq_factor": 2.0, "rope_theta": 500000.0}},
        "low_freq_factor=2.0 cannot be represented",
    ),
    "bias": ({"attention_bias": True}, "attention_bias true is not supported"),
    "shape": (
        {"intermediate_size": FFN + 8},
        r"tensor model.layers.0.mlp.gate_proj.weight has shape \(128, 32\), expected \(136, 32\)",
    ),
    "heads-vs-target-tp": ({"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}, None),
    # Checked against the weights' shapes before a model of that size is built (it tried to allocate 4e18 bytes).
    "huge-hidden": (
        {"hidden_size": 10**9},
        r"config.json does not match the weights: tensor model.embed_tokens.weight "
        r"has shape \(\d+, 32\), expected \(\d+, 1000000000\)",
    ),
    "huge-layers": (
        {"num_hidden_layers": 10**6},
        r"config.json does not match the weights: tensor "
        r"model.layers.999999.self_attn.q_proj.weight is missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_hf_input_is_refused_in_one_line_and_writes_nothing(dist1, hf_dir, tmp_path, case):
    import shutil

    from megatron.early_exit.errors import ConfigError

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    changes, message = BAD_CONFIGS[case]
    edit_config(src, **changes)
    tp = 4 if case == "heads-vs-target-tp" else 1
    message = message or r"--num-attention-heads \(2\) is not divisible by --tensor-model-parallel-size \(4\)"
    with pytest.raises(ConfigError, match=message) as err:
        import_llama(src, tmp_path / "out", tp=tp)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_missing_and_unknown_weights_are_named(dist1, hf_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron.early_exit.hf.errors import ConversionError

    src = tmp_path / "src"
    os.makedirs(src)
    shutil.copy(hf_dir / "config.json", src / "config.json")
    with pytest.raises(ConversionError, match="no weights found .*model.safetensors"):
        import_llama(src, tmp_path / "out")
    with open(src / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(ConversionError, match="model-00001-of-00002.safetensors is missing"):
        import_llama(src, tmp_path / "out")
    os.remove(src / "model.safetensors.index.json")
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ConversionError, match="tensor model.layers.2.self_attn.k_proj.weight is missing"):
        import_llama(src, tmp_path / "out")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(HIDDEN)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(
        ConversionError,
        match="1 tensors have no place in a LlamaForCausalLM model, e.g. model.layers.0.self_attn.q_proj.bias",
    ):
        import_llama(src, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_export_refuses_a_model_llama_cannot_express(dist1, tmp_path):
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.hf.convert import training_model
    from megatron.early_exit.hf.errors import ConversionError
    from megatron.early_exit.models.model_config import ModelConfig

    config = ModelConfig.from_flags(
        dict(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            seq_length=16,
            tokenizer_type="NullTokenizer",
            vocab_size=64,
        ),
        128,
    )  # LayerNorm, GeLU, biases
    save_weights(str(tmp_path / "gpt"), None, training_model(config))
    with pytest.raises(ConversionError, match="the checkpoint is not a Llama model: --normalization LayerNorm"):
        export_llama(tmp_path / "gpt", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_add_exits_refuses_bad_exits_and_existing_output(dist1, converted, tmp_path):
    from megatron.early_exit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--exit-layer-nums \[9\] outside 1..--num-layers \(4\)"):
        add_exits(converted, tmp_path / "out", exit_layer_nums=[9])
    with pytest.raises(ConfigError, match="--use-exit-mlp and --use-exit-block cannot be combined"):
        add_exits(converted, tmp_path / "out", exit_layer_nums=[1], use_exit_mlp=True, use_exit_block=True)
    os.makedirs(tmp_path / "taken")
    open(tmp_path / "taken" / "file", "w").close()
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        add_exits(converted, tmp_path / "taken", exit_layer_nums=[1])
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_convert_tool_prints_one_line_errors(tmp_path):
    os.makedirs(tmp_path / "src")
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, open(tmp_path / "src" / "config.json", "w"))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "checkpoint", "convert_hf.py"),
            "--load",
            str(tmp_path / "src"),
            "--save",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=fresh_process_env(),
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "error: "
            + str(tmp_path / "src" / "config.json")
            + ": model_type 'gpt2' (GPT2LMHeadModel) is not supported: "
            "the converter reads 'llama' (LlamaForCausalLM), 'mistral' (MistralForCausalLM), 'qwen2' "
            "(Qwen2ForCausalLM), "
            "'qwen3' (Qwen3ForCausalLM)"
        )
    )


# ----------------------------------------------------------------------------- examples

LLAMA2 = {  # (layers, PP) as converted, hidden, heads, KV groups, TP, (layers, PP) tuned, exits
    "7B": ((32, 2), 4096, 32, None, 1, (32, 2), [9, 17]),
    "13B": ((40, 2), 5120, 40, None, 2, (40, 2), [11, 21]),
    # --tune-exit-pipeline-parallel-size 3: the first 3 of 4 stages (layers 1-60) hold both exits
    "70B": ((80, 4), 8192, 64, 8, 8, (60, 3), [21, 41]),
}


@pytest.mark.parametrize("size", list(LLAMA2))
def test_ee_tuning_scripts_arguments_validate(size, tmp_path):
    from megatron.early_exit.training.arguments import build_run_config, parse_args

    prefix = str(tmp_path / "corpus_text_document")
    for suffix in (".bin", ".idx"):
        open(prefix + suffix, "w").close()
    script = os.path.join(ROOT, "examples", "ee_llm", f"ee_tuning_llama2_{size}.sh")
    env = dict(os.environ, EE_PRINT_ARGS="1", HF_DIR=str(tmp_path / "Llama-2-hf"), DATA_PATH=prefix, WORK=str(tmp_path))
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    args = parse_args(out[1:], world_size=int(out[0].split("=")[1]))
    converted, hidden, heads, groups, tp, tuned, exits = LLAMA2[size]
    assert (args.hidden_size, args.num_attention_heads, args.num_query_groups) == (hidden, heads, groups)
    assert build_run_config(args).built_stages == tuned and args.tensor_model_parallel_size == tp
    assert (
        args.tune_exit_pipeline_parallel_size in (None, tuned[1])
        and converted[0] // converted[1] == tuned[0] // tuned[1]
    )
    assert args.exit_layer_nums == exits and args.pre_exit and args.use_exit_norm and args.untie_exit_output_weights
    assert args.tune_exit and args.finetune and args.load and args.bf16
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.make_vocab_size_divisible_by == 1


def test_cpu_example_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "ee_llm", "ee_tuning_cpu.sh")], check=True)
