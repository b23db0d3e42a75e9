"""Pretraining whose save stops at one moment, to be killed there (crash-safety tests).

    python tests/checkpoint_pause.py MOMENT:ITERATION:FILE [pretrain_early_exit_gpt.py flags]

At MOMENT of the save of ITERATION the process creates FILE and waits (a test kills it).
Moments: writing (about to write the shard files), before_rename (shards written, the
directory still iter_N.tmp), before_marker (renamed, latest_checkpointed_iteration.txt
not yet updated). The pauses wrap the trainer's save from outside: the product code has no
test hook.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTS = ("writing", "before_rename", "before_marker")


def _wait_here(file: str) -> None:
    open(file, "w").close()
    while True:
        time.sleep(1)


def install(moment: str, iteration: int, file: str) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    from megatron.early_exit.checkpoint import writer
    from megatron.early_exit.checkpoint.reader import checkpoint_dir

    name = os.path.basename(checkpoint_dir("", iteration))
    if moment == "writing":  # the first shard file of that save, before it is written
        write = fsa.FileSystemWriterAsync.write_preloaded_data

        def write_preloaded_data(transform_list, index, bucket, *args, **kwargs):
            if f"{name}.tmp" in str(bucket[0]):  # (file name, storage key, data)
                _wait_here(file)
            return write(transform_list, index, bucket, *args, **kwargs)

        fsa.FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)
    elif moment == "before_rename":
        put_in_place = writer._put_in_place

        def paused_put_in_place(root, tmp, final, it, *args, **kwargs):
            if it == iteration:
                _wait_here(file)
            return put_in_place(root, tmp, final, it, *args, **kwargs)

        writer._put_in_place = paused_put_in_place
    elif moment == "before_marker":
        replace = os.replace

        def replace_then_wait(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if os.path.basename(str(dst)) == name and str(src).endswith(".tmp"):
                _wait_here(file)

        os.replace = replace_then_wait  # this process only: the trainer's rename of iter_N.tmp
    else:
        raise SystemExit(f"moment must be one of {MOMENTS}, got {moment!r}")


def main() -> None:
    moment, iteration, file = sys.argv[1].split(":", 2)
    sys.path.insert(0, ROOT)
    install(moment, int(iteration), file)
    sys.argv = [os.path.join(ROOT, "pretrain_early_exit_gpt.py")] + sys.argv[2:]
    import pretrain_early_exit_gpt

    pretrain_early_exit_gpt.main(sys.argv[1:])


if __name__ == "__main__":
    main()
