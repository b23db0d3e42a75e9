"""The Hugging Face families beyond Llama 2: Qwen2/Qwen2.5 (QKV biases), Qwen3 (QK norm,
explicit head_dim), Mistral (no sliding window), Llama 3 (llama3 RoPE, tied), converted
both ways; and EarlyExitForCausalLM (megatron.early_exit.hf.modeling) against our model.

Random transformers models (test_hf.save_random_hf: weights at std 0.3, norms away from 1)
of two shapes per family, one with grouped-query attention, one with tied embeddings.
"""

import json
import os
import shutil

import pytest
import torch

from tests.conftest import launch
from tests.hf_fixtures import (
    LAYERS,
    LLAMA3,
    SEQ,
    VOCAB,
    add_exits,
    batch,
    edit_config,
    export_llama,
    full_state,
    import_llama,
    leftovers,
    load,
    save_random_hf,
)

NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy runs never stop early
SHAPES = {  # name: (model_type, config overrides)
    "qwen2-gqa": ("qwen2", dict(num_key_value_heads=2)),
    "qwen2-tied-mqa": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-gqa-head-dim": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),  # 4 x 16 != hidden 32: --kv-channels
    "qwen3-tied": ("qwen3", dict(head_dim=12, tie_word_embeddings=True)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),  # v0.2+: no window
    "mistral-tied-head-dim": ("mistral", dict(head_dim=16, sliding_window=None, tie_word_embeddings=True)),  # Nemo-like
    "llama3-tied-gqa": (
        "llama",
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3),
    ),
}
ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def save_shape(path, name, seed=0):
    model_type, overrides = SHAPES[name]
    return save_random_hf(path, model_type, seed, **overrides, **NO_SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("name", list(SHAPES))
def test_converted_logits_equal_transformers(dist1, tmp_path, name):
    model_type, overrides = SHAPES[name]
    hf = save_shape(tmp_path / "hf", name)
    result = import_llama(tmp_path / "hf", tmp_path / "ours")
    config = result.config
    assert (config.add_qkv_bias, config.qk_layernorm) == (model_type == "qwen2", model_type == "qwen3")
    assert config.kv_channels == (overrides["head_dim"] if overrides.get("head_dim", 8) != 8 else None)
    assert config.untie_embeddings_and_output_weights == (not overrides.get("tie_word_embeddings", False))
    tokens, pos = batch()
    with torch.no_grad():
        reference = hf(input_ids=tokens).logits
        ours = load(tmp_path / "ours")(tokens, pos, None).final
    assert ours.shape == reference.shape == (2, SEQ, VOCAB)
    assert reference.abs().max() > 1.0  # large enough for 1e-4 to mean something
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen2-gqa", "qwen3-gqa-head-dim"])
def test_te_layout_computes_the_same_logits(dist1, tmp_path, name):
    """The q/k norms and QKV biases under Transformer Engine's module layout (CPU stand-in)."""
    from megatron.early_exit.inference.loading import load_model

    hf = save_shape(tmp_path / "hf", name, seed=2)
    import_llama(tmp_path / "hf", tmp_path / "ours")
    model = load_model(str(tmp_path / "ours"), 1, device=torch.device("cpu"), transformer_impl="te_standin")[0]
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    tokens, pos = batch()
    with torch.no_grad():
        assert (model(tokens, pos, None).final - hf(input_ids=tokens).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------- served greedy output


@pytest.mark.parametrize("name", list(SHAPES))
def test_served_greedy_output_equals_transformers_generate(dist1, tmp_path, name):
    """Our KV-cache decoder (prompts of different lengths in one batch) against transformers'
    greedy generate, one prompt at a time."""
    from megatron.early_exit.inference import FullDepth, generate

    hf = save_shape(tmp_path / "hf", name, seed=3)
    import_llama(tmp_path / "hf", tmp_path / "ours")
    prompts = [[5, 17, 3, 42, 9, 11, 2], [7, 1, 60]]
    new = 12
    ours = generate(load(tmp_path / "ours"), prompts, FullDepth(), max_new_tokens=new).tokens
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
        assert out[0, len(prompt) :].tolist() == tokens and len(tokens) == new


# ----------------------------------------------------------------------------- round trip with exits

ROUND_TRIPS = {  # shape: exit structure (exits at 1 and the last layer, random weights)
    "qwen2-gqa": dict(use_exit_mlp=True, use_exit_norm=True, untie_exit_output_weights=True),
    "qwen3-gqa-head-dim": dict(use_exit_block=True, use_exit_norm=True, untie_exit_output_weights=True),
    "mistral-tied-head-dim": dict(use_exit_norm=True, pre_exit=True),
    "llama3-tied-gqa": dict(use_exit_block=True, use_exit_norm=True),
}


@pytest.fixture(scope="module", params=list(ROUND_TRIPS))
def exported(request, dist1, tmp_path_factory):
    """hf -> ours -> random exits -> hf -> ours, for one family; returns (shape, directory)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    save_shape(root / "hf", name, seed=5)
    import_llama(root / "hf", root / "ours")
    from megatron.early_exit.hf.add_exits import add_exits as run

    # Random exits drawn as widely as the backbone: every exit tensor differs from every
    # backbone tensor, and exit logits are large enough for 1e-4 to mean something.
    run(
        str(root / "ours"),
        str(root / "ee"),
        dict(exit_layer_nums=[1, LAYERS], exit_layer_temperature=[1.5, 1.0], **ROUND_TRIPS[name]),
        copy_init=False,
        init_method_std=0.3,
    )
    export_llama(root / "ee", root / "exported")
    import_llama(root / "exported", root / "back")
    return name, root


def test_export_then_import_is_bit_identical_including_exits(exported):
    from transformers import AutoModelForCausalLM

    name, root = exported
    before, after = full_state(root / "ee"), full_state(root / "back")
    assert sorted(before) == sorted(after)
    assert any(k.startswith(f"exits.{LAYERS}.") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    if name.startswith("qwen3"):  # the exit block has its own q/k norms
        assert f"exits.{LAYERS}.block.self_attention.q_layernorm.weight" in before

    model_type = SHAPES[name][0]
    cfg = json.load(open(root / "exported" / "config.json"))
    assert (cfg["model_type"], cfg["architectures"]) == (model_type, [ARCHITECTURE[model_type]])  # the family kept
    hf, info = AutoModelForCausalLM.from_pretrained(str(root / "exported"), output_loading_info=True)
    assert type(hf).__name__ == ARCHITECTURE[model_type]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens, pos = batch()
    with torch.no_grad():
        assert (hf.eval()(input_ids=tokens).logits - load(root / "ee")(tokens, pos, None).final).abs().max() < 1e-4


def test_transformers_model_class_gives_our_exit_logits(exported):
    from megatron.early_exit.hf.modeling import EarlyExitForCausalLM

    name, root = exported
    model = EarlyExitForCausalLM.from_pretrained(str(root / "exported"))
    assert type(model.backbone).__name__ == ARCHITECTURE[SHAPES[name][0]]
    tokens, pos = batch()
    with torch.no_grad():
        theirs = model(tokens)
        ours = load(root / "ee")(tokens, pos, None)
    assert sorted(theirs.exit_logits) == [1, LAYERS] == [p.layer_number for p in ours.exits]
    assert (theirs.logits - ours.final).abs().max() < 1e-4
    for pending in ours.exits:
        expected = pending.compute_logits().transpose(0, 1)  # [s, b, v] -> [b, s, v]
        got = theirs.exit_logits[pending.layer_number]
        assert got.shape == expected.shape and expected.abs().max() > 1.0
        assert (got - expected).abs().max() < 1e-4, pending.layer_number
    # The exits are not the final layer: a wrong mapping could not hide behind it.
    assert (theirs.exit_logits[1] - theirs.logits).abs().max() > 1e-2


def test_transformers_early_exit_generation_equals_ours(dist1, tmp_path):
    """Greedy early exit in transformers (whole model every step) picks the tokens and
    exit layers our KV-cache decoder picks with recomputed K/V."""
    from megatron.early_exit.hf.modeling import EarlyExitForCausalLM
    from megatron.early_exit.inference import EarlyExit, generate

    save_shape(tmp_path / "hf", "qwen3-gqa-head-dim", seed=9)
    import_llama(tmp_path / "hf", tmp_path / "ours")
    # Copied exits: what the final norm and output layer make of layers 2 and 3.
    add_exits(
        tmp_path / "ours", tmp_path / "ee", exit_layer_nums=[2, 3], use_exit_norm=True, untie_exit_output_weights=True
    )
    export_llama(tmp_path / "ee", tmp_path / "exported")
    theirs = EarlyExitForCausalLM.from_pretrained(str(tmp_path / "exported"))
    ours = load(tmp_path / "ee")
    prompt, new = [5, 17, 3, 42, 9], 16
    mixed = 0
    for threshold in (0.1, 0.15, 0.2):  # random models are seldom confident
        result = generate(ours, [prompt], EarlyExit(threshold=threshold, kv="recompute"), max_new_tokens=new)
        # Our first token comes from the prefill, always at full depth: continue after it.
        first = result.tokens[0][:1]
        tokens, layers = theirs.generate_early_exit(
            torch.tensor([prompt + first]), threshold=threshold, max_new_tokens=new - 1
        )
        assert tokens[0].tolist() == prompt + result.tokens[0]
        assert layers[0] == result.exit_layers[0][1:]
        mixed += len(set(layers[0])) > 1
    assert mixed  # some threshold made tokens leave at different layers


# ----------------------------------------------------------------------------- TP=2 x PP=2


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2-gqa", "qwen3-gqa-head-dim"])
def test_tp2_pp2_load_gives_one_process_logits(dist1, tmp_path, launch_dir, name):
    """QKV biases and q/k norms split over tensor-parallel ranks (one KV group each)."""
    save_shape(tmp_path / "hf", name, seed=13)
    import_llama(tmp_path / "hf", tmp_path / "ours", tp=2, pp=2)
    add_exits(
        tmp_path / "ours",
        tmp_path / "ee",
        copy_init=False,
        exit_layer_nums=[1, 3],
        use_exit_block=True,
        use_exit_norm=True,
        untie_exit_output_weights=True,
    )
    model = load(tmp_path / "ee")
    tokens, pos = batch()
    with torch.no_grad():
        out = model(tokens, pos, None)
        reference = {
            "tokens": tokens,
            "position_ids": pos,
            "vocab_size": model.vocab_size,
            "final": out.final,
            "exits": {p.layer_number: p.compute_logits().transpose(0, 1) for p in out.exits},
        }
    torch.save(reference, tmp_path / "reference.pt")
    results = launch(
        "tests.multiproc.cases_hf",
        4,
        launch_dir,
        env={"EE_HF_CHECKPOINT": str(tmp_path / "ee"), "EE_HF_REFERENCE": str(tmp_path / "reference.pt")},
    )
    case = results["case_tp2_pp2_logits_match_one_process"]
    assert case["ok"], case["error"]
    assert sorted(case["metrics"]) == ["exit 1", "exit 3", "final"]


# ----------------------------------------------------------------------------- refused settings

REFUSED = {  # shape, config.json changes, message
    "mistral-v0.1-window": (
        "mistral-gqa",
        {"sliding_window": 16},
        "sliding_window 16 is smaller than max_position_embeddings 64: sliding-window attention is not supported",
    ),
    "qwen2-window-on": (
        "qwen2-gqa",
        {
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 0,
            "layer_types": ["sliding_attention"] * LAYERS,
        },
        "sliding_window 16 is smaller than max_position_embeddings 64",
    ),
    "qwen2-window-on-4.x-config": (
        "qwen2-gqa",
        {
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
            "layer_types": None,
        },  # no layer_types: layers from 2 on slide
        "sliding_window 16 is smaller than max_position_embeddings 64",
    ),
    "qwen3-attention-bias": ("qwen3-tied", {"attention_bias": True}, "attention_bias true is not supported"),
    "qwen2-yarn": (
        "qwen2-gqa",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
        "RoPE scaling 'yarn' cannot be represented",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_settings_are_refused_in_one_line(dist1, tmp_path, case):
    from megatron.early_exit.errors import ConfigError

    name, changes, message = REFUSED[case]
    save_shape(tmp_path / "hf", name)
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(ConfigError, match=message) as err:
        import_llama(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


WINDOWS_THAT_CHANGE_NOTHING = {
    "mistral-window-covers-context": ("mistral-gqa", {"sliding_window": 64}),
    "qwen2.5-window-off": ("qwen2-gqa", {"use_sliding_window": False, "sliding_window": 16}),  # as Qwen2.5 ships
    "qwen2-window-on-no-sliding-layer": (
        "qwen2-gqa",
        {
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": LAYERS,
            "layer_types": ["full_attention"] * LAYERS,
        },
    ),
}


@pytest.mark.parametrize("case", list(WINDOWS_THAT_CHANGE_NOTHING))
def test_windows_that_change_nothing_convert(dist1, tmp_path, case):
    name, changes = WINDOWS_THAT_CHANGE_NOTHING[case]
    hf = save_shape(tmp_path / "hf", name, seed=4)
    edit_config(tmp_path / "hf", **changes)
    import_llama(tmp_path / "hf", tmp_path / "ours")
    tokens, pos = batch()
    with torch.no_grad():
        assert (load(tmp_path / "ours")(tokens, pos, None).final - hf(input_ids=tokens).logits).abs().max() < 1e-4


def test_export_family_follows_the_model_or_the_request(dist1, tmp_path):
    from megatron.early_exit.hf.errors import ConversionError

    save_shape(tmp_path / "qwen2", "qwen2-gqa")
    import_llama(tmp_path / "qwen2", tmp_path / "ours_qwen2")
    with pytest.raises(
        ConversionError, match="--model-type llama: the checkpoint has --add-qkv-bias .* use --model-type qwen2"
    ):
        export_llama(tmp_path / "ours_qwen2", tmp_path / "bad", model_type="llama")
    assert not os.path.exists(tmp_path / "bad")
    # A Llama-shaped model goes out as Mistral on request (the two compute the same).
    save_shape(tmp_path / "llama", "llama3-tied-gqa")
    import_llama(tmp_path / "llama", tmp_path / "ours_llama")
    export_llama(tmp_path / "ours_llama", tmp_path / "as_mistral", model_type="mistral")
    cfg = json.load(open(tmp_path / "as_mistral" / "config.json"))
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] is None
    from megatron.early_exit.hf.modeling import EarlyExitForCausalLM

    with pytest.raises(ConversionError, match="config.json has no early_exit section: the model has no exits"):
        EarlyExitForCausalLM.from_pretrained(str(tmp_path / "as_mistral"))
    import_llama(tmp_path / "as_mistral", tmp_path / "back")
    before, after = full_state(tmp_path / "ours_llama"), full_state(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    # Without the record of the import, the model's attention decides.
    shutil.rmtree(tmp_path / "back")
    from megatron.early_exit.hf.families import family_of_model

    assert [family_of_model(b, n).model_type for b, n in ((False, False), (True, False), (False, True))] == [
        "llama",
        "qwen2",
        "qwen3",
    ]


# ----------------------------------------------------------------------------- the model description


def test_new_model_fields_round_trip_and_are_architecture():
    import dataclasses

    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.training.arguments import parse_args

    base = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=64,
        max_position_embeddings=16,
        kv_channels=16,
        add_qkv_bias=True,
        qk_layernorm=True,
    )
    assert ModelConfig.from_dict(base.to_dict()) == base
    assert ModelConfig.from_flags(base.to_flags(), 64) == base
    assert base.transformer_config().add_qkv_bias and base.transformer_config().qk_layernorm
    old = base.to_dict()
    del old["add_qkv_bias"], old["qk_layernorm"]  # a checkpoint written before these fields
    assert not ModelConfig.from_dict(old).add_qkv_bias and not ModelConfig.from_dict(old).qk_layernorm
    differences = base.architecture_differences(dataclasses.replace(base, add_qkv_bias=False, qk_layernorm=False))
    assert differences == ["--add-qkv-bias: checkpoint True, now False", "--qk-layernorm: checkpoint True, now False"]
    args = parse_args(
        [
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "1",
            "--train-iters",
            "1",
            "--lr",
            "1e-3",
            "--add-qkv-bias",
            "--qk-layernorm",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "64",
            "--mock-data",
        ],
        world_size=1,
    )
    parsed = ModelConfig.from_flags(vars(args), 64)
    assert parsed.add_qkv_bias and parsed.qk_layernorm
    from megatron.early_exit.training.arguments import checkpoint_arg_names

    assert {"add_qkv_bias", "qk_layernorm"} <= set(checkpoint_arg_names())  # --use-checkpoint-args takes them


def test_qkv_biases_and_qk_norms_train(dist1, corpus):
    """Every new parameter, in the layers and in an exit block, gets gradients and moves
    from its initial value (biases 0, norms 1)."""
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain
    from tests.training_fixtures import tiny_run_flags

    flags = tiny_run_flags(
        corpus, iters=3, **{"--add-qkv-bias": None, "--qk-layernorm": None, "--use-exit-block": None, "--eval-iters": 0}
    )
    state = pretrain(parse_run_config(flags, world_size=1))
    params = dict(state.model.named_parameters())
    new = {
        k: v for k, v in params.items() if k.endswith(("linear_qkv.bias", "q_layernorm.weight", "k_layernorm.weight"))
    }
    assert len(new) == 3 * (4 + 2)  # 4 layers and 2 exit blocks
    for name, param in new.items():
        initial = 0.0 if name.endswith("bias") else 1.0
        assert (param.detach() - initial).abs().max() > 0, name


@pytest.mark.slow  # three fresh processes
def test_convert_tool_both_ways_names_the_family(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.hf_fixtures import fresh_process_env

    save_shape(tmp_path / "hf", "qwen3-tied")
    tool = os.path.join(ROOT, "tools", "checkpoint", "convert_hf.py")
    run = lambda *flags: subprocess.run(
        [sys.executable, tool, "--no-progress", *flags], capture_output=True, text=True, env=fresh_process_env()
    )
    proc = run("--load", str(tmp_path / "hf"), "--save", str(tmp_path / "ours"))
    assert proc.returncode == 0, proc.stderr
    assert "(Qwen3ForCausalLM)" in proc.stdout and "--qk-layernorm" in proc.stdout and "--kv-channels 12" in proc.stdout
    proc = run(
        "--direction",
        "to-hf",
        "--load",
        str(tmp_path / "ours"),
        "--save",
        str(tmp_path / "back"),
        "--model-type",
        "qwen2",
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].endswith(
        "error: --model-type qwen2: the checkpoint has --qk-layernorm of --add-qkv-bias/--qk-layernorm; use "
        "--model-type qwen3"
    )
    proc = run("--direction", "to-hf", "--load", str(tmp_path / "ours"), "--save", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "back" / "config.json"))["architectures"] == ["Qwen3ForCausalLM"]
