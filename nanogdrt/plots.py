"""Figures a reader understands without the paper: item-group distributions (Fig. 3/8), loss by
token group (Fig. 6) and the Group-DRO weights Q(g) over training. PNG files, matplotlib Agg."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group_distribution(bars: dict[str, list[float]], path, title="Top-1 recommendations by item group"):
    """bars: label -> share of items in groups 1..G (e.g. {"test targets": ..., "GDRT top-1": ...})."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    n = len(bars)
    width = 0.8 / max(n, 1)
    for i, (label, shares) in enumerate(bars.items()):
        x = np.arange(1, len(shares) + 1) + (i - (n - 1) / 2) * width
        ax.bar(x, shares, width=width, label=label)
    ax.set_xlabel("item group by relevance to the task text (Eq. 2; 1 = most relevant)")
    ax.set_ylabel("share of items")
    ax.set_title(title)
    ax.set_xticks(np.arange(1, len(next(iter(bars.values()))) + 1))
    ax.legend()
    _save(fig, path)


def per_group_curves(steps, values, path, ylabel, title):
    """values (S, G): one curve per token group over optimizer steps."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for g in range(values.shape[1]):
        ax.plot(steps, values[:, g], label=f"group {g + 1}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(title="token group (1 = most relevant to auxiliary tokens)", fontsize=8)
    _save(fig, path)
