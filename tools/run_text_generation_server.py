"""Serve an early-exit checkpoint over HTTP: Megatron-LM's PUT /api and OpenAI's /v1/completions.

    python tools/run_text_generation_server.py --load runs/quickstart/checkpoints --port 5000
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT --tensor-model-parallel-size 2

Rank 0 answers HTTP and broadcasts each request; every rank decodes it. See
`--help` for the limits and megatron/early_exit/server/ for the endpoints.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron.early_exit.server.launch import main

    main()
