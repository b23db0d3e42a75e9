"""The quick start's picture of what early exit does on its model (one PNG, two panels):
the training loss of every exit and of the final layer over the run, and early-exit decoding's
speedup against its agreement with full depth at each threshold.

    write_png(path, curves, rows)   # curves: {name: [(step, loss)]}, rows: [(label, speedup, agreement)]
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


def training_curves(tb_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """Training losses per head (`lm loss`, `early loss [L]`) from the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {
        tag[len("train/") :]: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith("train/") and "loss" in tag and "distill" not in tag
    }


def write_png(
    path: str, curves: Dict[str, List[Tuple[int, float]]], rows: Sequence[Tuple[str, float, float]], title: str = ""
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    # Final layer first, then exits shallow to deep.
    order = sorted(curves, key=lambda name: (name != "lm loss", len(name), name))
    for name in order:
        steps, values = zip(*curves[name])
        label = "final layer" if name == "lm loss" else name.replace("early loss [", "exit after layer ").rstrip("]")
        left.plot(steps, values, label=label, linewidth=2 if name == "lm loss" else 1.3)
    left.set_xlabel("training iteration")
    left.set_ylabel("training loss (nats)")
    left.set_title("training loss of the final layer and of each exit")
    left.grid(alpha=0.3)
    if curves:
        left.legend(loc="upper right")

    # A legend rather than labels at the points: thresholds often land on top of each other.
    markers = "osD^vP*X"
    for i, (label, speedup, agreement) in enumerate(rows):
        right.scatter(
            [agreement], [speedup], s=50, zorder=3, color=f"C{i % 10}", marker=markers[i % len(markers)], label=label
        )
    right.legend(loc="lower left", fontsize=9)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_xlabel("agreement with full-depth output")
    right.set_ylabel("decode speed / full depth")
    right.set_title("early-exit decoding by threshold")
    right.grid(alpha=0.3)
    lo = min([a for _, _, a in rows] + [0.9])
    right.set_xlim(lo - 0.1 * (1.0 - lo) - 0.01, 1.01)
    top = max([s for _, s, _ in rows] + [1.0])
    right.set_ylim(0, top * 1.25)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
