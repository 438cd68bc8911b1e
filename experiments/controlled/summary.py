"""The committed measures read back, summarised over seeds, and drawn: what report.py tables and
the figures of S3 and Fig. 4/9 share. Reads docs/controlled/s<S>/<row>[-seed<k>]/measures.json only.

Intervals over training seeds: mean +- t(n-1, 0.975) sd / sqrt(n) (the plan: t(4) = 2.776 for five
seeds). Figures: each measure against the knob s, one line per row (seed mean, 95% band), the
oracle dotted; and the top-1 generic share over training steps, base model at step 0.
Layer: above measures.py (whose output it reads); report.py draws and tables through it.
"""

import json
import math
from pathlib import Path

import numpy as np

from experiments.controlled.settings import s_name
from nanogdrt import files

ROWS = {"base": "base model", "sft": "SFT", "gdrt": "GDRT", "control": "control (group-mean)"}
SEEDED = ("sft", "gdrt", "control")
# Label -> where a measures.json holds it; the oracle's block has the list measures only.
METRICS = {
    "oracle-relative E[NDCG@10]": ("relative", "E[NDCG@10]"), "oracle-relative E[HR@10]": ("relative", "E[HR@10]"),
    "E[NDCG@10]": ("expected", "NDCG@10"), "E[HR@10]": ("expected", "HR@10"),
    "NDCG@5 (drawn)": ("realized", "NDCG@5"), "NDCG@10 (drawn)": ("realized", "NDCG@10"),
    "HR@5 (drawn)": ("realized", "HR@5"), "HR@10 (drawn)": ("realized", "HR@10"),
    "top-1 generic share": ("top1_generic_share",), "excess over the oracle": ("excess",),
    **{f"{m}@{k} ({'Eq. 2' if g == 'eq2' else 'world'})": ("fairness", g, f"{m}@{k}")
       for g in ("eq2", "world") for k in (5, 10) for m in ("MGU", "DGU")},
    "swap: top-1 changed": ("reliance", "swap", "top1_changed"), "swap: overlap@10": ("reliance", "swap", "overlap"),
    "N/A: top-1 changed": ("reliance", "na", "top1_changed"), "N/A: overlap@10": ("reliance", "na", "overlap"),
    "task ratio (paper, of means)": ("attribution", "segment", "task_ratio"),
    "task ratio (paper, mean of ratios)": ("attribution", "segment", "task_ratio_mean"),
    "instruction ratio (paper, of means)": ("attribution", "segment", "instruction_ratio"),
    "prefix ratio (paper, of means)": ("attribution", "segment", "prefix_ratio"),
    "prefix ratio (paper, mean of ratios)": ("attribution", "segment", "prefix_ratio_mean"),
    "task ratio (per-token)": ("attribution", "per_token", "task_ratio"),
    "prefix ratio (per-token)": ("attribution", "per_token", "prefix_ratio"),
}


def get(m: dict | None, label: str) -> float:
    """One measure of a measures.json (NaN when absent, e.g. reliance of the oracle)."""
    for key in METRICS[label]:
        if not isinstance(m, dict) or key not in m:
            return float("nan")
        m = m[key]
    return float(m)


def oracle_view(m: dict) -> dict:
    """The oracle as a row: its lists' measures, oracle-relative accuracy 1, excess 0, its swap."""
    o = m["oracle"]
    return {**o, "relative": {k: 1.0 for k in m["relative"]}, "excess": 0.0,
            "reliance": {"swap": {"top1_changed": o["swap_top1_changed"]}}}


def load(docs, shortcuts, seeds) -> dict:
    """{s: {"oracle": [m], "base": [m], "sft": {seed: m}, ...}} of what is committed."""
    out = {}
    for s in shortcuts:
        d = Path(docs) / s_name(s)
        read = lambda p: json.loads(p.read_text()) if p.exists() else None   # noqa: E731
        base = read(d / "base" / "measures.json")
        runs = {row: {k: m for k in seeds if (m := read(d / f"{row}-seed{k}" / "measures.json"))} for row in SEEDED}
        ref = base or next((m for r in runs.values() for m in r.values()), None)
        out[s] = {"oracle": {0: oracle_view(ref)} if ref else {}, "base": {0: base} if base else {}, **runs}
    return out


def t_quantile(n: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, n - 1))


def mean_interval(x) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% t-interval over seeds; one value: (x, nan, nan)."""
    x = np.asarray([v for v in x if v == v], float)
    if len(x) == 0:
        return (float("nan"),) * 3
    if len(x) == 1:
        return float(x[0]), float("nan"), float("nan")
    h = t_quantile(len(x)) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - h), float(x.mean() + h)


def cell(c) -> str:
    mean, lo, hi = c
    if mean != mean:
        return "-"
    return f"{mean:.3f}" if lo != lo else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


# ----------------------------------------------------------------------------- figures

def against_knob(data, label, path):
    """One measure against s: a line per row (seed mean, 95% band), the oracle dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = sorted(data)
    numbers = {}
    for row in ("oracle", *ROWS):
        cells = [mean_interval([get(m, label) for m in data[s].get(row, {}).values()]) for s in xs]
        keep = [(x, c) for x, c in zip(xs, cells) if c[0] == c[0]]
        if not keep:
            continue
        x, c = [k[0] for k in keep], np.array([k[1] for k in keep])
        ax.plot(x, c[:, 0], marker="o", linestyle=":" if row == "oracle" else "-",
                color="black" if row == "oracle" else None, label=ROWS.get(row, row))
        if np.isfinite(c[:, 1]).any():
            ax.fill_between(x, c[:, 1], c[:, 2], alpha=0.15)
        numbers[row] = {"s": x, "mean_lo_hi": c.tolist()}
    ax.set_xlabel("shortcut s")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    save(fig, path)
    return numbers


def training_curves(data, path):
    """Fig. 4/9: the top-1 generic share over training steps (base model at step 0), per row and
    setting, every curve seed drawn; the oracle's share dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = [s for s in sorted(data) if any("curve" in m for r in SEEDED for m in data[s][r].values())]
    if not settings:
        return {}
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.2), squeeze=False)
    numbers = {}
    for ax, s in zip(axes[0], settings):
        for i, row in enumerate(SEEDED):
            for seed, m in data[s][row].items():
                if "curve" in m:
                    c = m["curve"]
                    ax.plot(c["steps"], c["top1_generic_share"], color=f"C{i}", marker=".",
                            label=ROWS[row] if seed == min(k for k, v in data[s][row].items() if "curve" in v) else None)
                    numbers[f"{s_name(s)} {row} seed{seed}"] = c
        if data[s]["oracle"]:
            ax.axhline(data[s]["oracle"][0]["top1_generic_share"], color="black", linestyle=":", label="oracle")
        ax.set_title(f"s = {s:g}", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("top-1 generic share")
    axes[0][0].legend(fontsize=7)
    save(fig, path)
    return numbers


def save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
