"""Pretrain an early-exit GPT model on megatron-core.

    torchrun --nproc-per-node N pretrain_early_exit_gpt.py [Megatron-LM flags] [early-exit flags]

Flags follow Megatron-LM (model shape, training, parallelism, data, logging,
checkpoints) and EE-LLM (--exit-layer-nums, --exit-layer-weight, ...); see
`python pretrain_early_exit_gpt.py --help`. EE-LLM's launch scripts run unchanged; a later
flag overrides an earlier one, e.g. `--no-use-flash-attn` to run such a script where flash
attention cannot. Long runs: --exit-signal-handler (SIGTERM: save and exit 0),
--exit-interval, --exit-duration-in-mins; --save DIR --load DIR resumes, and starts from
scratch while DIR holds no checkpoint; --skip-train --load evaluates a checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    import megatron.early_exit  # noqa: F401  (version check, CPU adapter)

    # isort: split
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    pretrain(parse_run_config(argv))


if __name__ == "__main__":  # dist_checkpointing's save re-imports __main__ in a helper process
    main()
