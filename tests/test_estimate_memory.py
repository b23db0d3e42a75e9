"""tools/estimate_memory.py: parameter counts equal the built model's, in-flight depths
follow the plans, and the estimate is within 15% of the measured CPU peak of training steps
(measured as benchmarks/memory_recompute.py explains: the resident-set high-water mark of
a fresh process, reset just before the model is built)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks.memory_recompute import estimate_flags, measure_peak, run_flags
from tests.conftest import ROOT

SMALL = dict(num_layers=4, hidden=256, ffn=704, heads=8, vocab=8192, seq=256, micro_batch=4)
FULL_UNIFORM = [
    "--recompute-granularity",
    "full",
    "--recompute-method",
    "uniform",
    "--recompute-num-layers",
    "1",
    "--recompute-exit-heads",
]
BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"]


@pytest.mark.parametrize(
    "exit_flags",
    [
        {},
        {"exit_layer_nums": [1, 3], "use_exit_norm": True},
        {"exit_layer_nums": [2, 3], "untie_exit_output_weights": True, "use_exit_mlp": True},
        {"exit_layer_nums": [3], "use_exit_block": True, "pre_exit": True},
    ],
)
@pytest.mark.parametrize("untie", [False, True])
def test_parameter_counts_equal_the_model(dist1, exit_flags, untie):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.memory import TrainingShape, parameter_counts
    from megatron.early_exit.models.builder import build_model
    from megatron.early_exit.models.model_config import ModelConfig

    ee = EarlyExitConfig(exit_layer_weight=[1.0] * len(exit_flags.get("exit_layer_nums", [])), **exit_flags)
    config = ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=256,
        max_position_embeddings=32,
        ffn_hidden_size=96,
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=True,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=untie,
        early_exit=ee,
    )
    model = build_model(config, device="cpu")
    assert parameter_counts(config, TrainingShape()) == [sum(p.numel() for p in model.parameters())]


def test_in_flight_depth_follows_the_plan():
    from megatron.early_exit.memory import TrainingShape, max_in_flight
    from megatron.early_exit.pipeline.plan import build_fill_plan

    assert max_in_flight(TrainingShape(pipeline_model_parallel_size=4, num_microbatches=8)) == [4, 3, 2, 1]
    assert max_in_flight(TrainingShape(pipeline_model_parallel_size=4, num_microbatches=2)) == [2, 2, 2, 1]
    fill = build_fill_plan(4, [0, 1, 2, 3], 2, 2, 2.0)
    with_fill = max_in_flight(TrainingShape(pipeline_model_parallel_size=4, num_microbatches=8, fill=fill))
    assert with_fill[0] > 4 and with_fill[3] >= 1


def test_recomputation_and_exit_heads_change_the_right_terms():
    from megatron.early_exit.memory import estimate
    from tools.estimate_memory import shape_of

    base = run_flags(**SMALL, exits=[1, 3])
    plain = estimate(*shape_of(base, 1))[0].terms
    full = estimate(*shape_of(base + FULL_UNIFORM, 1))[0].terms
    assert full["activations"] < plain["activations"] / 10 and full["backward buffer"] > plain["backward buffer"]
    assert full["exit logits"] == pytest.approx(plain["exit logits"] / 2)  # two exits, one alive at a time
    assert full["parameters"] == plain["parameters"]


def test_exit_mlps_and_distillation_are_counted():
    """An exit MLP's saved tensors and self-distillation's fp32 vocabulary-sized buffers."""
    from megatron.early_exit.memory import estimate
    from tools.estimate_memory import shape_of

    base = run_flags(**SMALL, exits=[1, 3])
    plain = estimate(*shape_of(base, 1))[0].terms
    mlp = estimate(*shape_of(base + ["--use-exit-mlp"], 1))[0].terms
    distill = estimate(*shape_of(base + ["--exit-distill-weight", "0.5"], 1))[0].terms
    s, b, h, ffn, vocab = SMALL["seq"], SMALL["micro_batch"], SMALL["hidden"], SMALL["ffn"], SMALL["vocab"]
    logits = 4 * s * b * vocab  # fp32
    assert plain["exit activations"] == plain["distillation"] == 0
    # Two exits alive together, each: SwiGLU's five [s, b, ffn] tensors and its norm's two [s, b, h] (fp32).
    assert mlp["exit activations"] == 2 * 4 * (5 * s * b * ffn + 2 * s * b * h)
    # Teacher copy and log-probabilities, then two probability tensors per exit.
    assert distill["distillation"] == logits * 2 + 2 * 2 * logits
    assert distill["exit logits"] == plain["exit logits"]


def test_fits_only_with_a_margin_for_what_the_estimate_leaves_out():
    from megatron.early_exit.memory import CUDA_RESERVE_GB, HEAD_TERMS, StageMemory, format_table

    def stage(gb):
        terms = {"parameters": gb * 1e9, "backward buffer": 0.0, **{n: 0.0 for n in HEAD_TERMS}}
        return [StageMemory(0, 1, [], 1, terms)]

    assert (
        "; does NOT fit in 80 GB GPUs with a margin of 9.90 GB (CUDA context and communication buffers 2 GB, "
        "allocator fragmentation 10%)" in format_table(stage(79.0), 80)
    )
    assert "; fits in 80 GB GPUs with a margin of 8.80 GB" in format_table(stage(68.0), 80)
    assert CUDA_RESERVE_GB > 0


@pytest.mark.slow
def test_ee_llm_scripts_on_80gb_gpus():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "estimate_memory.py"), "--gpu-memory-gb", "80"]
        + [
            a
            for size in ("1.3B", "7B", "13B", "30B")
            for a in ("--script", os.path.join(ROOT, "examples", "ee_llm", f"pretrain_early_exit_{size}.sh"))
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("largest per rank")]
    assert len(verdicts) == 4 and all("in 80 GB GPUs" in v and "(largest term: " in v for v in verdicts)
    assert "TP 4 PP 4" in proc.stdout and "exit logits" in proc.stdout


def test_bad_script_is_one_line(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("exit 3\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "estimate_memory.py"), "--script", str(bad)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --script {bad}")


CONFIGS = {
    "no pipeline, no exits": (run_flags(**SMALL, exits=[]), 1),
    "no pipeline, exits, full recomputation": (run_flags(**SMALL, exits=[1, 3], recompute=FULL_UNIFORM), 1),
    "no pipeline, exits, block recomputation": (run_flags(**SMALL, exits=[2], recompute=BLOCK), 1),
    "no pipeline, exit MLPs, self-distillation": (
        run_flags(
            **SMALL,
            exits=[1, 3],
            recompute=["--use-exit-mlp", "--untie-exit-output-weights", "--exit-distill-weight", "0.5"],
        ),
        1,
    ),
    "1F1B PP=2, 4 microbatches, exits, selective": (
        run_flags(**SMALL, exits=[1, 3], recompute=["--recompute-activations"], pp=2, microbatches=4),
        2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimate_within_15_percent_of_measured_peak(name):
    argv, nproc = CONFIGS[name]
    measured = measure_peak(argv, nproc)
    estimated = estimate_flags(argv, world_size=nproc)
    assert len(measured) == len(estimated) == nproc
    for stage, (m, e) in enumerate(zip(measured, estimated)):
        assert abs(e - m) <= 0.15 * m, (name, stage, m / 1e6, e / 1e6)


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 8), (2, 4, 8), (2, 2, 2)])
def test_interleaved_in_flight_is_megatron_cores_warmup_plus_the_steady_pair(p, v, m):
    """Read off the interleaved plan: megatron-core's warm-up forwards 2(p-1-s) + (v-1)p
    (all of v*m when fewer) plus the steady pair's forward."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from megatron.early_exit.memory import TrainingShape, max_in_flight

    shape = TrainingShape(pipeline_model_parallel_size=p, num_microbatches=m, num_model_chunks=v)
    got = max_in_flight(shape)
    for s in range(p):
        warmup = min(2 * (p - 1 - s) + (v - 1) * p, v * m)
        # megatron-core's own count for rank s (the layout given as its communicator's group).
        layout = SimpleNamespace(
            pp_group=SimpleNamespace(size=lambda: p, rank=lambda: s), virtual_pipeline_model_parallel_size=v
        )
        assert get_pp_rank_microbatches(m, v, p, p2p_communicator=layout)[2] == warmup
        assert got[s] == warmup + (1 if warmup < v * m else 0), (s, got)
    assert got[0] > max_in_flight(TrainingShape(pipeline_model_parallel_size=p, num_microbatches=m))[0]


@pytest.mark.parametrize("untie", [False, True])
def test_interleaved_parameter_counts_equal_the_chunks(untie):
    """Each chunk with tied exits keeps its own embedding copy (as the interleaved cases in
    cases_interleaved.py count them: 8 layers, PP=2 x 2 chunks)."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.memory import TrainingShape, parameter_counts
    from megatron.early_exit.models.model_config import ModelConfig

    ee = EarlyExitConfig(exit_layer_nums=[2, 4, 5, 7], exit_layer_weight=[1.0] * 4, use_exit_norm=True)
    config = ModelConfig(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=256,
        max_position_embeddings=32,
        ffn_hidden_size=96,
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=True,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=untie,
        early_exit=ee,
    )
    plain = parameter_counts(config, TrainingShape(pipeline_model_parallel_size=2))
    chunked = parameter_counts(config, TrainingShape(pipeline_model_parallel_size=2, num_model_chunks=2))
    vocab = 256 * 64
    # Virtual stages u = chunk*2 + stage: exits 2 (u0), 4 (u1), 5 (u2), 7 (u3). Without chunks
    # stage 0 (exits 2, 4) holds the embedding and stage 1 one copy (or the tied output layer);
    # with them u1 and u2 each keep a copy besides: one more per stage.
    assert chunked == [plain[0] + vocab, plain[1] + vocab]
