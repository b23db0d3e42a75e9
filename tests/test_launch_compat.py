"""EE-LLM's and Megatron-LM's launch flags run unchanged, and long runs are operable:
flash attention, trackers (wandb offline), timers, run control (exit interval, duration,
SIGTERM), --skip-train, sample-based training and batch ramp-up, --load-iteration."""

import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import wait_until
from tests.training_fixtures import run_training, tiny_run_flags

# -- EE-LLM's scripts, as written (examples/ee_training/7B.sh, examples/ee_tuning/tune/
# llama2_13B_8_exit_mlp_pt.sh), their shell variables substituted.

BLEND = [
    "redpajama-arxiv",
    "redpajama-book",
    "redpajama-c4",
    "redpajama-cc",
    "redpajama-pile-stackexchange",
    "redpajama-stack-code",
    "redpajama-wiki",
    "the-pile-europarl",
    "the-pile-freelaw",
    "the-pile-hackernews",
    "the-pile-nih",
    "the-pile-philpaper",
    "the-pile-pubmed-abstract",
    "the-pile-pubmed-central",
    "the-pile-uspto",
]
WEIGHTS = [
    "0.0362",
    "0.0657",
    "0.2264",
    "0.4491",
    "0.0246",
    "0.0810",
    "0.0548",
    "0.0010",
    "0.0162",
    "0.0006",
    "0.0005",
    "0.0006",
    "0.0065",
    "0.0318",
    "0.0050",
]


def ee_llm_data_path(data_home):
    out = []
    for weight, name in zip(WEIGHTS, BLEND):
        out += [weight, f"{data_home}/{name}/all"]
    return out


def ee_llm_7b_flags(data_home, tokenizer, checkpoint):
    save_interval = 240 * 10
    return [
        # GPT_ARGS
        "--tensor-model-parallel-size",
        "1",
        "--pipeline-model-parallel-size",
        "4",
        "--num-layers",
        "32",
        "--hidden-size",
        "4096",
        "--num-attention-heads",
        "32",
        "--seq-length",
        "2048",
        "--max-position-embeddings",
        "2048",
        "--sequence-parallel",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2048",
        "--lr",
        "0.0003",
        "--train-iters",
        str(save_interval * 80),
        "--lr-decay-style",
        "cosine",
        "--min-lr",
        "3.0e-5",
        "--weight-decay",
        "1e-1",
        "--lr-warmup-iters",
        "2000",
        "--adam-beta1",
        "0.9",
        "--adam-beta2",
        "0.95",
        "--init-method-std",
        "0.01",
        "--clip-grad",
        "1.0",
        "--bf16",
        "--disable-bias-linear",
        "--use-flash-attn",
        "--normalization",
        "RMSNorm",
        "--position-embedding-type",
        "rope",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        # EE_ARGS
        "--untie-exit-output-weights",
        "--exit-layer-nums",
        "9",
        "17",
        "--exit-layer-weight",
        "0.1",
        "0.2",
        "--pre-exit",
        # DATA_ARGS
        "--data-path",
        *ee_llm_data_path(data_home),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tokenizer,
        "--split",
        "990,9,1",
        # OUTPUT_ARGS
        "--log-interval",
        "2",
        "--log-timers-to-tracker",
        "--save-interval",
        str(save_interval),
        "--eval-interval",
        str(240 * 5),
        "--eval-iters",
        "10",
        "--wandb-project",
        "EE-LLM",
        "--wandb-group",
        "7B-EXIT-8-16-untie-800B",
        "--wandb-exp-name",
        "1202-0630",
        "--save",
        checkpoint,
        "--load",
        checkpoint,
    ]


def ee_llm_13b_tuning_flags(data_home, tokenizer, load, save):
    return [
        # GPT_ARGS
        "--tensor-model-parallel-size",
        "1",
        "--pipeline-model-parallel-size",
        "4",
        "--query-key-layer-scaling",
        "--num-layers",
        "40",
        "--hidden-size",
        "5120",
        "--num-attention-heads",
        "40",
        "--seq-length",
        "2048",
        "--max-position-embeddings",
        "2048",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--lr",
        "0.0001",
        "--train-iters",
        "40000",
        "--min-lr",
        "1.0e-5",
        "--lr-warmup-fraction",
        ".01",
        "--adam-beta1",
        "0.9",
        "--adam-beta2",
        "0.95",
        "--adam-eps",
        "1e-5",
        "--clip-grad",
        "1.0",
        "--bf16",
        "--disable-bias-linear",
        "--use-flash-attn",
        "--normalization",
        "RMSNorm",
        "--position-embedding-type",
        "rope",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--padded-vocab-size",
        "32000",
        "--ffn-hidden-size",
        "13824",
        "--finetune",
        "--tune-exit",
        "--untie-exit-output-weights",
        "--use-exit-norm",
        "--use-exit-mlp",
        "--tune-exit-pipeline-parallel-size",
        "4",
        "--exit-layer-nums",
        "5",
        "10",
        "15",
        "20",
        "25",
        "30",
        "35",
        "40",
        # DATA_ARGS
        "--data-path",
        *ee_llm_data_path(data_home),
        "--tokenizer-type",
        "Llama2Tokenizer",
        "--tokenizer-model",
        tokenizer,
        "--split",
        "990,9,1",
        # OUTPUT_ARGS
        "--log-interval",
        "10",
        "--log-timers-to-tracker",
        "--save-interval",
        "20000",
        "--eval-interval",
        "50000",
        "--eval-iters",
        "1",
        "--wandb-project",
        "EE-TUNE",
        "--wandb-group",
        "llama-2-13B-chat-8-EXIT-pt",
        "--wandb-exp-name",
        "1202-0630",
        "--load",
        load,
        "--save",
        save,
    ]


def cpu_overrides(corpus, exits, **extra):
    """Later flags that make a GPU cluster's run a tiny CPU one (argparse: the last wins)."""
    flags = {
        "--num-layers": "4",
        "--hidden-size": "32",
        "--num-attention-heads": "4",
        "--ffn-hidden-size": "64",
        "--seq-length": "32",
        "--max-position-embeddings": "32",
        "--tensor-model-parallel-size": "1",
        "--pipeline-model-parallel-size": "1",
        "--micro-batch-size": "2",
        "--global-batch-size": "4",
        "--train-iters": "2",
        "--lr-warmup-iters": "0",
        "--eval-interval": "2",
        "--eval-iters": "1",
        "--log-interval": "1",
        "--data-path": corpus,
        "--split": "90,10,0",
        "--tokenizer-type": "NullTokenizer",
        "--vocab-size": "64",
        "--exit-layer-nums": exits,
        "--no-use-flash-attn": None,
        "--wandb-project": "",
    }
    flags.update(extra)
    argv = []
    for k, v in flags.items():
        if v is False:
            continue
        argv.append(k)
        if v is not None:
            argv += v.split() if v else [v]
    return argv


@pytest.fixture
def ee_llm_files(tmp_path):
    """Empty .bin/.idx files for every prefix of EE-LLM's blend (parsing checks they exist)."""
    home = tmp_path / "data"
    for name in BLEND:
        (home / name).mkdir(parents=True)
        for suffix in (".bin", ".idx"):
            (home / name / f"all{suffix}").write_bytes(b"")
    return str(home), str(tmp_path / "tokenizer.model")


def test_ee_llm_7b_training_flags_parse(ee_llm_files, tmp_path):
    from megatron.early_exit.training.arguments import parse_args

    home, tokenizer = ee_llm_files
    args = parse_args(ee_llm_7b_flags(home, tokenizer, str(tmp_path / "ckpt")), world_size=32)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (32, 4096, 32, 2048)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (1, 4, 8)
    assert args.global_batch_size == 2048 and args.num_microbatches == 2048 // (2 * 8)
    assert args.exit_layer_nums == [9, 17] and args.exit_layer_weight == [0.1, 0.2] and args.pre_exit
    assert args.use_flash_attn and args.log_timers_to_tracker and args.bf16
    assert (args.wandb_project, args.wandb_group, args.wandb_exp_name) == (
        "EE-LLM",
        "7B-EXIT-8-16-untie-800B",
        "1202-0630",
    )
    assert args.train_iters == 192000 and args.lr_warmup_iters == 2000 and args.init_method_std == 0.01
    assert len(args.data_path) == 30 and args.split == "990,9,1"


def test_ee_llm_13b_tuning_flags_parse(ee_llm_files, tmp_path):
    from megatron.early_exit.training.arguments import build_run_config, parse_args

    home, tokenizer = ee_llm_files
    args = parse_args(
        ee_llm_13b_tuning_flags(home, tokenizer, str(tmp_path / "in"), str(tmp_path / "out")), world_size=8
    )
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) == (40, 5120, 13824, 40)
    assert args.exit_layer_nums == [5, 10, 15, 20, 25, 30, 35, 40]
    assert args.use_exit_norm and args.use_exit_mlp and args.untie_exit_output_weights and args.tune_exit
    assert (
        build_run_config(args).built_stages == (40, 4) and args.data_parallel_size == 2 and args.num_microbatches == 2
    )
    assert args.padded_vocab_size == 32000 and args.apply_query_key_layer_scaling
    assert args.tokenizer_type == "Llama2Tokenizer" and args.finetune
    assert build_run_config(args).training.scheduler_steps.warmup == 400  # .01 of the 40000 decay iterations


def test_our_7b_example_means_what_ee_llm_7b_script_means(ee_llm_files, tmp_path):
    from megatron.early_exit.training.arguments import parse_args

    home, tokenizer = ee_llm_files
    prefix = f"{home}/{BLEND[0]}/all"
    env = dict(
        os.environ,
        EE_PRINT_ARGS="1",
        DATA_PATH=prefix,
        TOKENIZER_MODEL=tokenizer,
        WANDB_PROJECT="EE-LLM",
        WANDB_GROUP="7B-EXIT-8-16-untie-800B",
        RUN_NAME="1202-0630",
        CHECKPOINT_PATH=str(tmp_path / "ckpt"),
    )
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "ee_llm", "pretrain_early_exit_7B.sh")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()
    ours = vars(parse_args(out[1:], world_size=int(out[0].split("=")[1])))
    theirs = vars(
        parse_args(ee_llm_7b_flags(home, tokenizer, str(tmp_path / "ckpt")), world_size=int(out[0].split("=")[1]))
    )
    # What the example adds on purpose (a comment there says why), and where the data lies.
    added = {"data_path", "tensorboard_dir", "exit_signal_handler"}
    assert {k: v for k, v in ours.items() if k not in added} == {k: v for k, v in theirs.items() if k not in added}
    assert ours["ffn_hidden_size"] == 10880  # Megatron-LM's SwiGLU default for hidden 4096


def test_flash_attention_is_refused_without_cuda_in_one_line(ee_llm_files, tmp_path):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.run_config import check_flash_attention

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    home, tokenizer = ee_llm_files
    args = parse_args(ee_llm_7b_flags(home, tokenizer, str(tmp_path / "ckpt")), world_size=32)
    with pytest.raises(ConfigError, match=r"^--use-flash-attn needs a CUDA device.*add --no-use-flash-attn") as err:
        check_flash_attention(build_run_config(args))
    assert "\n" not in str(err.value)
    args = parse_args(ee_llm_7b_flags(home, tokenizer, str(tmp_path / "ckpt")) + ["--no-use-flash-attn"], world_size=32)
    assert not args.use_flash_attn
    check_flash_attention(build_run_config(args))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"--train-iters": False}, r"give one of --train-iters and --train-samples"),
        ({"--train-samples": 64}, r"give one of --train-iters and --train-samples"),
        ({"--lr-warmup-samples": 8}, r"--lr-warmup-samples needs --train-samples"),
        ({"--lr-warmup-fraction": 0.1}, r"give one of --lr-warmup-fraction and --lr-warmup-iters"),
        ({"--rampup-batch-size": "4 4 16"}, r"--rampup-batch-size needs --train-samples"),
        (
            {"--train-iters": False, "--train-samples": 64, "--lr-decay-iters": 4, "--lr-warmup-iters": 0},
            r"--lr-decay-iters needs --train-iters",
        ),
        (
            {"--train-iters": False, "--train-samples": 64, "--lr-warmup-iters": 0, "--rampup-batch-size": "4 3 16"},
            r"--rampup-batch-size 4 3 16: --global-batch-size \(8\) must be start \+ a multiple of the increment",
        ),
        ({"--exit-interval": 0}, r"--exit-interval must be >= 1"),
        ({"--skip-train": None}, r"--skip-train needs --load"),
        ({"--load-iteration": 3}, r"--load-iteration needs --load"),
        ({"--padded-vocab-size": 0}, r"--padded-vocab-size \(0\) must be >= 1"),
        (
            {"--use-flash-attn": None, "--transformer-impl": "local"},
            r"--use-flash-attn needs --transformer-impl transformer_engine",
        ),
    ],
)
def test_bad_run_flags_are_named(corpus, overrides, message):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(tiny_run_flags(corpus, **overrides), world_size=1)


def test_padded_vocab_size_overrides_the_padding(corpus):
    from megatron.early_exit.errors import EarlyExitError
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import model_vocab_size

    args = parse_args(tiny_run_flags(corpus), world_size=1)
    assert model_vocab_size(build_run_config(args), 64) == 64  # padded to a multiple of 32
    args = parse_args(tiny_run_flags(corpus, **{"--padded-vocab-size": 100}), world_size=1)
    assert model_vocab_size(build_run_config(args), 64) == 100
    with pytest.raises(
        EarlyExitError, match=r"--padded-vocab-size \(100\) is smaller than the tokenizer's vocabulary \(128\)"
    ):
        model_vocab_size(build_run_config(args), 128)


def test_query_key_layer_scaling_keeps_the_logits(dist1, corpus):
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(32).unsqueeze(0).expand(2, -1)
    logits = {}
    for flag in ("--no-query-key-layer-scaling", "--query-key-layer-scaling"):
        args = parse_args(tiny_run_flags(corpus, **{flag: None}), world_size=1)
        model = build_model(build_run_config(args), torch.device("cpu"), 64).eval()
        assert model.config.apply_query_key_layer_scaling == (flag == "--query-key-layer-scaling")
        with torch.no_grad():
            logits[flag] = model(tokens, position_ids, None).final
    assert torch.allclose(logits["--no-query-key-layer-scaling"], logits["--query-key-layer-scaling"], atol=1e-5)


def test_train_samples_count_iterations_as_megatron_lm(corpus):
    from megatron.early_exit.training.arguments import build_run_config, parse_args

    samples = {"--train-iters": False, "--train-samples": 40, "--lr-warmup-iters": 0}
    args = parse_args(tiny_run_flags(corpus, **samples, **{"--lr-warmup-fraction": 0.25}), world_size=1)
    steps = build_run_config(args).training.scheduler_steps  # in samples
    assert args.train_iters == 5 and (steps.warmup, steps.decay, steps.total, steps.in_samples) == (10, 40, 40, True)
    args = parse_args(tiny_run_flags(corpus, **samples, **{"--rampup-batch-size": "4 4 16"}), world_size=1)
    assert args.train_iters == 7  # 4 batches of 4, then 3 of 8


def test_sigterm_is_recorded_not_fatal_until_restored():
    from megatron.early_exit.training.run_control import SignalFlag

    flag = SignalFlag()
    try:
        assert not flag.received
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: flag.received, timeout=10)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is not flag._handle


@pytest.mark.gpu
def test_flash_attention_runs_through_transformer_engine(dist1, corpus):
    import importlib.util

    from megatron.core.transformer.enums import AttnBackend

    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.run_config import check_flash_attention
    from megatron.early_exit.training.trainer import build_model

    if (
        not torch.cuda.is_available()
        or not importlib.util.find_spec("transformer_engine")
        or not (importlib.util.find_spec("flash_attn") or importlib.util.find_spec("flash_attn_interface"))
    ):
        pytest.skip("needs CUDA, Transformer Engine and flash-attn")
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    position_ids = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    logits = {}
    for flag in ("--use-flash-attn", "--no-use-flash-attn"):
        args = parse_args(tiny_run_flags(corpus, **{flag: None, "--bf16": None, "--device": "cuda"}), world_size=1)
        check_flash_attention(build_run_config(args))
        model = build_model(build_run_config(args), torch.device("cuda"), 64).eval()
        assert (model.config.attention_backend == AttnBackend.flash) == (flag == "--use-flash-attn")
        with torch.no_grad():
            logits[flag] = model(tokens, position_ids, None).final.float()
    assert torch.allclose(logits["--use-flash-attn"], logits["--no-use-flash-attn"], atol=5e-2)


def test_llama2_tokenizer_puts_bos_before_every_text(tmp_path):
    from megatron.early_exit.tokenizers import SentencePieceTokenizer, build_tokenizer, train_sentencepiece

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"early exits at layer {i} of the model" for i in range(300)))
    model = train_sentencepiece(str(text), str(tmp_path / "sp"), vocab_size=300)
    llama, plain = build_tokenizer("Llama2Tokenizer", model), SentencePieceTokenizer(model)
    ids = llama.tokenize("early exits")
    assert ids[0] == llama.bos and ids[1:] == plain.tokenize("early exits")
    assert llama.eod == plain.eod != llama.bos
    assert llama.detokenize(ids) == "early exits"


# -- runs ----------------------------------------------------------------------------


def loss_keys(entry):
    return [k for k in entry if k == "lm loss" or k.startswith("early loss")]


def assert_same_losses(got, expected, tol=1e-5):
    assert len(got) == len(expected) > 0
    for step, (g, e) in enumerate(zip(got, expected)):
        assert loss_keys(g) == loss_keys(e)
        for key in loss_keys(e):
            assert abs(g[key] - e[key]) <= tol * max(1.0, abs(e[key])), (step, key, g[key], e[key])


def validation_lines(text):
    return [line for line in text.splitlines() if line.startswith(" validation loss at iteration")]


@pytest.mark.slow
def test_ee_llm_scripts_run_on_cpu_with_later_flags(dist1, corpus, ee_llm_files, tmp_path):
    home, tokenizer = ee_llm_files
    pretrained, tuned = str(tmp_path / "pretrained"), str(tmp_path / "tuned")
    # --save DIR --load DIR before DIR holds a checkpoint starts from scratch (Megatron-LM's resume idiom).
    state = run_training(ee_llm_7b_flags(home, tokenizer, pretrained) + cpu_overrides(corpus, "1 2"))
    assert len(state.history) == 2 and loss_keys(state.history[-1]) == ["lm loss", "early loss [1]", "early loss [2]"]
    assert os.path.isfile(os.path.join(pretrained, "iter_0000002", "common.pt"))
    # EE-Tuning: a backbone without exits (as converted from Llama 2), new exits trained on it.
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    backbone = str(tmp_path / "backbone")
    args = parse_args(
        tiny_run_flags(
            corpus,
            **{
                "--exit-layer-nums": False,
                "--exit-layer-weight": False,
                "--use-exit-norm": False,
                "--ffn-hidden-size": 64,
                "--padded-vocab-size": 128,
                "--untie-embeddings-and-output-weights": None,
            },
        ),
        world_size=1,
    )
    save_weights(backbone, vars(args), build_model(build_run_config(args), torch.device("cpu"), 128))
    state = run_training(
        ee_llm_13b_tuning_flags(home, tokenizer, backbone, tuned)
        + cpu_overrides(corpus, "3 4", **{"--tune-exit-pipeline-parallel-size": "1", "--padded-vocab-size": "128"})
    )
    assert len(state.history) == 2 and loss_keys(state.history[-1]) == ["early loss [3]", "early loss [4]"]
    assert state.model.module.config.apply_query_key_layer_scaling
    assert os.path.isfile(os.path.join(tuned, "iter_0000002", "common.pt"))


@pytest.fixture(scope="module")
def saved_run(dist1, corpus, tmp_path_factory):
    """4 iterations, checkpoints at 2 and 4, per-phase timers; its output and history."""
    import contextlib
    import io

    root = str(tmp_path_factory.mktemp("saved"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state = run_training(
            tiny_run_flags(
                corpus,
                iters=4,
                **{
                    "--save": root,
                    "--save-interval": 2,
                    "--log-interval": 2,
                    "--eval-interval": 4,
                    "--timing-log-level": 2,
                },
            )
        )
    return root, state, out.getvalue()


@pytest.mark.slow
def test_timers_are_printed_at_the_log_interval(saved_run):
    _, _, out = saved_run
    assert out.count("(min, max) time across ranks (ms):") == 2  # iterations 2 and 4
    for name in ("iteration", "forward-backward", "forward-compute", "exit-losses", "backward-compute", "optimizer"):
        times = [float(m.group(2)) for m in re.finditer(rf"^\s+{name} \.+: \(([\d.]+), ([\d.]+)\)$", out, re.M)]
        assert len(times) == 2 and all(t > 0 for t in times), name


@pytest.mark.slow
def test_skip_train_prints_the_validation_loss_of_every_exit(dist1, corpus, saved_run, capsys):
    root, trained, out = saved_run
    capsys.readouterr()
    state = run_training(tiny_run_flags(corpus, iters=4, **{"--load": root, "--skip-train": None}))
    printed = validation_lines(capsys.readouterr().out)
    assert state.history == [] and len(state.validation) == 1
    assert printed == validation_lines(out)[-1:]
    assert "early loss [1]:" in printed[0] and "early loss [2]:" in printed[0] and "lm loss:" in printed[0]
    assert_same_losses(state.validation, trained.validation[-1:], tol=1e-6)


@pytest.mark.slow
def test_load_iteration_resumes_training_there(dist1, corpus, saved_run):
    root, trained, _ = saved_run
    state = run_training(tiny_run_flags(corpus, iters=4, **{"--load": root, "--load-iteration": 2}))
    assert_same_losses(state.history, trained.history[2:])


def fresh_process_env() -> dict:
    """This environment without the rendezvous of this process's world (a child starts its own)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    return dict(env, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_load_iteration_in_the_checkpoint_tools_and_the_server(dist1, saved_run, monkeypatch, tmp_path):
    from megatron.early_exit import parallel
    from megatron.early_exit.checkpoint.reader import checkpoint_dir, load_weights
    from megatron.early_exit.inference import InferenceConfigError
    from megatron.early_exit.server import launch

    root, _, _ = saved_run
    inspect = os.path.join(ROOT, "tools", "checkpoint", "inspect.py")
    env = fresh_process_env()
    proc = subprocess.run(
        [sys.executable, inspect, root, "--load-iteration", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["iteration"] == 2
    proc = subprocess.run([sys.executable, inspect, root, "--ckpt-step", "3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --load-iteration 3: no checkpoint of that iteration under --load {root} (iterations present: 2, 4)"
    )

    for tool, extra in (("add_exits.py", ["--exit-layer-nums", "1"]), ("reshard.py", [])):
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "checkpoint", tool),
                "--load",
                root,
                "--load-iteration",
                "3",
                "--save",
                str(tmp_path / tool),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (tool, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1].endswith("(iterations present: 2, 4)"), (tool, proc.stderr[-2000:])

    served = {}
    monkeypatch.setattr(launch, "serve", lambda args, model, tokenizer, limits, engine=None: served.update(model=model))
    monkeypatch.setattr(parallel, "destroy_parallel", lambda: None)  # keep this session's world
    launch.main(["--load", root, "--load-iteration", "2", "--device", "cpu", "--port", "0"])
    model = served["model"]
    weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for iteration, same in ((2, True), (4, False)):
        load_weights(checkpoint_dir(root, iteration), model)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v)) == same
    with pytest.raises(InferenceConfigError, match=r"--load-iteration 3: .*\(iterations present: 2, 4\)"):
        launch.main(["--load", root, "--load-iteration", "3", "--device", "cpu"])


@pytest.mark.slow
def test_missing_load_iteration_in_training_lists_the_iterations_present(dist1, corpus, saved_run):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    root, _, _ = saved_run
    with pytest.raises(CheckpointError, match=r"^--load-iteration 3: .*\(iterations present: 2, 4\)$"):
        run_training(tiny_run_flags(corpus, iters=4, **{"--load": root, "--load-iteration": 3}))


@pytest.mark.slow
def test_exit_interval_and_duration_save_and_stop(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.reader import iterations_present

    state = run_training(tiny_run_flags(corpus, iters=6, **{"--save": str(tmp_path / "a"), "--exit-interval": 2}))
    assert len(state.history) == 2 and iterations_present(str(tmp_path / "a")) == [2]
    state = run_training(
        tiny_run_flags(corpus, iters=6, **{"--save": str(tmp_path / "b"), "--exit-duration-in-mins": 1e-6})
    )
    assert len(state.history) == 1 and iterations_present(str(tmp_path / "b")) == [1]


@pytest.mark.slow
def test_samples_schedule_equals_iterations_and_ramps_the_batch(dist1, corpus, capsys):
    by_iters = run_training(tiny_run_flags(corpus, iters=4, **{"--eval-iters": 0, "--log-interval": 1}))
    iters_lr = re.findall(r"learning rate: ([\d.E+-]+)", capsys.readouterr().out)
    by_samples = run_training(
        tiny_run_flags(
            corpus,
            iters=4,
            **{
                "--train-iters": False,
                "--train-samples": 32,
                "--lr-warmup-iters": 0,
                "--lr-warmup-samples": 16,
                "--eval-iters": 0,
                "--log-interval": 1,
            },
        )
    )
    samples_lr = re.findall(r"learning rate: ([\d.E+-]+)", capsys.readouterr().out)
    assert_same_losses(by_samples.history, by_iters.history, tol=0)
    assert samples_lr == iters_lr and len(iters_lr) == 4
    # Ramp-up from 4 by 4 over 16 samples to 8: 4 batches of 4, then batches of 8 up to 40 samples.
    ramped = run_training(
        tiny_run_flags(
            corpus,
            iters=4,
            **{
                "--train-iters": False,
                "--train-samples": 40,
                "--rampup-batch-size": "4 4 16",
                "--lr-warmup-iters": 0,
                "--eval-iters": 0,
                "--log-interval": 1,
            },
        )
    )
    sizes = [int(s) for s in re.findall(r"global batch size: (\d+)", capsys.readouterr().out)]
    assert sizes == [4, 4, 4, 4, 8, 8, 8] and len(ramped.history) == 7


def wandb_records(run_file):
    """The records of a wandb offline run file (LevelDB log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, or last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def finished_records(run_file, wait_s=120):
    """The run's records once wandb's service has written its last one (`exit`)."""
    deadline = time.time() + wait_s
    while True:
        records = list(wandb_records(run_file))
        if records and records[-1].WhichOneof("record_type") == "exit" or time.time() > deadline:
            return records
        time.sleep(0.5)


@pytest.mark.slow
def test_wandb_offline_run_logs_every_exit_and_the_timers(dist1, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    state = run_training(
        tiny_run_flags(
            corpus,
            iters=2,
            **{
                "--wandb-project": "ee",
                "--wandb-group": "tiny",
                "--wandb-exp-name": "run-1",
                "--wandb-save-dir": str(tmp_path),
                "--log-interval": 1,
                "--eval-interval": 2,
                "--lr-warmup-iters": 0,
                "--log-timers-to-tracker": None,
                "--timing-log-level": 1,
                "--tensorboard-dir": str(tmp_path / "tb"),
            },
        )
    )
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = finished_records(run_file)
    history, runs = {}, []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "run":
            runs.append((record.run.project, record.run.run_group, record.run.display_name))
    assert runs[0] == ("ee", "tiny", "run-1")
    assert sorted(history) == [1, 2]
    for step, logged in enumerate(state.history, start=1):
        for key in loss_keys(logged):
            assert history[step][f"train/{key}"] == pytest.approx(logged[key], rel=1e-6)
        assert {"iteration-time", "forward-backward-time", "optimizer-time"} <= set(history[step])
    for key in loss_keys(state.validation[-1]):
        assert history[2][f"validation/{key}"] == pytest.approx(state.validation[-1][key], rel=1e-6)
    assert os.listdir(tmp_path / "tb")  # TensorBoard beside it


# -- SIGTERM under two processes ------------------------------------------------------


def tensorboard_losses(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(directory)
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("train/") and "loss" in t]
    steps = {}
    for tag in tags:
        for event in events.Scalars(tag):
            steps.setdefault(event.step, {})[tag[len("train/") :]] = event.value
    return [steps[s] for s in sorted(steps)]


def torchrun(argv, env, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
        *argv,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_saves_and_exits_zero_and_the_resume_matches(dist1, corpus, tmp_path):
    iters = 8
    root, env = str(tmp_path / "ckpt"), fresh_process_env()
    flags = tiny_run_flags(
        corpus,
        iters=iters,
        **{"--save": root, "--load": root, "--exit-signal-handler": None, "--log-interval": 1, "--eval-iters": 0},
    )
    first = torchrun(flags + ["--tensorboard-dir", str(tmp_path / "tb1")], env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while not any(line.startswith(" iteration        2/") for line in lines) and first.poll() is None:
        assert time.time() < deadline, "".join(lines[-30:])
        time.sleep(0.05)
    os.kill(worker_pid(first, 0), signal.SIGTERM)  # one rank signalled: every rank must agree to stop
    assert first.wait(timeout=600) == 0, "".join(lines[-40:])
    reader.join(timeout=10)
    stopped = [re.match(r" exiting at iteration (\d+): SIGTERM", line) for line in lines]
    (stop,) = [int(m.group(1)) for m in stopped if m]
    assert 2 <= stop < iters
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == str(stop)

    # The resume runs as two pipeline stages (checkpoints load into any layout), timing each phase.
    second = torchrun(
        flags
        + [
            "--tensorboard-dir",
            str(tmp_path / "tb2"),
            "--pipeline-model-parallel-size",
            "2",
            "--timing-log-level",
            "2",
        ],
        env,
    )
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-4000:]
    assert re.search(r"^\s+pipeline-communication \.+: \([\d.]+, [\d.]+\)$", out, re.M), out[-4000:]
    reference = run_training(tiny_run_flags(corpus, iters=iters, **{"--eval-iters": 0}))
    assert_same_losses(tensorboard_losses(str(tmp_path / "tb1"))[:stop], reference.history[:stop])
    assert_same_losses(tensorboard_losses(str(tmp_path / "tb2")), reference.history[stop:])
