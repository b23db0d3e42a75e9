"""torchrun entry point for multi-process test cases.

    torchrun --nproc-per-node N tests/multiproc/runner.py MODULE OUT.json [CASE ...]
    torchrun --nproc-per-node N tests/multiproc/runner.py --group GROUP.json OUT.json

Runs every `case_*` function of MODULE (or the named ones) in one launch, on all
ranks, and writes {case: {"ok", "error", "metrics"}} from rank 0. A case fails if
it raises on any rank. With --group, GROUP.json lists {"module", "env"} entries: each
module is imported with its environment set and its cases run, all in this one launch,
and OUT.json maps each module to its results. Launching once for many cases saves the
~8 s import cost per process.
"""

import importlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_cases(module_name, only=()):
    import torch

    from megatron.early_exit.parallel import initialize_parallel

    module = importlib.import_module(module_name)
    names = only or [n for n in vars(module) if n.startswith("case_")]
    results = {}
    for name in names:
        start = time.time()
        try:
            metrics = getattr(module, name)() or {}
            error = ""
        except Exception:  # report, then keep the other cases going
            metrics, error = {}, traceback.format_exc()
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        results[name] = {"ok": not bad, "error": "\n".join(bad), "metrics": metrics, "seconds": time.time() - start}
        if torch.distributed.get_rank() == 0:
            print(f"[{'ok' if not bad else 'FAIL'}] {name} {metrics} ({time.time() - start:.1f}s)", flush=True)
        initialize_parallel(1, 1)  # each case starts from the plain layout
    return results


def main():
    args = sys.argv[1:]
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from megatron.early_exit.parallel import destroy_parallel, initialize_parallel

    # A failing rank must not leave the others waiting for the default 10 minutes.
    initialize_parallel(1, 1, timeout_minutes=3)
    if args[0] == "--group":
        group_path, out_path = args[1:]
        results = {}
        for entry in json.load(open(group_path)):
            saved = dict(os.environ)
            os.environ.update(entry["env"])  # case modules read their environment when imported
            try:
                results[entry["module"]] = run_cases(entry["module"])
            finally:
                os.environ.clear()
                os.environ.update(saved)
    else:
        module_name, out_path, *only = args
        results = run_cases(module_name, only)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=float)
    destroy_parallel()


if __name__ == "__main__":
    main()
