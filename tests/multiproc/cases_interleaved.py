"""The interleaved pipeline on 4 processes against a one-process reference.

Direct cases build PP=2 stages of 2 model chunks each (8 layers: chunk c of stage s holds
layers 2(2c+s)+1 .. 2(2c+s)+2) with DP=2, run the interleaved plan, and compare every loss
and every gradient with TP=PP=1 on the same weights and data. Training cases go through
the trainer (interleaved PP=2 x 2, DP=2), save a checkpoint and read it back in other layouts.
"""

import os

import torch
from megatron.core import parallel_state

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.init import initialize_layout_invariant
from megatron.early_exit.models.recompute import RecomputeConfig, recompute_units
from megatron.early_exit.parallel import allreduce_tied_embedding_grads, initialize_parallel
from megatron.early_exit.pipeline.interleaved import exit_places, interleaved_plan, layer_place, tied_embedding_stages
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.pipeline.plan import check_plan
from megatron.early_exit.pipeline.schedules import run_schedule
from tests.helpers import tiny_transformer_config
from tests.multiproc.cases_pipeline import (
    LAYERS,
    MBS,
    SEED,
    SEQ,
    VOCAB,
    _batches,
    _canonical_grads,
    _forward_step,
    _gather_pipeline,
    _reference,
)

DATA = os.environ.get("EE_TEST_DATA")
OUT = os.environ.get("EE_TEST_OUT")
CHUNKS = 2


def _build_chunks(ee_config, tied_model, pp, recompute=RecomputeConfig()):
    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = tiny_transformer_config(
        num_layers=LAYERS,
        pipeline_dtype=torch.float32,
        virtual_pipeline_model_parallel_size=CHUNKS,
        **recompute.transformer_config_kwargs(),
    )
    chunks = []
    for c in range(CHUNKS):
        model = EarlyExitGPTModel(
            config,
            ee_config,
            VOCAB,
            SEQ,
            pre_process=(rank, c) == (0, 0),
            post_process=(rank, c) == (pp - 1, CHUNKS - 1),
            share_embeddings_and_output_weights=tied_model,
            vp_stage=c,
            recompute_exit_heads=recompute.exit_heads,
        )
        initialize_layout_invariant(model, SEED, 0.02, LAYERS)
        first = LAYERS // (pp * CHUNKS) * (c * pp + rank) + 1
        assert [layer.layer_number for layer in model.decoder.layers] == list(
            range(first, first + LAYERS // (pp * CHUNKS))
        )
        chunks.append(model)
    return chunks


def _interleaved(ee_config, tied_model, pp, m, recompute=RecomputeConfig(), on_chunks=None):
    stages = tied_embedding_stages(ee_config, LAYERS, pp, CHUNKS, tied_model)
    initialize_parallel(1, pp, seed=SEED, tied_embedding_stages=stages)
    chunks = _build_chunks(ee_config, tied_model, pp, recompute)
    if on_chunks is not None:
        on_chunks(chunks)
    plan = interleaved_plan(pp, m, CHUNKS)
    check_plan(plan)
    links = StageLinks(
        parallel_state.get_pipeline_model_parallel_group(),
        (SEQ, MBS, chunks[0].config.hidden_size),
        torch.float32,
        torch.device("cpu"),
    )
    reports = run_schedule(
        plan[parallel_state.get_pipeline_model_parallel_rank()],
        _forward_step(ee_config),
        _batches(parallel_state.get_data_parallel_rank(), m),
        chunks,
        m,
        links,
    )
    assert links.in_flight == 0
    dp_group = parallel_state.get_data_parallel_group()
    for chunk in chunks:
        for p in chunk.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=dp_group)
                p.grad /= parallel_state.get_data_parallel_world_size()
    allreduce_tied_embedding_grads(chunks)
    grads = {}
    for c, chunk in enumerate(chunks):
        grads.update({_chunk_copy(k, c): v for k, v in _canonical_grads(chunk).items()})
    return _gather_pipeline(grads), reports


def _chunk_copy(key, chunk):
    return key.replace("copy:", f"copy:chunk{chunk}:") if key.startswith("copy:") else key


def _compare(ee_config, tied_model, m, pp=2):
    dp = torch.distributed.get_world_size() // pp
    ref, ref_reports = _reference(ee_config, tied_model, dp, m)
    got, reports = _interleaved(ee_config, tied_model, pp, m)
    copies = {k: v for k, v in got.items() if k.startswith("copy:")}
    got = {k: v for k, v in got.items() if not k.startswith("copy:")}
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert diff < 1e-5, {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    for name, g in copies.items():  # every copy of the embedding holds the summed gradient
        assert torch.allclose(g, got["embedding.word_embeddings.weight"], atol=1e-6), name
    r = parallel_state.get_data_parallel_rank()
    assert len(reports) == m
    for j, report in enumerate(reports):
        expected = ref_reports[r * m + j]
        for layer, value in report.exit_losses.items():
            assert abs(float(value) - float(expected.exit_losses[layer])) < 1e-5, (layer, j)
        if report.lm_loss is not None:
            assert abs(float(report.lm_loss) - float(expected.lm_loss)) < 1e-5
    return {"grad_diff": diff, "tied_copies": len(copies), "places": exit_places(ee_config, LAYERS, pp, CHUNKS)}


# Exits on the first chunk (layer 2: stage 0 chunk 0), a middle one (layer 4: stage 1 chunk 0;
# layer 5: stage 0 chunk 1) and the last (layer 7: stage 1 chunk 1).
EXITS = dict(exit_layer_nums=[2, 4, 5, 7], exit_layer_weight=[0.2, 0.3, 0.4, 0.1], use_exit_norm=True)


def case_pp2_v2_tied_exits_on_first_middle_last_chunks():
    result = _compare(EarlyExitConfig(**EXITS), tied_model=True, m=4)
    # Copies of the embedding: stage 1 chunk 0 (exit 4), stage 0 chunk 1 (exit 5), stage 1 chunk 1 (output layer).
    assert result["tied_copies"] == 3, result
    return result


def case_pp2_v2_untied_exit_mlp_untied_model():
    ee_config = EarlyExitConfig(**EXITS, untie_exit_output_weights=True, use_exit_mlp=True)
    return _compare(ee_config, tied_model=False, m=2)


def case_pp2_v2_tied_exits_untied_model_six_microbatches():
    return _compare(EarlyExitConfig(exit_layer_nums=[1, 6, 8]), tied_model=False, m=6)


# -- recomputation on chunks ---------------------------------------------------------

RECOMPUTE_SETTINGS = [
    RecomputeConfig("full", "uniform", 1),
    RecomputeConfig("full", "uniform", 1, exit_heads=True),
    RecomputeConfig("full", "block", 1),
    RecomputeConfig(exit_heads=True),
]


def _count_calls(chunks, calls):
    """Forward calls of each layer's core attention and each exit's output layer, keyed
    by (chunk, local layer index) and ("exit", layer number)."""

    def counter(key):
        calls[key] = 0
        return lambda *unused: calls.__setitem__(key, calls[key] + 1)

    for c, chunk in enumerate(chunks):
        for i, layer in enumerate(chunk.decoder.layers):
            layer.self_attention.core_attention.register_forward_pre_hook(counter((c, i)))
        for num, head in chunk.exits.items():
            head.output_layer.register_forward_pre_hook(counter(("exit", int(num))))


def _expected_calls(recompute, m, layers_per_chunk, exits):
    """Calls per training step: once per microbatch, twice where recomputed. Units count
    each chunk's own layers (local index 0 is the chunk's first layer, whatever its number)."""
    recomputed = {
        start
        for start, end, r in recompute_units(
            layers_per_chunk, recompute.granularity, recompute.method, recompute.num_layers
        )
        if r
        for start in range(start, end)
    }
    calls = {(c, i): m * (2 if i in recomputed else 1) for c in range(CHUNKS) for i in range(layers_per_chunk)}
    calls.update({("exit", num): m * (2 if recompute.exit_heads else 1) for num in exits})
    return calls


def case_pp2_v2_recomputation_equals_none():
    """Per-parameter gradients and every loss with each recomputation setting equal the
    same interleaved layout without it, exits on all four chunks."""
    ee_config, m, pp = EarlyExitConfig(**EXITS), 4, 2
    ref, ref_reports = _interleaved(ee_config, True, pp, m)
    rank, per_chunk = parallel_state.get_pipeline_model_parallel_rank(), LAYERS // (pp * CHUNKS)
    grad_diff = loss_diff = 0.0
    for recompute in RECOMPUTE_SETTINGS:
        calls = {}
        got, reports = _interleaved(
            ee_config, True, pp, m, recompute, on_chunks=lambda chunks: _count_calls(chunks, calls)
        )
        local_exits = [n for n in EXITS["exit_layer_nums"] if layer_place(n, LAYERS, pp, CHUNKS)[0] == rank]
        assert calls == _expected_calls(recompute, m, per_chunk, local_exits), (recompute, calls)
        assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
        grad_diff = max(grad_diff, max(float((got[k] - ref[k]).abs().max()) for k in ref))
        for report, expected in zip(reports, ref_reports, strict=True):
            assert report.exit_losses.keys() == expected.exit_losses.keys()
            losses = [(report.exit_losses[k], expected.exit_losses[k]) for k in expected.exit_losses]
            if expected.lm_loss is not None:
                losses.append((report.lm_loss, expected.lm_loss))
            loss_diff = max([loss_diff] + [abs(float(a) - float(b)) for a, b in losses])
    assert all(float(g.abs().sum()) > 0 for k, g in ref.items() if "decoder.layers" in k), "every layer has a gradient"
    diffs = torch.tensor([grad_diff, loss_diff])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    return {"settings": len(RECOMPUTE_SETTINGS), "max_grad_diff": float(diffs[0]), "max_loss_diff": float(diffs[1])}


# -- training, checkpoints across layouts -----------------------------------------

TRAIN_FLAGS = {
    "--num-layers": 8,
    "--exit-layer-nums": "2 5 7",
    "--exit-layer-weight": "0.3 0.3 0.3",
    "--pipeline-model-parallel-size": 2,
}


def _pipeline_logits(model, tokens, pos):
    """Logits of one batch through a stage's chunks at any PP, chunks taking turns around
    the ring (virtual stage u on stage u % PP, chunk u // PP); None off the last stage."""
    from megatron.early_exit.pipeline.interleaved import model_chunks

    chunks = [c.module if hasattr(c, "module") else c for c in model_chunks(model)]
    pp, rank = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    total, x, logits = pp * len(chunks), None, None
    with torch.no_grad():
        for u in range(total):
            if u % pp != rank:
                continue
            chunk = chunks[u // pp]
            chunk.eval()
            if u > 0:
                x = torch.empty(tokens.shape[1], tokens.shape[0], chunk.config.hidden_size)
                torch.distributed.recv(x, src=ranks[(rank - 1) % pp])
            chunk.set_input_tensor(x)
            out = chunk(tokens, pos, None)
            if u < total - 1:
                torch.distributed.send(out.hidden_states.contiguous(), dst=ranks[(rank + 1) % pp])
            else:
                logits = out.final
    return logits


def _batch():
    from tests.helpers import make_batch
    from tests.training_fixtures import VOCAB as TRAIN_VOCAB

    tokens, _, pos = make_batch(seed=3, batch=2, seq=32, vocab=TRAIN_VOCAB)
    return tokens, pos


def case_train_pp2_v2_save_and_load_in_other_layouts():
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain
    from tests.training_fixtures import tiny_run_flags

    save = os.path.join(OUT, "interleaved_ckpt")
    flags = {**TRAIN_FLAGS, "--num-layers-per-virtual-pipeline-stage": 2, "--save": save}
    state = pretrain(parse_run_config(tiny_run_flags(DATA, iters=3, **flags)))
    tokens, pos = _batch()
    logits = {"pp2 x v2 (trained)": _pipeline_logits(state.model, tokens, pos)}
    # The same run's checkpoint, resumed with 4 chunks per stage (optimizer state included).
    resumed = pretrain(
        parse_run_config(
            tiny_run_flags(
                DATA,
                iters=3,
                **{**flags, "--num-layers-per-virtual-pipeline-stage": 1, "--load": save, "--save": False},
            )
        )
    )
    assert resumed.iteration == 3 and len(resumed.model.chunks) == 4
    logits["pp2 x v4 (resumed)"] = _pipeline_logits(resumed.model, tokens, pos)
    for pp in (2, 1):  # inference, no virtual stages
        initialize_parallel(1, pp)
        model, _, config = load_model(save, pipeline_model_parallel_size=pp)
        assert config.num_layers == 8 and config.early_exit.exit_layer_nums == [2, 5, 7]
        logits[f"pp{pp} inference"] = _pipeline_logits(model, tokens, pos)
    # Each layout's last stage holds its logits; the one-process load is everywhere.
    reference = logits.pop("pp1 inference")
    diffs = {name: float((value - reference).abs().max()) for name, value in logits.items() if value is not None}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, diffs)
    for name in logits:
        seen = [d[name] for d in everyone if name in d]
        assert len(seen) == 2 and max(seen) < 1e-5, (name, seen)  # one last stage per pipeline (DP=2)
    return {
        "history": state.history,
        "validation": state.validation,
        "logit_diffs": {name: max(d[name] for d in everyone if name in d) for name in logits},
    }
