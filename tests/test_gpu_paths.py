"""GPU conditions emulated on CPU: what the CUDA path decides, checked without a GPU.

Apex's fused softmax kernels are replaced by plain-PyTorch modules with the kernels'
semantics (the causal one ignores any mask it is given), so the decisions around
them run here exactly as they would on a GPU host.
"""

import sys
import types

import pytest
import torch

from tests.training_fixtures import tiny_run_flags


def _fake_kernels():
    """Modules named like apex's fused softmax kernels, computing what they compute."""

    def upper_triang_forward(x, scale):  # [b*np, sq, sk]: causal, any mask ignored
        sq, sk = x.shape[-2:]
        causal = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        return torch.softmax((x.float() * scale).masked_fill(causal, -10000.0), -1).to(x.dtype)

    def masked_forward(x, mask, scale):  # [b, np, sq, sk], mask True = masked out
        return torch.softmax((x.float() * scale).masked_fill(mask, -10000.0), -1).to(x.dtype)

    def softmax_forward(x, scale):
        return torch.softmax(x.float() * scale, -1).to(x.dtype)

    def get_batch_per_block(sq, sk, b, np):
        return 1

    unsupported = lambda *a: (_ for _ in ()).throw(NotImplementedError("backward"))  # noqa: E731
    return {
        "scaled_upper_triang_masked_softmax_cuda": types.SimpleNamespace(
            forward=upper_triang_forward, backward=unsupported
        ),
        "scaled_masked_softmax_cuda": types.SimpleNamespace(
            forward=masked_forward, backward=unsupported, get_batch_per_block=get_batch_per_block
        ),
        "scaled_softmax_cuda": types.SimpleNamespace(forward=softmax_forward, backward=unsupported),
    }


@pytest.fixture
def fake_apex_kernels(monkeypatch):
    for name, module in _fake_kernels().items():
        monkeypatch.setitem(sys.modules, name, module)


def _args(**overrides):
    from megatron.early_exit.training.arguments import parse_args

    return parse_args(
        tiny_run_flags(None, **{"--mock-data": None, "--tokenizer-type": False, **overrides}), world_size=1
    )


def test_fused_softmax_only_when_its_kernels_import(monkeypatch):
    """GPU without apex: megatron-core imports the kernel unguarded in the attention
    forward, so masked_softmax_fusion must stay off (it raised ImportError)."""
    from megatron.early_exit.training.arguments import build_run_config

    def build_transformer_config(args, device):
        return build_run_config(args).model_config(64).transformer_config(device=device)

    for name in _fake_kernels():
        monkeypatch.delitem(sys.modules, name, raising=False)
    args = _args(**{"--bf16": None})
    assert not build_transformer_config(args, torch.device("cuda")).masked_softmax_fusion
    assert not build_transformer_config(args, torch.device("cpu")).masked_softmax_fusion
    for name, module in _fake_kernels().items():
        monkeypatch.setitem(sys.modules, name, module)
    assert build_transformer_config(args, torch.device("cuda")).masked_softmax_fusion
    assert not build_transformer_config(args, torch.device("cpu")).masked_softmax_fusion


# -- host-device synchronisation per decoded token ------------------------------------


@pytest.mark.parametrize(
    "strategy,per_step",
    [
        ("full", 1),  # the step's tokens read once
        ("speculative", 1),  # a draft step reads its token; verification reads the whole batch once
        ("early_exit", 3),  # one more at each of the two exits a step reaches: their decisions skip layers
        ("early_exit_propagate", 3),
        ("early_exit_pipeline", 3),  # the stage pass (kv="pipeline"): decided rows cut out on the device
    ],
)
def test_host_syncs_per_decoder_step(dist1, strategy, per_step):
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from tests.inference_models import PROMPTS, build_model
    from tests.sync_counter import SyncCounter

    chosen = {
        "full": FullDepth(),
        "speculative": SelfSpeculative(exit_layer=1, num_draft=3),
        "early_exit": EarlyExit(threshold=0.5),
        "early_exit_propagate": EarlyExit(threshold=0.5, kv="propagate"),
        "early_exit_pipeline": EarlyExit(threshold=0.5, kv="pipeline"),
    }
    model = build_model("untied_mlp")
    with SyncCounter() as counter:
        result = generate(model, PROMPTS, chosen[strategy], max_new_tokens=16)
    steps = result.num_steps + 1  # the prefill is a step too
    setup = counter.counts["to(device)"]  # the model's buffers, once per call
    assert setup <= 1, counter.counts
    assert counter.total - setup <= per_step * steps, (counter.counts, steps)
    assert counter.counts["tensor(device=)"] == 0, counter.counts  # host data reaches the device without a wait


def test_training_step_copies_batches_without_waiting(dist1):
    """Batches reach the device by non-blocking copies (from pinned memory on CUDA)."""
    from megatron.early_exit.training.arguments import build_run_config
    from megatron.early_exit.training.trainer import build_model, forward_step
    from tests.sync_counter import SyncCounter

    args = _args()
    model = build_model(build_run_config(args), torch.device("cpu"), 64)
    tokens = torch.randint(0, 64, (2, 32))
    batch = {
        "tokens": tokens,
        "labels": tokens.roll(-1, 1),
        "loss_mask": torch.ones(2, 32),
        "position_ids": torch.arange(32).expand(2, 32),
    }
    with SyncCounter() as counter:
        output, loss_func = forward_step(
            iter([batch]), model, build_run_config(args), 0, torch.device("cpu"), model.ee_config
        )
    assert not {t.data_ptr() for t in batch.values()} & set(counter.blocking_moves)
    assert torch.isfinite(loss_func(output)[0])


def test_attention_without_mask_where_none_is_needed(dist1, monkeypatch):
    """A prefill from position 0 with equal lengths is plain causal and a one-token step
    of equal lengths sees every key: no explicit mask, so CUDA's SDPA may use its flash
    or memory-efficient kernels (an explicit boolean mask rules them out)."""
    import torch.nn.functional as F

    from megatron.early_exit.inference import FullDepth, generate, layers
    from tests.inference_models import build_model

    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
    model = build_model()
    same = generate(model, [[5, 17, 3], [40, 2, 77]], FullDepth(), max_new_tokens=4)
    assert calls and all(no_mask for _, no_mask, _ in calls)
    assert all(causal == (width > 1) for width, _, causal in calls)
    calls.clear()
    ragged = generate(model, [[5, 17, 3], [40, 2]], FullDepth(), max_new_tokens=4)  # rows differ: masked
    assert calls and not any(no_mask for _, no_mask, _ in calls)
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", real)
    for prompts, result in (([[5, 17, 3], [40, 2, 77]], same), ([[5, 17, 3], [40, 2]], ragged)):
        alone = [generate(model, [p], FullDepth(), max_new_tokens=4).tokens[0] for p in prompts]
        assert result.tokens == alone


def test_decoding_never_calls_the_compiled_bias_dropout_add(dist1, monkeypatch):
    """The fused (torch.compile'd) bias-dropout-add would recompile for every decode
    shape; inference uses the unfused sum, and leaves the model's setting as it was."""
    from megatron.core.fusions import fused_bias_dropout

    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from tests.inference_models import PROMPTS, build_model

    def refuse(*args, **kwargs):
        raise AssertionError("fused bias-dropout-add called while decoding")

    model = build_model("untied_mlp")
    expected = generate(model, PROMPTS, EarlyExit(threshold=0.5), max_new_tokens=6).tokens
    monkeypatch.setattr(fused_bias_dropout, "bias_dropout_add_fused_inference", refuse)
    monkeypatch.setattr(fused_bias_dropout, "bias_dropout_add_fused_train", refuse)
    monkeypatch.setattr(model.config, "bias_dropout_fusion", True)
    assert generate(model, PROMPTS, EarlyExit(threshold=0.5), max_new_tokens=6).tokens == expected
    generate(model, PROMPTS, FullDepth(), max_new_tokens=3)
    assert model.config.bias_dropout_fusion is True


def _document_mask(seq: int, boundary: int) -> torch.Tensor:
    """[1, 1, s, s], True = masked: causal within each of two documents."""
    pos = torch.arange(seq)
    doc = (pos >= boundary).long()
    visible = (pos.view(-1, 1) >= pos.view(1, -1)) & (doc.view(-1, 1) == doc.view(1, -1))
    return (~visible).view(1, 1, seq, seq)


@pytest.mark.parametrize("impl", ["local", "te_standin"])
def test_reset_attention_mask_survives_the_fused_softmax(dist1, fake_apex_kernels, impl):
    """On GPU, apex's fused causal softmax (like TE's causal mask type) ignores the mask it
    is given: with --reset-attention-mask the layers must ask for an arbitrary mask."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict, tiny_transformer_config

    seq, batch = 32, 2
    tokens = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(batch, seq)
    mask = _document_mask(seq, 12).expand(batch, 1, seq, seq)

    def logits(fused: bool, document_mask: bool, state=None):
        config = tiny_transformer_config(
            params_dtype=torch.bfloat16, bf16=True, masked_softmax_fusion=fused, transformer_impl=impl
        )
        model = EarlyExitGPTModel(config, EarlyExitConfig(), 96, seq, document_mask=document_mask).eval()
        if state is not None:
            load_full_state_dict(model, state)
        with torch.no_grad():
            return model(tokens, pos, mask).final.float(), full_state_dict(model)

    reference, state = logits(fused=False, document_mask=True)  # the CPU path honours the mask
    fused, _ = logits(fused=True, document_mask=True, state=state)
    assert torch.allclose(fused, reference, atol=2e-2), (fused - reference).abs().max()
    causal_only, _ = logits(fused=True, document_mask=False, state=state)  # the defect: boundaries dropped
    assert not torch.allclose(causal_only[:, 12:], reference[:, 12:], atol=2e-2)
