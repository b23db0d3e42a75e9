"""Small models and batches shared by the tests, and waiting on a condition."""

import time

import torch
from megatron.core import parallel_state


def wait_until(condition, timeout: float = 60, interval: float = 0.02) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass; its last value (a test
    asserts it, so a slow machine waits longer instead of failing)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(interval)
    return bool(condition())


def tiny_transformer_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    if kwargs.get("gated_linear_unit"):
        import torch.nn.functional as F

        kwargs.setdefault("activation_func", F.silu)
    return TransformerConfig(**kwargs)


def build_gpt(config, vocab_size=96, seq_length=16, tied=True):
    """megatron-core's GPTModel with our CPU-capable local spec."""
    from megatron.core.models.gpt import GPTModel

    from megatron.early_exit.models.layer_specs import get_block_spec

    return GPTModel(
        config=config,
        transformer_layer_spec=get_block_spec(config, config.num_layers),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
    )


def make_batch(seed=0, batch=2, seq=16, vocab=96):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), position_ids


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different keys: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def allreduce_sequence_parallel_grads(model):
    """What finalize_model_grads does for SP-marked params when no DDP wraps the model."""
    group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=group)


def build_ee_gpt(config, ee_config, vocab_size=96, seq_length=16, tied=True):
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel

    return EarlyExitGPTModel(
        config,
        ee_config,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        share_embeddings_and_output_weights=tied,
    )


def ee_loss_and_grads(model, ee_config, batch, loss_mask=None, iteration=0):
    """Combined early-exit loss and full (TP-gathered) gradients of one forward/backward."""
    from megatron.early_exit.loss import early_exit_loss
    from megatron.early_exit.sharding import full_state_dict

    tokens, labels, pos = batch
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float)
    model.zero_grad()
    out = model(tokens, pos, None, labels=labels)
    loss, report = early_exit_loss(out, loss_mask, ee_config, iteration)
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    return loss.detach(), full_state_dict(model, grads=True), report


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, state: dict, gated: bool | None = None, strict: bool = True) -> None:
    """Copy full tensors into this rank's shards; every parameter must be present when strict."""
    if gated is None:
        gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    from megatron.early_exit.sharding import shard_full_tensor

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        key = name[len("module.") :] if name.startswith("module.") else name
        if key not in state:
            if strict:
                raise KeyError(f"parameter '{key}' missing from the state dict")
            continue
        shard = shard_full_tensor(state[key], param, name, gated, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"shape mismatch for '{key}': expected {tuple(param.shape)}, got {tuple(shard.shape)}")
        param.copy_(shard)


# Exit-head structures (EarlyExitConfig flags) the model tests cover.
HEADS = {
    "plain_tied": dict(),
    "norm": dict(use_exit_norm=True),
    "mlp": dict(use_exit_mlp=True, use_exit_norm=True),
    "block": dict(use_exit_block=True),
    "untied": dict(untie_exit_output_weights=True, use_exit_norm=True),
    "pre_exit": dict(pre_exit=True, use_exit_norm=True),
    "pre_exit_block_untied": dict(pre_exit=True, use_exit_block=True, untie_exit_output_weights=True),
    "temperature_dynamic": dict(
        use_exit_norm=True, exit_layer_temperature=[2.0, 0.5], use_dynamic_exit_layer_weight=True
    ),
}


# Local parameter names -> the TE layout's (what megatron-core's local spec maps in checkpoints).
_RENAMES = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)


def _renamed(state: dict, to_te: bool) -> dict:
    out = {}
    for name, value in state.items():
        for local, te in _RENAMES:
            name = name.replace(local, te) if to_te else name.replace(te, local)
        out[name] = value
    return out


def te_names(state: dict) -> dict:
    return _renamed(state, to_te=True)


def local_names(state: dict) -> dict:
    return _renamed(state, to_te=False)


@torch.no_grad()
def spread_vectors(model, seed=1):
    """Norm weights (and biases) away from their construction values."""
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.ndim == 1:
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))


def assert_same_up_to_near_ties(got, want, threshold: float, margin: float = 1e-3) -> int:
    """Two greedy early-exit GenerationResults of the same prompts (with top_n >= 2), equal
    token by token except where the decision was within `margin` of a tie: runs of other
    GEMM shapes (a batch against a row alone, the stage pass against the step) round
    differently on a GPU, so a confidence that close to `threshold`, or two top
    probabilities that close, may go either way. A row may diverge once, at such a token;
    what follows has another history and is not compared. Returns the rows that diverged."""
    import math

    def near_tie(result, row, i):
        conf = math.exp(result.logprobs[row][i])
        exited = result.exit_layers[row][i] < result.num_layers
        top = [math.exp(lp) for lp in result.top_logprobs[row][i][:2]]
        return (exited and abs(conf - threshold) <= margin) or (len(top) == 2 and top[0] - top[1] <= margin)

    diverged = 0
    for row, (a, b) in enumerate(zip(got.tokens, want.tokens)):
        for i, (x, y) in enumerate(zip(zip(a, got.exit_layers[row]), zip(b, want.exit_layers[row]))):
            if x != y:
                assert near_tie(got, row, i) or near_tie(want, row, i), (
                    f"row {row} token {i}: (token, exit layer) {x} vs {y}, no decision within {margin} of a tie"
                )
                diverged += 1
                break
        else:
            assert len(a) == len(b), (row, a, b)
    assert len(got.tokens) == len(want.tokens)
    return diverged


def tiny_model_flags(
    num_layers: int, seq_length: int, vocab_size: int, exits, seed: int, divisible_by: int = 64, init_method_std="0.3"
) -> list:
    """Training flags of the tests' tiny random models: hidden 32, 4 heads, RMSNorm, SwiGLU, no
    biases, untied output, NullTokenizer over `vocab_size` ids, an exit with its norm at each of
    `exits` (`init_method_std` None: megatron-core's default)."""
    flags = [
        "--num-layers",
        str(num_layers),
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--seq-length",
        str(seq_length),
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--lr",
        "1e-3",
        "--mock-data",
        "--seed",
        str(seed),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(vocab_size),
        "--make-vocab-size-divisible-by",
        str(divisible_by),
        "--normalization",
        "RMSNorm",
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
    ]
    if init_method_std is not None:
        flags += ["--init-method-std", init_method_std]
    return flags + ["--exit-layer-nums", *map(str, exits), "--use-exit-norm"]


def write_random_checkpoint(root: str, flags: list, padded_vocab_size: int):
    """A freshly initialised model of the training `flags` (one process) saved under `root` at
    iteration 1, as a training run would store it; returns the model."""
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    args = parse_args(flags, world_size=1)
    model = build_model(build_run_config(args), torch.device("cpu"), padded_vocab_size)
    save_weights(root, vars(args), model, iteration=1)
    return model
