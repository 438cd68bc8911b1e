"""Figures a reader understands without the paper: item-group distributions (Fig. 3/8), loss by
token group (Fig. 6) and the Group-DRO weights Q(g) over training. PNG files, matplotlib Agg."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from nanogdrt.files import atomic_path  # noqa: E402


def _save(fig, path):
    """Through files.atomic_path: a kill mid-save leaves the previous PNG (or none), never a 0-byte one."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")         # the temporary name has no .png suffix
    finally:
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
    if n > 4:   # many rows: the legend goes beside the axes, where it hides no bar
        fig.set_size_inches(9, 3.8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend()
    _save(fig, path)


def per_group_curves(steps, values, path, ylabel, title):
    """values (S, G): one curve per token group over optimizer steps."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for g in range(values.shape[1]):
        ax.plot(steps, values[:, g], label=f"group {g + 1}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Outside the axes: the curves cross everywhere, a legend inside would hide some of them.
    ax.legend(title="token group\n(1 = most relevant\nto auxiliary tokens)", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


# ----------------------------------------------------------------------------- figures of nanogdrt.analysis.analyze

def run_figures(out, method: str, tau: float, steps: list[dict], top1_dist, target_dist):
    """The figures of one train.py run, into folder `out`: top-1 item groups beside the test
    targets, the training loss by token group and, for GDRT, the weights Q(g) over the steps."""
    x, name = [s["step"] for s in steps], method.upper()
    group_distribution({"test targets": target_dist, f"{name} top-1": top1_dist}, out / "top1_group_distribution.png")
    per_group_curves(x, [s["group_loss"] for s in steps], out / "group_loss.png",
                     "mean NLL of the group's tokens", f"{name}: training loss by token group")
    if method.endswith("gdrt"):                 # gdrt and msl+gdrt
        per_group_curves(x, [s["q"] for s in steps], out / "group_weights.png", "Q(g)",
                         f"GDRT: group weights Q(g) = softmax(L(g)/{tau})")


def _label_bars(ax, bars):
    for b in bars:
        h = b.get_height()
        if np.isfinite(h):
            ax.annotate(f"{h:.2f}", (b.get_x() + b.get_width() / 2, h), ha="center",
                        va="bottom" if h >= 0 else "top", fontsize=7, xytext=(0, 2 if h >= 0 else -2),
                        textcoords="offset points")


def _ratio_axis(panel) -> tuple[float, float]:
    """The y-range of a Fig. 2 panel: its bars, the paper's stars and the line at 1, padded. The
    per-example dots are left out: one example with a tiny interaction drop gives a ratio of
    -20 and would squash the bars (such dots are drawn at the edge instead, see _dots_within)."""
    values = [1.0, 0.0] + [v for group in ("bars", "paper") for vs in panel.get(group, {}).values()
                           for v in vs if v is not None and np.isfinite(v)]
    lo, hi = min(values), max(values)
    pad = 0.15 * (hi - lo)
    return lo - (pad if lo < 0 else 0), hi + pad


def _dots_within(ax, x, values, lo, hi, label=None):
    """Per-example means as black dots; one outside (lo, hi) as a triangle at the edge, labelled."""
    points = [(xi, v) for xi, v in zip(x, values) if v is not None and np.isfinite(v)]
    inside = [(xi, v) for xi, v in points if lo <= v <= hi]
    ax.plot([p[0] for p in inside], [p[1] for p in inside], "o", color="black", markersize=4, label=label)
    for xi, v in points:
        if not lo <= v <= hi:
            edge = hi - 0.02 * (hi - lo) if v > hi else lo + 0.02 * (hi - lo)
            ax.plot(xi, edge, "^" if v > hi else "v", color="black", markersize=6)
            ax.annotate(f"{v:.1f}", (xi, edge), textcoords="offset points", xytext=(4, 0), fontsize=7,
                        va="center")


def attribution_ratios(panels: list[dict], path, n_examples: int, split: str):
    """Fig. 2 / 7, one panel per attribution definition (nanogdrt/attribution.py). Each panel:
    {"title": str, "xticks": (two labels), "bars": {model label: (task ratio, prefix ratio)}},
    optionally "dots" (the same ratios as the mean of per-example ratios; bars are ratios of means)
    and "paper" ({model label: (task ratio or None, prefix ratio or None)}, the paper's numbers,
    drawn as stars)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bars = panel["bars"]
        n = len(bars)
        width = 0.8 / max(n, 1)
        lo, hi = _ratio_axis(panel)
        for i, (label, values) in enumerate(bars.items()):
            x = np.arange(2) + (i - (n - 1) / 2) * width
            _label_bars(ax, ax.bar(x, [np.nan if v is None else v for v in values], width=width, label=label,
                                   color=f"C{i}"))
            if label in panel.get("dots", {}):
                _dots_within(ax, x, panel["dots"][label], lo, hi,
                             label="mean of per-example ratios" if i == 0 else None)
            if label in panel.get("paper", {}):
                ax.plot(x, [np.nan if v is None else v for v in panel["paper"][label]], "*", color="red",
                        markersize=11, markeredgecolor="black",
                        label="the paper (Toy)" if label == next(iter(panel["paper"])) else None)
        ax.set_ylim(lo, hi)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="equal attribution")
        ax.set_xticks(np.arange(2), panel["xticks"])
        ax.set_ylabel("attribution ratio (auxiliary / interaction)" + ("\nbars: ratio of means" if "dots" in panel
                                                                       else ""))
        ax.set_title(panel["title"], fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"How much the predicted title leans on auxiliary tokens\n(feature ablation, {n_examples} "
                 f"{split} examples; > 1 = context bias)", fontsize=10)
    _save(fig, path)


def epoch_curves(curves: dict[str, tuple[list, list]], path, ylabel, title, reference=None):
    """Fig. 4 / 9. curves: label -> (epochs, values); reference: (value, label) drawn dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle="--", linewidth=1, label=reference[1])
    epochs = sorted({e for x, _ in curves.values() for e in x})
    ax.set_xticks(epochs)
    ax.set_ylim(0, 1.05)  # a share
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def cooccurrence_bars(rates: dict[str, tuple[float, float]], pairs: dict[str, int], path,
                      n_examples: int, min_count: int):
    """Fig. 5. rates: pair type -> (mean P(c | y), mean P(y | c)); pairs: pair type -> count."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = list(rates)
    titles = ["is the context token there when y is trained?\nmean P(context token c | target token y)",
              "does the context token predict y?\nmean P(target token y | context token c)"]
    for k, (ax, title) in enumerate(zip(axes, titles)):
        bars = ax.bar(np.arange(len(labels)), [rates[t][k] for t in labels], color=["C1", "C2", "C0"][:len(labels)])
        _label_bars(ax, bars)
        ax.set_xticks(np.arange(len(labels)), [f"{t}-target\n({pairs[t]:,} pairs)" for t in labels])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("co-occurrence rate")
        ax.set_xlabel("(context token, target-title token) pair type")
    axes[0].set_ylim(0, 1.1)
    axes[1].margins(y=0.15)  # room for the value labels
    fig.suptitle(f"Co-occurrence of target tokens with task, prefix and interaction (history) tokens\n"
                 f"({n_examples} training examples; tokens counted >= {min_count} times)", fontsize=10)
    _save(fig, path)


def group_loss_panels(panels: dict[str, tuple[list, list]], path, window: int = 1):
    """Fig. 6. panels: run label -> (steps, values (S, G)); one panel per run, a curve per token
    group, each a moving average over `window` optimizer steps. NaN marks a step in which the group
    had no tokens: the average skips it."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.6), sharey=True, squeeze=False)
    for ax, (label, (steps, values)) in zip(axes[0], panels.items()):
        values = np.asarray(values, dtype=float)                       # (S, G)
        w = max(1, min(window, len(values)))
        kernel = np.ones(w)
        x = np.asarray(steps)[w - 1:]
        for g in range(values.shape[1]):
            seen = np.isfinite(values[:, g])
            total = np.convolve(np.where(seen, values[:, g], 0.0), kernel, mode="valid")
            count = np.convolve(seen.astype(float), kernel, mode="valid")
            with np.errstate(invalid="ignore", divide="ignore"):
                ax.plot(x, total / count, label=f"group {g + 1}")        # NaN where the window saw none
        ax.set_title(f"{label}: training loss by token group", fontsize=10)
        ax.set_xlabel("optimizer step" + (f" (moving average of {w})" if w > 1 else ""))
    axes[0, 0].set_ylabel("mean NLL of the group's target tokens")
    axes[0, -1].legend(title="token group\n(1 = most predictable\nfrom auxiliary tokens)", fontsize=7,
                       title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, path)


# ----------------------------------------------------------------------------- the reproduction's figures

def token_heatmap(users: list[dict], path, title):
    """Fig. 1 style. users: [{"row", "items": [[start, end]...], "attribution": {model: (T,)}}]; one
    panel per user, one strip per model; a shared colour scale per user; history items marked."""
    fig, axes = plt.subplots(len(users), 1, figsize=(12, 1.0 + 0.45 * sum(len(u["attribution"]) for u in users)),
                             squeeze=False)
    for ax, u in zip(axes[:, 0], users):
        rows = np.vstack(list(u["attribution"].values()))                # (models, T)
        scale = np.abs(rows).max() or 1.0
        im = ax.imshow(rows, aspect="auto", cmap="bwr", vmin=-scale, vmax=scale, interpolation="nearest")
        ax.set_yticks(np.arange(len(rows)), list(u["attribution"]))
        for s, e in u["items"]:
            ax.axvline(s - 0.5, color="gray", linewidth=0.5)
        ax.set_title(f"test row {u['row']} (gray lines: history items start)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("prompt token position")
    fig.suptitle(title + "\nA(i) = drop in log P(target title) when token i -> padding", fontsize=10)
    _save(fig, path)


def sensitivity(curves: dict[str, tuple[list, list]], sft: float | None, path, xlabel, ylabel, title, log_x=False,
                refs: dict[str, float] | None = None, sft_band: tuple[float, float] | None = None):
    """Fig. 10 / 11. curves: label -> (x values, metric); sft: the SFT level, drawn dashed;
    refs: other levels (label -> value), dotted; sft_band: (low, high) of SFT over its seeds, shaded."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=label)
    if sft is not None:
        ax.axhline(sft, color="gray", linestyle="--", linewidth=1, label="SFT (seed 0)" if sft_band else "SFT")
    if sft_band is not None:
        ax.axhspan(*sft_band, color="gray", alpha=0.15, label="SFT, range over seeds")
    for (label, value), color in zip((refs or {}).items(), ("black", "tab:purple", "tab:brown")):
        ax.axhline(value, color=color, linestyle=":", linewidth=1.2, label=label)
    if log_x:   # ticks at the grid's own values, written plainly (0.2, 0.5, 1, 2, 5)
        ax.set_xscale("log")
        ax.set_xticks(sorted({v for x, _ in curves.values() for v in x}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def labelled_scatter(points: list[dict], path, xlabel, ylabel, title, reference: float | None = None):
    """One dot per run, coloured by its kind and labelled; points: {"x", "y", "kind", "label"}.
    reference: a level drawn dashed (e.g. the uniform weight 1/G)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    kinds = list(dict.fromkeys(p["kind"] for p in points))
    for k, color in zip(kinds, plt.cm.tab10.colors):
        pts = [p for p in points if p["kind"] == k]
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], color=color, label=k, zorder=3)
        for p in pts:
            ax.annotate(p["label"], (p["x"], p["y"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if reference is not None:
        ax.axvline(reference, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def interval_bars(groups: dict[str, dict[str, tuple[float, float, float]]], path, ylabel, title):
    """groups: x label -> {series: (point, lo, hi)}; grouped bars with 95% interval whiskers."""
    series = list(dict.fromkeys(name for g in groups.values() for name in g))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        at = [(j, g[name]) for j, g in enumerate(groups.values()) if name in g]
        x = [j + (i - (len(series) - 1) / 2) * width for j, _ in at]
        point = [c[0] for _, c in at]
        ax.bar(x, point, width=width, label=name)
        ax.errorbar(x, point, yerr=[[c[0] - c[1] for _, c in at], [c[2] - c[0] for _, c in at]], fmt="none",
                    color="black", capsize=3, linewidth=1)
        for xi, (_, c) in zip(x, at):   # the value above its whisker, where it hides nothing
            ax.annotate(f"{c[0]:.2f}", (xi, c[2]), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def moving_average(y, window: int) -> tuple[np.ndarray, int]:
    """Mean over `window` consecutive values (shorter series: the whole series); NaN-free input."""
    y = np.asarray(y, dtype=float)
    w = max(1, min(window, len(y)))
    return np.convolve(y, np.ones(w) / w, mode="valid"), w


def effective_groups(curves: dict[str, tuple[list, list]], groups: dict[str, int], path, window: int = 10):
    """exp(H(Q)) per optimizer step, one curve per run and one panel per number of token groups
    (`groups`: run label -> its G); 1 = all weight on one group, G = uniform. Q moves with every
    batch, so each curve is a moving average over `window` steps: a dozen raw curves are noise."""
    sizes = sorted(set(groups.values()))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes) + 1.5, 3.8), squeeze=False)
    for ax, G in zip(axes[0], sizes):
        labels = [k for k in curves if groups[k] == G]
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:max(len(labels), 1)]
        for color, label in zip(colors, labels):
            x, y = curves[label]
            smooth, w = moving_average(y, window)
            ax.plot(np.asarray(x)[w - 1:], smooth, label=label, linewidth=1.3, color=color)
        ax.set_ylim(0.9, G + 0.1)
        ax.axhline(G, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"G = {G}", fontsize=10)
        ax.set_xlabel(f"optimizer step (moving average of {window})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[0, 0].set_ylabel("effective groups exp(H(Q))\n(1 = one group, dotted: uniform)")
    fig.suptitle("What GDRT trains on: the effective number of token groups", fontsize=10)
    _save(fig, path)
