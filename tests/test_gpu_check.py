"""benchmarks/gpu_check.py (make bench-gpu): steps under their own time limits, none stopping
the others, into one JSON summary; the whole dry run on CPU (slow)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_a_step_out_of_time_or_failing_is_recorded_and_the_next_runs(capsys):
    from benchmarks.gpu_check import run_step

    env = dict(os.environ)
    slow = run_step("slow", [sys.executable, "-c", "import time; print('tokens/s: 5'); time.sleep(30)"], 1, env, str)
    failing = run_step("failing", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, env, str)
    fine = run_step("fine", [sys.executable, "-c", "print('{\"x\": 1}')"], 30, env, lambda out: json.loads(out))
    assert slow["ok"] is False and slow["timed_out"] and slow["seconds"] < 20 and slow["limit_s"] == 1
    assert failing["ok"] is False and failing["returncode"] == 3 and "boom" in failing["output_tail"]
    assert fine == {"ok": True, "returncode": 0, "seconds": fine["seconds"], "limit_s": 30, "result": {"x": 1}}
    unparsable = run_step(
        "unparsable",
        [sys.executable, "-c", "print('no number')"],
        30,
        env,
        __import__("benchmarks.gpu_check", fromlist=["x"]).tokens_per_second,
    )
    assert unparsable["ok"] is False and "0 logged intervals" in unparsable["parse_error"]


def test_parsers_read_what_the_steps_print():
    from benchmarks.gpu_check import parse_pytest, parse_vs_hf, tokens_per_second

    log = "\n".join(f" iteration {i} | tokens/s: {v} | lm loss: 3.0" for i, v in enumerate([10.0, 200.0, 220.0, 210.0]))
    assert tokens_per_second(log) == 210.0  # the first interval (compilation, warm-up) left out
    assert parse_pytest("....\n12 passed, 3 skipped, 1 deselected in 40.1s") == {
        "passed": 12,
        "skipped": 3,
        "deselected": 1,
    }
    table = (
        "threads batch transformers tok/s ...\n"
        "      1     1               569.6                  320.1  0.56x          True\n"
    )
    assert parse_vs_hf(table) == [
        {
            "threads": 1,
            "batch": 1,
            "transformers_tok_s": 569.6,
            "ours_tok_s": 320.1,
            "ratio": 0.56,
            "tokens_equal": True,
        }
    ]


@pytest.mark.slow
def test_dry_run_on_cpu_writes_a_summary_of_every_step(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore"),
    )
    summary = json.loads(out.read_text())
    assert proc.returncode == 0 and summary["ok"] and summary["dry_run"], proc.stdout[-3000:]
    steps = summary["steps"]
    assert set(steps) == {"setup", "test_gpu", "train", "vs_hf", "decode"}
    assert steps["test_gpu"]["result"]["passed"] >= 1
    assert steps["train"]["ee_time_ratio"] > 0 and all(v > 0 for v in steps["train"]["tokens_per_s"].values())
    assert {r["batch"] for r in steps["vs_hf"]["result"]} == {1, 8} and all(
        r["tokens_equal"] for r in steps["vs_hf"]["result"]
    )
    rows = steps["decode"]["result"]["rows"]
    assert {(r["batch"], r["strategy"].split()[0]) for r in rows} == {
        (b, s) for b in (1, 8) for s in ("full", "early", "self-speculative")
    }
    assert all(r["tok_s"] > 0 and r["host_syncs_per_step"] > 0 for r in rows)
