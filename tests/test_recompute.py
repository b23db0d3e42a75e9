"""Activation recomputation: gradients equal those without it (fp32), on one process and
under TP=2 and PP=2; the flags map onto megatron-core's TransformerConfig."""

import pytest

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.recompute import RecomputeConfig, recompute_units
from tests.conftest import launch_grouped
from tests.training_fixtures import tiny_run_flags

# (granularity, method, num_layers, exit heads): every megatron-core setting, with units
# that hold exits inside them (uniform 2 and 4 over layers with exits at 1 and 3).
SETTINGS = [
    ("selective", None, None, False),
    ("full", "uniform", 1, False),
    ("full", "uniform", 2, True),
    ("full", "uniform", 4, False),
    ("full", "block", 1, False),
    ("full", "block", 3, True),
    (None, None, None, True),
]
EXIT_VARIANTS = [
    {},
    {"untie_exit_output_weights": True, "use_exit_mlp": True, "use_exit_norm": True},
    {"use_exit_block": True, "pre_exit": True},
    {"use_dynamic_exit_layer_weight": True, "exit_layer_temperature": [2.0, 0.5]},
    {"layer_dropout_max": 0.5},  # random layer skips: the recomputation must draw the same ones
]


def test_units_follow_megatron_core():
    assert recompute_units(4, None, None, None) == [(0, 4, False)]
    assert recompute_units(4, "selective", None, None) == [(0, 4, False)]
    assert recompute_units(5, "full", "uniform", 2) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert recompute_units(4, "full", "block", 1) == [(0, 1, True), (1, 4, False)]
    assert recompute_units(2, "full", "block", 2) == [(0, 1, True), (1, 2, True)]


def test_flags_map_onto_transformer_config(corpus):
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.training.arguments import parse_args

    args = parse_args(tiny_run_flags(corpus, **{"--recompute-activations": None}), world_size=1)
    assert RecomputeConfig.from_flags(vars(args)).granularity == "selective"
    flags = {
        "--recompute-granularity": "full",
        "--recompute-method": "block",
        "--recompute-num-layers": 2,
        "--recompute-exit-heads": None,
    }
    args = parse_args(tiny_run_flags(corpus, **flags), world_size=1)
    recompute = RecomputeConfig.from_flags(vars(args))
    assert recompute == RecomputeConfig("full", "block", 2, False, True)
    config = ModelConfig.from_flags(vars(args), padded_vocab_size=64)
    tc = config.transformer_config(recompute=recompute)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    # A training setting: the stored description is the same with or without it.
    plain = ModelConfig.from_flags(vars(parse_args(tiny_run_flags(corpus), world_size=1)), padded_vocab_size=64)
    assert config == plain and config.architecture_differences(plain) == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            {"--recompute-granularity": "full"},
            r"--recompute-granularity full needs --recompute-method uniform or block",
        ),
        ({"--recompute-granularity": "full", "--recompute-method": "uniform"}, r"needs --recompute-num-layers >= 1"),
        ({"--recompute-method": "block", "--recompute-num-layers": 1}, r"need --recompute-granularity full"),
        (
            {"--recompute-granularity": "full", "--recompute-method": "block", "--recompute-num-layers": 5},
            r"--recompute-num-layers \(5\) exceeds the layers of a pipeline stage \(4\)",
        ),
        ({"--recompute-activations": None, "--recompute-granularity": "full"}, r"--recompute-activations means"),
        (
            {"--distribute-saved-activations": None},
            r"--distribute-saved-activations needs --tensor-model-parallel-size > 1",
        ),
    ],
)
def test_bad_recompute_flags_are_named(corpus, flags, message):
    from megatron.early_exit.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(tiny_run_flags(corpus, **flags), world_size=1)


def recompute_cases(setting, exit_kwargs, seed=3):
    """Loss and full gradients without recomputation and with `setting` (same weights)."""
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from megatron.early_exit.parallel import set_seed
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import ee_loss_and_grads, load_full_state_dict, make_batch, tiny_transformer_config

    exit_kwargs = dict(exit_kwargs)
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3], exit_layer_weight=[0.5, 0.25], **exit_kwargs)
    batch = make_batch(seed=9, batch=2, seq=16)
    granularity, method, num_layers, heads = setting
    results, weights = [], None
    for recompute in (RecomputeConfig(), RecomputeConfig(granularity, method, num_layers, exit_heads=heads)):
        config = tiny_transformer_config(**recompute.transformer_config_kwargs())
        set_seed(seed)
        model = EarlyExitGPTModel(
            config, ee_config, vocab_size=96, max_sequence_length=16, recompute_exit_heads=recompute.exit_heads
        )
        if weights is None:
            weights = full_state_dict(model)
        load_full_state_dict(model, weights)
        calls = {"attention": 0, "exit": 0}
        count = lambda key: lambda *unused: calls.__setitem__(key, calls[key] + 1)  # noqa: E731
        model.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(count("attention"))
        model.exits["1"].output_layer.register_forward_pre_hook(count("exit"))
        set_seed(seed + 1)  # the same layer-dropout draws in both runs
        loss, grads, _ = ee_loss_and_grads(model, ee_config, batch)
        results.append((loss, grads))
    # Recomputed modules run again in backward: the setting was applied, not ignored.
    assert calls == {"attention": 2 if granularity else 1, "exit": 2 if heads else 1}, calls
    return results


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s))
@pytest.mark.parametrize("exit_kwargs", EXIT_VARIANTS, ids=lambda k: "-".join(k) or "tied")
def test_gradients_equal_without_recomputation(dist1, setting, exit_kwargs):
    from tests.helpers import max_abs_diff

    (ref_loss, ref_grads), (loss, grads) = recompute_cases(setting, exit_kwargs)
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    assert set(grads) == set(ref_grads) and any(k.startswith("exits.") or "word_embeddings" in k for k in grads)
    assert max_abs_diff(grads, ref_grads) < 1e-6
    assert all(float(g.abs().sum()) > 0 for k, g in ref_grads.items() if k.startswith("decoder.layers.0."))


@pytest.fixture(scope="module")
def recompute_runs(request):
    return launch_grouped("tests.multiproc.cases_recompute", request)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["case_tp2_gradients", "case_tp2_sequence_parallel_gradients", "case_pp2_gradients", "case_pp2_fill_gradients"],
)
def test_parallel_gradients_equal_without_recomputation(recompute_runs, case):
    result = recompute_runs[case]
    assert result["ok"], result["error"]
    assert result["metrics"]["settings"] >= 3
    assert result["metrics"]["max_grad_diff"] < 1e-6 and result["metrics"]["max_loss_diff"] < 1e-6


@pytest.mark.multiproc
@pytest.mark.slow
def test_interleaved_pp2_v2_dp2_gradients_equal_without_recomputation(request):
    """Interleaved pipeline (4 processes): each chunk recomputes its own layers (units by
    local index, the chunk's first layer whatever its number), exits on every chunk."""
    runs = launch_grouped("tests.multiproc.cases_interleaved", request)
    result = runs["case_pp2_v2_recomputation_equals_none"]
    assert result["ok"], result["error"]
    assert result["metrics"]["settings"] == 4
    assert result["metrics"]["max_grad_diff"] < 1e-6 and result["metrics"]["max_loss_diff"] < 1e-6


def test_recompute_num_layers_counts_a_model_chunk(corpus):
    """With the interleaved pipeline a unit lies within one model chunk (2 layers here,
    4 per stage)."""
    from megatron.early_exit.training.arguments import parse_args

    flags = {
        "--num-layers": 8,
        "--pipeline-model-parallel-size": 2,
        "--num-layers-per-virtual-pipeline-stage": 2,
        "--recompute-granularity": "full",
        "--recompute-method": "block",
    }
    with pytest.raises(ConfigError, match=r"--recompute-num-layers \(3\) exceeds the layers of a model chunk \(2\)"):
        parse_args(tiny_run_flags(corpus, **flags, **{"--recompute-num-layers": 3}), world_size=2)
    args = parse_args(tiny_run_flags(corpus, **flags, **{"--recompute-num-layers": 2}), world_size=2)
    assert RecomputeConfig.from_flags(vars(args)).num_layers == 2
