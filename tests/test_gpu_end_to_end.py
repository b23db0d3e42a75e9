"""What the CPU suite covers, on a GPU: optimizer steps, bf16, checkpoints (save, resume,
across layer implementations), exit MLPs under Transformer Engine, pipeline-based early
exit, the server, host synchronisations per decoded token.

Marked `gpu`: they run where CUDA is (`make test-gpu`) and skip elsewhere. With
EE_GPU_TESTS_ON_CPU=1 they run on CPU instead, with the CPU stand-in for Transformer
Engine's layout, so that the tests themselves are checked on any machine.
"""

import dataclasses
import math
import os

import pytest
import torch

from tests.helpers import assert_same_up_to_near_ties
from tests.training_fixtures import tiny_run_flags

pytestmark = pytest.mark.gpu

ON_CPU = bool(os.environ.get("EE_GPU_TESTS_ON_CPU")) and not torch.cuda.is_available()


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        return "cuda"
    if ON_CPU:
        return "cpu"
    pytest.skip("needs CUDA (EE_GPU_TESTS_ON_CPU=1 runs these tests on CPU)")


def _te_impl() -> str:
    """Transformer Engine on a GPU that has it; its CPU stand-in in a dry run."""
    from megatron.early_exit.models.layer_specs import transformer_engine_importable

    if ON_CPU:
        return "te_standin"
    if not transformer_engine_importable():
        pytest.skip("needs Transformer Engine")
    return "transformer_engine"


IMPLS = ["local", "te"]


def _impl(name: str) -> str:
    return _te_impl() if name == "te" else "local"


def _run(argv):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    return pretrain(parse_run_config(argv, world_size=1))


def _losses(history):
    return [e[k] for e in history for k in sorted(e) if "loss" in k]


def _flags(corpus, device, impl, iters, **extra):
    return tiny_run_flags(
        corpus,
        iters=iters,
        **{"--device": device, "--transformer-impl": impl, "--eval-iters": 0, "--lr-decay-iters": 12, **extra},
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_training_falls_saves_and_resumes_identically(dist1, corpus, device, impl, dtype, tmp_path):
    extra = {"--bf16": None} if dtype == "bf16" else {}
    impl = _impl(impl)
    straight = _run(_flags(corpus, device, impl, 12, **extra))
    assert straight.history[-1]["lm loss"] < straight.history[0]["lm loss"]
    assert all(torch.isfinite(torch.tensor(_losses(straight.history))))
    root = str(tmp_path / "ckpt")
    first = _run(_flags(corpus, device, impl, 6, **extra, **{"--save": root}))
    resumed = _run(_flags(corpus, device, impl, 12, **extra, **{"--load": root}))
    got, want = _losses(first.history + resumed.history), _losses(straight.history)
    tol = 1e-2 if dtype == "bf16" else 1e-5
    assert len(got) == len(want) and all(abs(g - w) <= tol * max(1.0, abs(w)) for g, w in zip(got, want)), (got, want)


def test_distributed_optimizer_without_gloo_groups(dist1, corpus, device, tmp_path):
    """GPU defaults: no gloo groups beside NCCL's; the distributed optimizer steps and saves."""
    root = str(tmp_path / "ckpt")
    flags = {"--use-distributed-optimizer": None, "--disable-gloo-process-groups": None, "--save": root}
    state = _run(_flags(corpus, device, "local", 4, **flags))
    assert state.history[-1]["lm loss"] < state.history[0]["lm loss"]
    resumed = _run(_flags(corpus, device, "local", 6, **{**flags, "--load": root}))
    assert len(resumed.history) == 2


@pytest.mark.parametrize("direction", ["local_to_te", "te_to_local"])
def test_exit_mlp_checkpoints_cross_layer_implementations(dist1, corpus, device, direction, tmp_path):
    """An exit MLP applies its layer's pre-MLP norm in both layouts: a checkpoint trained
    with one implementation gives the same logits, exits included, in the other."""
    from megatron.early_exit.inference import EarlyExit, generate
    from megatron.early_exit.inference.loading import load_model

    source, target = ("local", _te_impl()) if direction == "local_to_te" else (_te_impl(), "local")
    root = str(tmp_path / "ckpt")
    _run(
        _flags(
            corpus, device, source, 3, **{"--use-exit-mlp": None, "--untie-exit-output-weights": None, "--save": root}
        )
    )
    a, _, _ = load_model(root, device=torch.device(device), transformer_impl=source)
    b, _, _ = load_model(root, device=torch.device(device), transformer_impl=target)
    prompts = [[5, 17, 3, 9], [40, 2, 7, 13]]
    for strategy in (EarlyExit(threshold=0.0), EarlyExit(threshold=2.0)):  # every token at the first exit; full depth
        first, second = generate(a, prompts, strategy, 8), generate(b, prompts, strategy, 8)
        assert first.tokens == second.tokens and first.exit_layers == second.exit_layers
        for x, y in zip(first.logprobs, second.logprobs):
            assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4


@pytest.fixture(scope="module")
def trained(dist1, corpus, device, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpu_ckpt"))
    _run(_flags(corpus, device, "local", 20, **{"--save": root}))
    return root


def test_decoding_strategies_agree_on_the_device(trained, device):
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from megatron.early_exit.inference.loading import load_model

    model, _, _ = load_model(trained, device=torch.device(device))
    prompts = [[5, 17, 3, 9], [40, 2, 7, 13, 8, 1], [11, 12]]
    full = generate(model, prompts, FullDepth(), 16)
    assert generate(model, prompts, SelfSpeculative(exit_layer=1, num_draft=3), 16).tokens == full.tokens
    assert generate(model, prompts, EarlyExit(threshold=2.0), 16).tokens == full.tokens
    # A threshold between the first exit's confidences (every token leaving there), so that
    # about half the tokens exit early.
    probe = sorted(
        math.exp(lp) for row in generate(model, prompts, EarlyExit(threshold=0.0), 16).logprobs for lp in row[1:]
    )
    threshold = (probe[len(probe) // 2 - 1] + probe[len(probe) // 2]) / 2
    # Batched, alone and the stage pass run other GEMM shapes: on a GPU a decision within
    # rounding of the threshold (or of an argmax tie) may go either way.
    recompute = generate(model, prompts, EarlyExit(threshold=threshold), 16, top_n=2)
    pipeline = generate(model, prompts, EarlyExit(threshold=threshold, kv="pipeline"), 16, top_n=2)
    alone = [generate(model, [p], EarlyExit(threshold=threshold), 16, top_n=2) for p in prompts]
    rows_alone = dataclasses.replace(
        alone[0],
        **{
            f: [getattr(r, f)[0] for r in alone]
            for f in ("tokens", "exit_layers", "logprobs", "top_tokens", "top_logprobs")
        },
    )
    assert_same_up_to_near_ties(recompute, rows_alone, threshold)
    assert_same_up_to_near_ties(pipeline, recompute, threshold)
    assert any(d < recompute.num_layers for row in recompute.exit_layers for d in row)  # some tokens did exit


def test_one_host_sync_per_full_depth_step(trained, device):
    """On CUDA, torch's own sync detector counts the waits; on CPU the same calls are counted."""
    import warnings

    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from tests.sync_counter import SyncCounter

    model, _, _ = load_model(trained, device=torch.device(device))
    prompts = [[5, 17, 3, 9], [40, 2, 7, 13]]
    generate(model, prompts, FullDepth(), 4)  # warm-up: lazy buffers move once
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = generate(model, prompts, FullDepth(), 16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    else:
        with SyncCounter() as counter:
            result = generate(model, prompts, FullDepth(), 16)
        syncs = counter.total
    steps = result.num_steps + 1
    # One read of each step's tokens, plus the clock's start and end.
    assert syncs <= steps + 2, (syncs, steps)


def test_server_on_the_device_answers_like_the_engine(trained, device, tmp_path):
    import httpx

    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from tests.server_fixtures import Server

    srv = Server(trained, str(tmp_path / "server.log"))
    try:
        model, tokenizer, _ = load_model(trained, device=torch.device(device))
        want = generate(model, [[5, 17, 3, 9]], FullDepth(), 8, stop_tokens=(tokenizer.eod,)).tokens[0]
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            reply = client.put("/api", json={"prompts": ["5 17 3 9"], "tokens_to_generate": 8, "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["tokens"][0][4:] == want
            reply = client.post(
                "/v1/completions", json={"model": "tiny", "prompt": [5, 17, 3, 9], "max_tokens": 8, "temperature": 0}
            )
            assert reply.status_code == 200, reply.text
    finally:
        srv.stop()
