"""What goes wrong only on a GPU cluster, caught on CPU: each test emulates the condition
(the environment Transformer Engine reads, a CUDA-shaped checkpoint, a device tensor
indexed from the host, a missing compiler) and checks what the code decides about it."""

import dataclasses
import os

import pytest
import torch

from tests.training_fixtures import tiny_run_flags

QUIET = {"--eval-iters": 0}


def _args(**overrides):
    from megatron.early_exit.training.arguments import parse_args

    return parse_args(
        tiny_run_flags(None, **{"--mock-data": None, "--tokenizer-type": False, **overrides}), world_size=1
    )


def _run(argv):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    return pretrain(parse_run_config(argv, world_size=1))


# -- Transformer Engine's attention environment ---------------------------------------

BACKEND = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@pytest.fixture
def clean_attention_env(monkeypatch):
    """No attention variables during the test; afterwards, the environment (and what the
    module remembers writing) as before it."""
    from megatron.early_exit.models import attention_environment

    for name in BACKEND + ("NVTE_APPLY_QK_LAYER_SCALING",):
        monkeypatch.setenv(name, "")  # undone last: the variable as it was before the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(attention_environment, "_written", {})


def _build(config):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel

    return EarlyExitGPTModel(config, EarlyExitConfig(exit_layer_nums=[2]), 96, 16, transformer_impl="local")


def test_models_with_different_attention_backends_build_in_one_process(dist1, clean_attention_env):
    """megatron-core writes the backend to os.environ at each build and asserts on it at the
    next: flash after the default (auto), or the reverse, raised AssertionError."""
    from megatron.core.transformer.enums import AttnBackend

    from tests.helpers import tiny_transformer_config

    auto = tiny_transformer_config()
    flash = dataclasses.replace(auto, attention_backend=AttnBackend.flash)
    for config, expected in ((auto, "111"), (flash, "100"), (auto, "111"), (flash, "100")):
        _build(config)
        assert "".join(os.environ[n] for n in BACKEND) == expected  # what Transformer Engine then selects from


def test_a_backend_the_user_exported_still_conflicts(dist1, clean_attention_env, monkeypatch):
    from megatron.core.transformer.enums import AttnBackend

    from tests.helpers import tiny_transformer_config

    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    with pytest.raises(AssertionError, match="NVTE_FUSED_ATTN set to 1, but expected 0"):
        _build(dataclasses.replace(tiny_transformer_config(), attention_backend=AttnBackend.flash))
    assert os.environ["NVTE_FUSED_ATTN"] == "1"


def test_query_key_layer_scaling_sets_what_transformer_engine_checks(dist1, clean_attention_env):
    """TEDotProductAttention raises ValueError unless NVTE_APPLY_QK_LAYER_SCALING equals
    config.apply_query_key_layer_scaling (the Llama-2 EE-Tuning examples pass the flag)."""
    from tests.helpers import tiny_transformer_config

    for scaling in (True, False, True):
        config = tiny_transformer_config(apply_query_key_layer_scaling=scaling)
        _build(config)
        # megatron-core's check in TEDotProductAttention.__init__, verbatim in its condition:
        assert config.apply_query_key_layer_scaling == bool(int(os.getenv("NVTE_APPLY_QK_LAYER_SCALING", "0")))


class _TransformerEngineCore(torch.nn.Module):
    """Transformer Engine's DotProductAttention as the decoder sees it: the full softmax scale
    (TE applies query-key layer scaling inside its fp16 kernel, never in this attribute)."""

    def __init__(self, head_dim):
        super().__init__()
        self.softmax_scale = head_dim**-0.5


def test_decoder_attention_scale_with_query_key_layer_scaling(dist1, clean_attention_env):
    from megatron.early_exit.inference.layers import attention_scale
    from tests.helpers import tiny_transformer_config

    model = _build(tiny_transformer_config(apply_query_key_layer_scaling=True))
    head_dim = 32 // 4
    for layer in model.decoder.layers:
        assert attention_scale(layer) == pytest.approx(head_dim**-0.5)  # megatron-core's local attention
        layer.self_attention.core_attention = _TransformerEngineCore(head_dim)
        assert attention_scale(layer) == pytest.approx(head_dim**-0.5), layer.layer_number


# -- --use-flash-attn where flash attention cannot run ----------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        ({}, r"^--use-flash-attn needs --bf16 or --fp16: flash attention has no fp32 kernel$"),
        (
            {"--bf16": None, "--reset-attention-mask": None},
            r"^--use-flash-attn cannot run with --reset-attention-mask: flash attention takes a causal mask only",
        ),
    ],
)
def test_flash_attention_refused_for_fp32_and_document_masks(flags, message):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import build_run_config
    from megatron.early_exit.training.run_config import check_flash_attention

    args = _args(**{"--use-flash-attn": None, **flags})
    with pytest.raises(ConfigError, match=message) as err:
        check_flash_attention(build_run_config(args))
    assert "\n" not in str(err.value)


# -- torch.compile at the first CUDA forward ---------------------------------------------


@pytest.mark.parametrize("missing", ["triton", "compiler", "headers"])
def test_bias_dropout_fusion_only_where_torch_compile_can_build(monkeypatch, capsys, tmp_path, missing):
    """megatron-core's fused bias-dropout-add is torch.compile'd at the first CUDA forward
    (Triton, a C compiler, Python.h): without one of them the fusion is off, in one line."""
    import importlib.util
    import shutil
    import sysconfig
    import types

    from megatron.early_exit import platform
    from megatron.early_exit.training.arguments import build_run_config

    def config(device):
        return (
            build_run_config(_args(**{"--bf16": None})).model_config(64).transformer_config(device=torch.device(device))
        )

    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "Python.h").write_text("")
    (tmp_path / "none").mkdir()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: types.SimpleNamespace() if name == "triton" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path / "include")})
    monkeypatch.setattr(platform, "_fusion_notice_printed", False)
    assert config("cuda").bias_dropout_fusion and not config("cpu").bias_dropout_fusion
    if missing == "triton":
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
        )
    elif missing == "compiler":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path / "none")})
    capsys.readouterr()
    assert not config("cuda").bias_dropout_fusion
    assert not config("cuda").bias_dropout_fusion
    out = capsys.readouterr().out.splitlines()
    expected = {"triton": "Triton", "compiler": "a C compiler", "headers": "Python.h"}[missing]
    assert len(out) == 1 and out[0].startswith(f"bias-dropout fusion off: torch.compile needs {expected}"), out


# -- RNG states of a checkpoint written on another device -------------------------------


@pytest.mark.parametrize("form", ["with_device", "before_the_device_was_stored"])
def test_rng_states_from_a_cuda_run_resume_on_cpu(dist1, corpus, tmp_path, capsys, form):
    """A CUDA run stores CUDA generator states (16 bytes) in the tracker; restoring them into
    the CPU tracker failed at the first attention fork. Across devices they are skipped."""
    from megatron.early_exit.training import checkpointing

    real = checkpointing._rng_state

    def as_a_cuda_run_saves():
        obj = real()
        state = dict(
            obj.data,
            tracker={k: torch.zeros(16, dtype=torch.uint8) for k in obj.data["tracker"]},
            cuda=torch.zeros(16, dtype=torch.uint8),
            device="cuda",
        )
        if form != "with_device":
            del state["device"]
        return dataclasses.replace(obj, data=state)

    root = str(tmp_path / "ck")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointing, "_rng_state", as_a_cuda_run_saves)
        _run(tiny_run_flags(corpus, iters=2, **QUIET, **{"--save": root, "--lr-warmup-iters": 1}))
    capsys.readouterr()
    resumed = _run(tiny_run_flags(corpus, iters=4, **QUIET, **{"--load": root, "--lr-warmup-iters": 1}))
    assert len(resumed.history) == 2 and all(torch.isfinite(torch.tensor(e["lm loss"])) for e in resumed.history)
    notes = [line for line in capsys.readouterr().out.splitlines() if "RNG states were saved on" in line]
    assert notes == [
        " checkpoint RNG states were saved on cuda, this run is on cpu: the CPU generator is restored, "
        "the device generators keep this run's seed"
    ]


def test_rng_states_of_the_same_device_are_restored(dist1, corpus, tmp_path, capsys):
    """Same device: the resumed run repeats the straight one (dropout draws from the tracker)."""
    flags = {**QUIET, "--lr-warmup-iters": 1, "--hidden-dropout": 0.1}
    straight = _run(tiny_run_flags(corpus, iters=4, **flags))
    root = str(tmp_path / "ck")
    first = _run(tiny_run_flags(corpus, iters=2, **flags, **{"--save": root, "--lr-decay-iters": 4}))
    resumed = _run(tiny_run_flags(corpus, iters=4, **flags, **{"--load": root}))
    losses = lambda h: [e["lm loss"] for e in h]  # noqa: E731
    assert losses(first.history + resumed.history) == losses(straight.history)
    assert "RNG states were saved on" not in capsys.readouterr().out


# -- --overlap-grad-reduce with exits of weight 0 ---------------------------------------


@pytest.mark.parametrize(
    "warmup",
    [
        {"--exit-layer-weight-warmup-iters": 2},  # exit weights rise from 0
        {
            "--exit-distill-weight": 0.5,
            "--exit-distill-warmup-iters": 2,
            "--exit-layer-weight": "0 0.5",
        },  # exit 1: weight 0
    ],
)
def test_overlap_grad_reduce_with_exits_of_weight_zero(dist1, corpus, warmup):
    """megatron-core's buckets record, in the first iteration, which parameters produce a
    gradient and assert at the next that all do: an exit of weight 0 must back-propagate
    (zeros), and the run equals one without overlap."""
    flags = {**QUIET, "--log-interval": 1, **warmup}
    overlapped = _run(tiny_run_flags(corpus, iters=3, **flags, **{"--overlap-grad-reduce": None}))
    plain = _run(tiny_run_flags(corpus, iters=3, **flags))
    assert len(overlapped.history) == 3
    for a, b in zip(overlapped.history, plain.history):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7) for k in a), (a, b)
    assert overlapped.history[0]["exit weight [1]"] == 0.0


# -- host syncs of the pipeline-based decoder --------------------------------------------


def test_pipeline_headers_reach_the_device_without_waiting(dist1):
    """A header built on the host and moved by a blocking `.to(device)` waits for the device
    (the per-step count is tests/test_gpu_paths.py's, kv="pipeline")."""
    from megatron.early_exit.inference.pipeline import _Links
    from tests.sync_counter import SyncCounter

    links = _Links(max_batch=4, vocab=96, hidden_size=32, dtype=torch.float32, device=torch.device("cpu"))
    with SyncCounter() as counter:
        links.put_step(3, 1, [0, 2], [0, 1], [5, 6], [True, False], None)
        links.put_decisions(3, {2: (1, torch.zeros(96)), 0: (4, torch.ones(96))})
    assert counter.total == 0, counter.counts
    assert links.outbox[("step", 3)].tolist() == [1, 2, 0, 0, 2, -1, -1, 0, 1, -1, -1, 5, 6, -1, -1, 1, 0, -1, -1]
    assert links.outbox[("decision", 3)].tolist() == [2, 0, 2, 0, 0, 4, 1, 0, 0]


def test_sync_counter_sees_host_indexing_of_device_tensors():
    import numpy as np

    from tests.sync_counter import SyncCounter

    x = torch.zeros(3, 4)
    with SyncCounter() as counter:
        x[-1:, [0, 2]]
        x[np.array([0, 1])]
        x[[1]] = 1.0
        x[:, 1:3]
        x.index_select(1, torch.tensor([0, 2]))
    assert dict(counter.counts) == {"__getitem__[list]": 2, "__setitem__[list]": 1}


# -- a model on another device than the process's ----------------------------------------


def test_load_model_refuses_a_device_other_than_the_process_target(dist1):
    """megatron-core allocates rotary frequencies and buffers on the process's device: a
    model loaded elsewhere failed at its first decode step with a device mismatch."""
    from megatron.early_exit.inference.errors import InferenceConfigError
    from megatron.early_exit.inference.loading import load_model

    for device in (torch.device("cuda"), torch.device("meta")):
        with pytest.raises(
            InferenceConfigError,
            match=rf"^load_model: device {device} is not this process's device cpu; "
            r"load on cpu, or initialise the parallel state with device",
        ) as err:
            load_model("/nonexistent/checkpoint", device=device)
        assert "\n" not in str(err.value)
        with pytest.raises(InferenceConfigError) as err:  # weights only (conversion): any device; the path is next
            load_model("/nonexistent/checkpoint", device=device, runs_forward=False)
        assert "/nonexistent/checkpoint" in str(err.value)


def test_a_process_without_its_own_gpu_is_named_in_one_line(monkeypatch):
    """Two ranks on a one-GPU host: LOCAL_RANK 1 asked torch for a device that is not there."""
    from megatron.early_exit.parallel import ParallelConfigError, local_cuda_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_cuda_index() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(
        ParallelConfigError,
        match=r"^LOCAL_RANK 1 has no GPU: this host has 1 CUDA device\(s\), one per "
        r"process; start at most that many processes per host",
    ):
        local_cuda_index()


# -- comparisons across GEMM shapes ------------------------------------------------------


def _result(tokens, exits, probs, top2):
    import math

    from megatron.early_exit.inference.result import GenerationResult

    return GenerationResult(
        tokens=[tokens],
        exit_layers=[exits],
        logprobs=[[math.log(p) for p in probs]],
        num_layers=4,
        top_tokens=[[[t, t + 1] for t in tokens]],
        top_logprobs=[[[math.log(p), math.log(q)] for p, q in top2]],
    )


def test_decisions_near_the_threshold_may_differ_across_gemm_shapes():
    """tests/test_gpu_end_to_end.py compares a batch with rows decoded alone at threshold
    0.6: on a GPU a confidence within rounding of 0.6 flips with the GEMM shape. Such a
    flip is allowed once per row (the rest has another history); any other difference is not."""
    from tests.helpers import assert_same_up_to_near_ties

    batched = _result([7, 8, 9], [4, 1, 2], [0.8, 0.6004, 0.9], [(0.8, 0.1), (0.6004, 0.2), (0.9, 0.05)])
    alone_flipped = _result([7, 3, 5], [4, 4, 4], [0.8, 0.7, 0.9], [(0.8, 0.1), (0.7, 0.2), (0.9, 0.05)])
    assert batched.tokens != alone_flipped.tokens  # what exact equality rejected
    assert assert_same_up_to_near_ties(batched, alone_flipped, threshold=0.6) == 1
    assert assert_same_up_to_near_ties(batched, batched, threshold=0.6) == 0
    argmax_tie = _result([7, 9, 9], [4, 4, 4], [0.8, 0.4002, 0.9], [(0.8, 0.1), (0.4002, 0.4), (0.9, 0.05)])
    assert (
        assert_same_up_to_near_ties(
            argmax_tie, _result([7, 8, 9], [4, 4, 4], [0.8, 0.4001, 0.9], [(0.8, 0.1), (0.4001, 0.4), (0.9, 0.05)]), 0.6
        )
        == 1
    )
    far = _result([7, 3, 5], [4, 1, 4], [0.8, 0.9, 0.9], [(0.8, 0.1), (0.9, 0.05), (0.9, 0.05)])
    with pytest.raises(AssertionError, match=r"row 0 token 1: \(token, exit layer\) \(3, 1\) vs \(3, 4\)"):
        assert_same_up_to_near_ties(
            far, _result([7, 3, 5], [4, 4, 4], [0.8, 0.7, 0.9], [(0.8, 0.1), (0.7, 0.2), (0.9, 0.05)]), threshold=0.6
        )


# -- memory: state propagation's folded weights -------------------------------------------


def test_folded_propagation_weights_are_built_once_for_every_exit(dist1, capsys):
    """A deeper exit's folded K/V rows are a view of the shallowest one's (two exits kept
    two copies: about 2.7 GB in bf16 for a 7B model); their size is said once, when built,
    and only a decode that propagates builds them."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.inference import EarlyExit, generate
    from tests.helpers import build_ee_gpt, tiny_transformer_config

    model = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[1, 2])).eval()
    prompts = [[5, 17, 3, 9], [40, 2, 7]]
    capsys.readouterr()
    generate(model, prompts, EarlyExit(threshold=0.0, kv="recompute"), 4)
    assert not model.__dict__.get("_early_exit_propagators")
    for order in ([2, 1], [1, 2]):
        model.__dict__.pop("_early_exit_propagators", None)
        for exit_layer in order:  # every token leaves at this exit (threshold 0)
            generate(model, prompts, EarlyExit(threshold=0.0, kv="propagate", exit_layers=(exit_layer,)), 4)
        built = {first: prop for first, (_, prop) in model.__dict__["_early_exit_propagators"].items()}
        assert sorted(built) == [1, 2]
        assert built[2].weight.untyped_storage().data_ptr() == built[1].weight.untyped_storage().data_ptr()
        h, kv_rows = 32, 2 * 32  # K and V of 4 heads of 8 per layer
        assert built[1].nbytes == 3 * kv_rows * h * 4 and built[2].nbytes == 2 * kv_rows * h * 4
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("state propagation:")]
    assert lines == [
        "state propagation: folded K/V weights of this stage's layers 3-4, 0.000 GB, kept with the model",
        "state propagation: folded K/V weights of this stage's layers 2-4, 0.000 GB, kept with the model",
        "state propagation: folded K/V weights of this stage's layers 2-4, 0.000 GB, kept with the model",
    ]
