"""torchrun entry point for multi-process test cases.

    torchrun --nproc-per-node N tests/multiproc/runner.py MODULE OUT.json [CASE ...]

Runs every `case_*` function of MODULE (or the named ones) in one launch, on all
ranks, and writes {case: {"ok", "error", "metrics"}} from rank 0. A case fails if
it raises on any rank. Launching once for many cases saves the ~8 s import cost.
"""

import importlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    module_name, out_path, *only = sys.argv[1:]
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)
    from megatron.early_exit.parallel import destroy_parallel, initialize_parallel

    # A failing rank must not leave the others waiting for the default 10 minutes.
    initialize_parallel(1, 1, timeout_minutes=3)
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
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=float)
    destroy_parallel()


if __name__ == "__main__":
    main()
