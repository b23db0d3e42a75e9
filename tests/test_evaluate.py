"""tools/evaluate.py in-process: lm-eval tasks (tests/evaluate_fixtures.py: a multiple-choice task and a
generation task, local jsonl, no download) and perplexity over a .bin/.idx dataset, checked
against score() and generate() called directly on the same checkpoint; then (slow) lm-eval's
own `local-completions` model against a real server subprocess gives the same numbers.

The checkpoint is a tiny random model (4 layers, exits after layers 1 and 2, NullTokenizer:
text is token ids, vocabulary 64 padded to 128, so padded ids exist and must never count).
"""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task files are local; never reach the Hub

import lm_eval  # noqa: E402,F401  (the test extra installs it; a missing one must fail, not skip)

from tests.evaluate_fixtures import (  # noqa: E402
    CHOICES,
    CONTEXTS,
    EXITS,
    GEN_TASK,
    MAX_SEQ,
    MC_TASK,
    NUM_LAYERS,
    ROLLING_TASK,
    VOCAB,
)

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(evaluate_inputs):
    return evaluate_inputs["checkpoint"]


@pytest.fixture(scope="module")
def engine(checkpoint):
    from megatron.early_exit.inference.loading import load_model

    model, tokenizer, _ = load_model(checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def task_dir(evaluate_inputs):
    return evaluate_inputs["task_dir"]


def run_evaluate(*flags):
    import evaluate as evaluate_tool

    return evaluate_tool.main([str(f) for f in flags])


@pytest.fixture(scope="module")
def task_run(checkpoint, task_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_out") / "tasks.json")
    rows = run_evaluate(
        "--load",
        checkpoint,
        "--tasks",
        f"{MC_TASK},{GEN_TASK},{ROLLING_TASK}",
        "--include-path",
        task_dir,
        "--exit-layers",
        *EXITS,
        "--log-samples",
        "--output",
        out,
        "--batch-size",
        3,
    )
    return rows, json.load(open(out))


# -- tasks in-process -------------------------------------------------------------------------


def mc_loglikelihoods(samples):
    """{(doc_id, choice index): loglikelihood} of the multiple-choice task's samples."""
    return {(s["doc_id"], j): float(r[0][0]) for s in samples[MC_TASK] for j, r in enumerate(s["resps"])}


@pytest.mark.parametrize("setting,exit_layer", [("full", None), ("exit 1", 1), ("exit 2", 2)])
def test_choice_loglikelihoods_equal_score_sums(engine, task_run, setting, exit_layer):
    from megatron.early_exit.inference import score

    model, tokenizer = engine
    rows, out = task_run
    got = mc_loglikelihoods(out["samples"][setting])
    assert len(got) == len(CONTEXTS) * len(CHOICES)
    correct = 0
    for d, context in enumerate(CONTEXTS):
        ctx = tokenizer.tokenize(context)
        seqs = [ctx + tokenizer.tokenize(c) for c in CHOICES]
        result = score(model, seqs, exit_layer=exit_layer)
        expected = [result.sum_logprobs(j, len(ctx) - 1) for j in range(len(CHOICES))]
        for j, value in enumerate(expected):
            assert abs(got[(d, j)] - value) < 1e-5, (d, j, got[(d, j)], value)
        correct += max(range(len(CHOICES)), key=lambda j: expected[j]) == d % len(CHOICES)
    row = next(r for r in rows if r.setting == setting)
    assert row.metrics[f"{MC_TASK} acc"] == pytest.approx(correct / len(CONTEXTS))


def test_generation_task_matches_direct_generation(task_run):
    rows, out = task_run
    full = next(r for r in rows if r.setting == "full")
    assert full.metrics[f"{GEN_TASK} exact_match"] == pytest.approx(0.5)
    assert full.tokens_per_second and full.tokens_per_second > 0
    # An exit alone decodes other tokens than full depth (random weights): a different score.
    assert {r.metrics[f"{GEN_TASK} exact_match"] for r in rows if r.setting != "full"} != {0.5}
    for row in rows[1:]:
        assert row.mean_depth < NUM_LAYERS


def rolling_loglikelihoods(samples):
    return {s["doc_id"]: float(s["resps"][0][0]) for s in samples[ROLLING_TASK]}


@pytest.mark.parametrize("setting,exit_layer", [("full", None), ("exit 2", 2)])
def test_rolling_loglikelihood_is_the_texts_score_after_the_prefix_token(engine, task_run, setting, exit_layer):
    """Short texts are one lm-eval window: the end-of-text id, then every token of the text."""
    from megatron.early_exit.inference import score

    model, tokenizer = engine
    got = rolling_loglikelihoods(task_run[1]["samples"][setting])
    seqs = [[tokenizer.eod] + tokenizer.tokenize(c) for c in CONTEXTS]
    result = score(model, seqs, exit_layer=exit_layer)
    assert got == pytest.approx({d: result.sum_logprobs(d) for d in range(len(CONTEXTS))}, abs=1e-5)


def test_exit_loglikelihoods_differ_from_full(task_run):
    _, out = task_run
    full = mc_loglikelihoods(out["samples"]["full"])
    for layer in EXITS:
        other = mc_loglikelihoods(out["samples"][f"exit {layer}"])
        assert max(abs(full[k] - other[k]) for k in full) > 1e-2


# -- perplexity -------------------------------------------------------------------------------


def test_perplexity_equals_exp_mean_nll(engine, checkpoint, corpus, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron.early_exit.evaluation.settings import Setting, score_setting
    from megatron.early_exit.inference import score

    model, _ = engine
    seq, windows = 32, 5
    out = str(tmp_path / "ppl.json")
    plot = str(tmp_path / "ppl.png")
    rows = run_evaluate(
        "--load",
        checkpoint,
        "--data-path",
        corpus,
        "--seq-length",
        seq,
        "--limit",
        windows,
        "--exit-layers",
        "--thresholds",
        0.2,
        2,
        "--speed-prompts",
        2,
        "--prompt-length",
        8,
        "--max-new-tokens",
        6,
        "--output",
        out,
        "--plot",
        plot,
        "--batch-size",
        2,
    )
    dataset = IndexedDataset(corpus)  # kept alive: its documents are views of its memory map
    stream = [int(t) for i in range(len(dataset)) for t in dataset[i].tolist()][: seq * windows]
    chunks = [stream[i : i + seq] for i in range(0, len(stream), seq)]
    by_name = {r.setting: r for r in rows}
    assert list(by_name) == ["full", "exit 1", "exit 2", "early exit 2", "early exit 0.2"]
    for name, layer in (("full", None), ("exit 1", 1), ("exit 2", 2)):
        nll = [-lp for row in score(model, chunks, exit_layer=layer).logprobs for lp in row]
        assert len(nll) == windows * (seq - 1)
        assert by_name[name].perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    with torch.no_grad():  # and by hand from the model's own forward, over the real vocabulary
        nll = []
        for chunk in chunks:
            logits = model(torch.tensor([chunk]), torch.arange(seq).unsqueeze(0), None).final[0, :-1, :VOCAB]
            nll += (-torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(chunk[1:]).unsqueeze(-1))).tolist()
    assert by_name["full"].perplexity == pytest.approx(math.exp(sum(n[0] for n in nll) / len(nll)), rel=1e-5)
    for layer in EXITS:
        assert abs(by_name[f"exit {layer}"].perplexity - by_name["full"].perplexity) > 1e-3
    # Threshold above 1 never exits: full depth's numbers; 0.2 mixes exits and full depth.
    assert by_name["early exit 2"].perplexity == pytest.approx(by_name["full"].perplexity, rel=1e-9)
    mixed = score_setting(model, chunks, Setting(threshold=0.2))
    depths = {d for row in mixed.depths for d in row}
    assert len(depths) > 1, depths
    assert by_name["early exit 0.2"].mean_depth == pytest.approx(sum(map(sum, mixed.depths)) / (windows * (seq - 1)))
    # Speed measured for every setting in the same run; full depth agrees with itself.
    assert all(r.tokens_per_second > 0 for r in rows)
    assert by_name["full"].agreement == 1.0 and by_name["early exit 2"].agreement == 1.0
    assert json.load(open(out))["rows"][0]["setting"] == "full"
    assert os.path.getsize(plot) > 1000
    # Progress lines name each setting as the table does.
    progress = [line for line in capsys.readouterr().out.splitlines() if "tokens/s so far" in line]
    assert {" ".join(line.split()[2:-4]) for line in progress} == set(by_name)


def test_early_exit_scoring_takes_the_first_confident_exit(engine):
    """Each position's score comes from the first exit whose top-1 probability reaches the
    threshold, else from the final layer."""
    from megatron.early_exit.evaluation.settings import Setting, score_setting
    from megatron.early_exit.inference import score

    model, tokenizer = engine
    seqs = [tokenizer.tokenize(c) for c in CONTEXTS]
    heads = {k: score(model, seqs, exit_layer=k, top_n=1) for k in (*EXITS, NUM_LAYERS)}
    mixed = score_setting(model, seqs, Setting(threshold=0.2))
    for i, seq in enumerate(seqs):
        for t in range(len(seq) - 1):
            layer = next((k for k in EXITS if math.exp(heads[k].top_logprobs[i][t][0]) >= 0.2), NUM_LAYERS)
            assert mixed.depths[i][t] == layer
            assert mixed.logprobs[i][t] == heads[layer].logprobs[i][t]


def test_checkpoint_models_score_over_the_tokenizers_vocabulary(engine):
    """A loaded model knows its tokenizer: padded ids (64..127 here) are never alternatives."""
    from megatron.early_exit.inference import score

    model, tokenizer = engine
    result = score(model, [tokenizer.tokenize(CONTEXTS[1])], top_n=VOCAB)
    assert model.vocab_size == 128
    assert all(sorted(tops) == list(range(VOCAB)) for tops in result.top_tokens[0])


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    from megatron.early_exit.evaluation.lm_eval_model import EarlyExitLM

    assert get_model("early-exit") is EarlyExitLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_user_mistakes_are_one_line_errors(checkpoint, task_dir):
    from megatron.early_exit.errors import ConfigError

    with pytest.raises(ConfigError, match="--tasks no_such_task"):
        run_evaluate("--load", checkpoint, "--tasks", "no_such_task", "--include-path", task_dir)
    with pytest.raises(ConfigError, match="--exit-layers 3"):
        run_evaluate("--load", checkpoint, "--tasks", MC_TASK, "--include-path", task_dir, "--exit-layers", 3)
    with pytest.raises(ConfigError, match="--data-path /nonexistent"):
        run_evaluate("--load", checkpoint, "--data-path", "/nonexistent/prefix")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_evaluate("--load", checkpoint)


# -- acceptance: lm-eval's local-completions against the server -------------------------------


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from tests.server_fixtures import Server

    srv = Server(checkpoint, str(tmp_path_factory.mktemp("eval_server") / "server.log"))
    yield srv
    srv.stop()


@pytest.mark.slow
def test_local_completions_against_server_equals_in_process(server, task_dir, task_run):
    """lm-eval's own OpenAI-completions client with the server's remote tokenizer gets the same
    per-choice loglikelihoods (1e-4) and the same accuracy and exact match as tools/evaluate.py."""
    from lm_eval.tasks import TaskManager

    rows, out = task_run
    remote = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(
            base_url=f"{server.url}/v1/completions",
            tokenizer_backend="remote",
            model="tiny",
            max_length=MAX_SEQ,
            num_concurrent=1,
            max_retries=1,
            batch_size=4,
        ),
        tasks=[MC_TASK, GEN_TASK, ROLLING_TASK],
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    local, got = mc_loglikelihoods(out["samples"]["full"]), mc_loglikelihoods(remote["samples"])
    assert got.keys() == local.keys()
    assert max(abs(got[k] - local[k]) for k in local) < 1e-4
    rolling_local, rolling_got = (
        rolling_loglikelihoods(out["samples"]["full"]),
        rolling_loglikelihoods(remote["samples"]),
    )
    assert rolling_got == pytest.approx(rolling_local, abs=1e-4)
    full = next(r for r in rows if r.setting == "full")
    assert remote["results"][MC_TASK]["acc,none"] == full.metrics[f"{MC_TASK} acc"]
    assert remote["results"][GEN_TASK]["exact_match,none"] == full.metrics[f"{GEN_TASK} exact_match"]
    local_gen = {s["doc_id"]: s["filtered_resps"] for s in out["samples"]["full"][GEN_TASK]}
    remote_gen = {s["doc_id"]: s["filtered_resps"] for s in remote["samples"][GEN_TASK]}
    assert remote_gen == local_gen


# -- TP=2 and PP=2 under torchrun: the same numbers as one process ------------------------------


def _evaluate_parallel(flag: str):
    """tools/evaluate.py's perplexity rows at TP=2 or PP=2 (paths from the launching test)."""
    rows = run_evaluate(
        "--load",
        os.environ["EE_EVAL_CKPT"],
        "--data-path",
        os.environ["EE_EVAL_DATA"],
        "--seq-length",
        32,
        "--limit",
        4,
        "--exit-layers",
        "--thresholds",
        0.2,
        "--speed-prompts",
        2,
        "--prompt-length",
        8,
        "--max-new-tokens",
        4,
        f"--{flag}-model-parallel-size",
        2,
        "--batch-size",
        3,
    )
    return {r.setting: r.perplexity for r in rows}


def case_evaluate_tp2():
    return _evaluate_parallel("tensor")


def case_evaluate_tasks_tp2():
    """The lm-eval tasks at TP=2: every rank runs lm-eval in lockstep; rank 0's numbers."""
    import tempfile

    out = os.path.join(tempfile.gettempdir(), f"ee_eval_tasks_{os.getpid()}.json")
    run_evaluate(
        "--load",
        os.environ["EE_EVAL_CKPT"],
        "--tasks",
        f"{MC_TASK},{GEN_TASK}",
        "--include-path",
        os.environ["EE_EVAL_TASKS"],
        "--log-samples",
        "--output",
        out,
        "--tensor-model-parallel-size",
        2,
    )
    if torch.distributed.get_rank() != 0:
        return {}
    samples = json.load(open(out))["samples"]["full"]
    return {
        "choices": {f"{d} {j}": v for (d, j), v in mc_loglikelihoods(samples).items()},
        "generated": {str(s["doc_id"]): s["filtered_resps"] for s in samples[GEN_TASK]},
    }


def case_evaluate_pp2():
    return _evaluate_parallel("pipeline")


@pytest.fixture(scope="module")
def evaluate_runs(request):
    """The cases above, in the grouped two-process launch (conftest's evaluate_launch_env)."""
    from tests.conftest import launch_grouped

    return launch_grouped("tests.test_evaluate", request)


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["case_evaluate_tp2", "case_evaluate_pp2"])
def test_parallel_evaluation_equals_one_process(checkpoint, corpus, case, evaluate_runs):
    single = run_evaluate(
        "--load",
        checkpoint,
        "--data-path",
        corpus,
        "--seq-length",
        32,
        "--limit",
        4,
        "--exit-layers",
        "--thresholds",
        0.2,
        "--speed-prompts",
        0,
    )
    result = evaluate_runs[case]
    assert result["ok"], result["error"]
    assert list(result["metrics"]) == [r.setting for r in single]
    for row in single:
        assert result["metrics"][row.setting] == pytest.approx(row.perplexity, rel=1e-5), row.setting


@pytest.mark.multiproc
def test_parallel_tasks_equal_one_process(task_run, evaluate_runs):
    result = evaluate_runs["case_evaluate_tasks_tp2"]
    assert result["ok"], result["error"]
    local = mc_loglikelihoods(task_run[1]["samples"]["full"])
    got = {tuple(map(int, k.split())): v for k, v in result["metrics"]["choices"].items()}
    assert got.keys() == local.keys()
    assert max(abs(got[k] - local[k]) for k in local) < 1e-5
    assert result["metrics"]["generated"] == {
        str(s["doc_id"]): s["filtered_resps"] for s in task_run[1]["samples"]["full"][GEN_TASK]
    }
