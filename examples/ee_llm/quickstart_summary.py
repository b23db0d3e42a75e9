"""Summarise the CPU quick start: per-exit validation losses (read back from TensorBoard)
against the unigram entropy of the training corpus (the loss of a model that ignores context).

    python examples/ee_llm/quickstart_summary.py --data-prefix P --tensorboard-dir D
"""

import argparse
import sys

import numpy as np


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats) of the token distribution of a Megatron .bin/.idx dataset."""
    import megatron.early_exit  # noqa: F401  (first: it hides megatron-core's import-time warnings)

    # isort: split
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    counts = np.bincount(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def validation_curves(tb_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {
        tag[len("validation/") :]: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith("validation/") and "loss" in tag
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-prefix", required=True)
    p.add_argument("--tensorboard-dir", required=True)
    args = p.parse_args()
    entropy = unigram_entropy(args.data_prefix)
    curves = validation_curves(args.tensorboard_dir)
    if not curves:
        sys.exit(f"error: no validation scalars under {args.tensorboard_dir}")
    print(f"\nunigram entropy of the corpus: {entropy:.3f} nats (a context-free model's loss)")
    print(
        f"{'validation':<16}"
        + "".join(f"{'iter ' + str(step):>12}" for step, _ in next(iter(curves.values())))
        + f"{'vs unigram':>12}"
    )
    for name, points in sorted(curves.items(), key=lambda kv: (kv[0] != "lm loss", kv[0])):
        print(f"{name:<16}" + "".join(f"{v:>12.3f}" for _, v in points) + f"{points[-1][1] - entropy:>+12.3f}")
    best = min(points[-1][1] for points in curves.values())
    worst = max(points[-1][1] for points in curves.values())
    print(
        f"every exit ends {entropy - worst:.2f} to {entropy - best:.2f} nats below the unigram entropy"
        if worst < entropy
        else "some exit did not get below the unigram entropy"
    )


if __name__ == "__main__":
    main()
