"""One row per setting: quality (perplexity, task metrics) next to measured speed; as a
table, a JSON file and a PNG plot of each quality measure against decode speed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence


@dataclass
class Row:
    setting: str
    exit_layer: Optional[int] = None
    threshold: Optional[float] = None
    perplexity: Optional[float] = None
    mean_depth: Optional[float] = None  # layers per token (scored tokens, else decoded ones)
    metrics: Dict[str, float] = field(default_factory=dict)  # "task metric" -> value
    agreement: Optional[float] = None  # decoded tokens equal to full depth's, position by position
    tokens_per_second: Optional[float] = None  # greedy decode speed
    speedup: Optional[float] = None  # over full depth, same prompts, same run


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    metrics = sorted({m for r in rows for m in r.metrics})
    widths = {m: max(len(m) + 2, 10) for m in metrics}
    header = [
        f"{'setting':<18}",
        f"{'ppl':>10}",
        f"{'depth':>7}",
        *(f"{m:>{widths[m]}}" for m in metrics),
        f"{'agreement':>10}",
        f"{'tokens/s':>10}",
        f"{'speedup':>8}",
    ]
    lines = ["".join(header)]
    for r in rows:
        lines.append(
            "".join(
                [
                    f"{r.setting:<18}",
                    f"{_fmt(r.perplexity, '.3f'):>10}",
                    f"{_fmt(r.mean_depth, '.2f'):>7}",
                    *(f"{_fmt(r.metrics.get(m), '.4f'):>{widths[m]}}" for m in metrics),
                    f"{_fmt(r.agreement, '.3f'):>10}",
                    f"{_fmt(r.tokens_per_second, '.1f'):>10}",
                    f"{_fmt(r.speedup, '.2f'):>7}x" if r.speedup is not None else f"{'-':>8}",
                ]
            )
        )
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[Row], **extra) -> None:
    with open(path, "w") as f:
        json.dump({"rows": [asdict(r) for r in rows], **extra}, f, indent=1, default=str)


def plot(path: str, rows: Sequence[Row]) -> None:
    """One panel per quality measure, against decode speed (mean depth when speed was not
    measured); each setting a colour and marker, named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures: List[tuple] = []
    if any(r.perplexity is not None for r in rows):
        measures.append(("perplexity", lambda r: r.perplexity))
    for m in sorted({m for r in rows for m in r.metrics}):
        measures.append((m, lambda r, m=m: r.metrics.get(m)))
    use_speed = any(r.tokens_per_second is not None for r in rows)
    x_of = (lambda r: r.tokens_per_second) if use_speed else (lambda r: r.mean_depth)
    # Settings close in speed and quality would print their labels over each other: each gets
    # its own colour and marker instead, named once in a legend beside the panels.
    markers = "osD^vP*Xh<>p"
    style = {r.setting: (f"C{i % 10}", markers[i % len(markers)]) for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, max(len(measures), 1), figsize=(4.5 * max(len(measures), 1) + 2, 4), squeeze=False)
    for ax, (name, y_of) in zip(axes[0], measures):
        for r in rows:
            if x_of(r) is not None and y_of(r) is not None:
                color, marker = style[r.setting]
                ax.scatter([x_of(r)], [y_of(r)], color=color, marker=marker, s=45, label=r.setting, zorder=3)
        ax.set_xlabel("decode tokens/s" if use_speed else "mean layers per token")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="setting")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
