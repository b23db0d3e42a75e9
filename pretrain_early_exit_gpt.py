"""Pretrain an early-exit GPT model (launch with torchrun).

The training entry point is not there yet: this script checks the platform and
the parallel layout, then prints how it will be used.
"""

USAGE = """usage: torchrun --nproc-per-node N pretrain_early_exit_gpt.py [Megatron-LM flags] [early-exit flags]

The training loop is not implemented yet; see README.md for what works today."""


def main():
    import megatron.early_exit  # noqa: F401  (version check, CPU adapter)

    print(USAGE)


if __name__ == "__main__":
    main()
