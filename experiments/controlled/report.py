"""docs/controlled/results.md and its figures, from the committed measures only (plan.md's claims):

    python -m experiments.controlled.report --docs docs/controlled --results docs/controlled/results.md

Primary family (Holm over P1-P4, alpha 0.05), each a paired difference over training seeds (the
same windows at every setting and row): its mean, 95% t-interval and a one-sided paired t-test in
the claimed direction. Verdicts: supported (Holm-adjusted p < 0.05), contradicted (the interval
wholly on the other side of the claim's null: 0 for P1-P3; -0.05 for P4, whose test is d > -0.05:
our reading of "the other side" for P4), else inconclusive. Secondary (S1-S3 and P1's other
settings): unadjusted intervals, "consistent with" or "not", never "supported".
Layer: above summary.py; plan.py's report stage runs it.
"""

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from experiments.controlled.settings import (ALPHA, BOOTSTRAP, MATERIAL_COST, PRIMARY_SHORTCUT, SEEDS, SHORTCUTS,
                                             s_name)
from experiments.controlled.summary import (METRICS, ROWS, SEEDED, against_knob, cell, get, load, mean_interval,
                                            training_curves)
from nanogdrt import files, inference
from nanogdrt.stats import spearman

S1_RATIOS = ("task ratio (paper, of means)", "prefix ratio (paper, of means)", "task ratio (per-token)")


def paired(a: dict, b: dict, label, f=None) -> list[float]:
    """Per seed present in both: a - b of a measure (f: a function of a run instead)."""
    f = f or (lambda m: get(m, label))
    return [f(a[k]) - f(b[k]) for k in sorted(set(a) & set(b))]


def one_sided(d, null=0.0) -> dict:
    """Mean, 95% t-interval and the one-sided paired t-test of mean(d) > null."""
    from scipy import stats
    mean, lo, hi = mean_interval(d)
    n = len(d)
    if n < 2:
        return {"n": n, "mean": mean, "lo": lo, "hi": hi, "p": float("nan")}
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    p = float(stats.t.sf((mean - null) / se, n - 1)) if se > 0 else (0.0 if mean > null else 1.0)
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "p": p}


def holm(ps: dict) -> dict:
    """Holm-adjusted p-values (nanogdrt.inference.holm) over the claims that have runs; NaN (a claim
    without runs) stays NaN and does not count in the family's size."""
    ranked = inference.holm({k: p for k, p in ps.items() if p == p}).adjusted
    return {k: ranked.get(k, float("nan")) for k in ps}


def primary(data) -> list[dict]:
    """P1-P4 (plan.md), each: claim, d's statistics, null, Holm p, verdict."""
    hi_s, lo_s = data.get(PRIMARY_SHORTCUT, {}), data.get(0.0, {})
    ex, rel = "excess over the oracle", "oracle-relative E[NDCG@10]"
    claims = [
        ("P1", "SFT learns the shortcut: excess_SFT(s=0.3) - excess_SFT(s=0)", paired(hi_s.get("sft", {}), lo_s.get("sft", {}), ex), 0.0),
        ("P2", "GDRT removes it: excess_SFT - excess_GDRT at s=0.3", paired(hi_s.get("sft", {}), hi_s.get("gdrt", {}), ex), 0.0),
        ("P3", "GDRT beats the control: excess_control - excess_GDRT at s=0.3",
         paired(hi_s.get("control", {}), hi_s.get("gdrt", {}), ex), 0.0),
        ("P4", "GDRT's accuracy cost: rel. E[NDCG@10] GDRT - SFT at s=0.3 (test: d > -0.05)",
         paired(hi_s.get("gdrt", {}), hi_s.get("sft", {}), rel), MATERIAL_COST)]
    out = [{"id": i, "claim": c, "null": null, **one_sided(d, null)} for i, c, d, null in claims]
    adjusted = holm({c["id"]: c["p"] for c in out})
    for c in out:
        c["holm_p"] = adjusted[c["id"]]
        if c["n"] < 2:
            c["verdict"] = "not resolved (runs missing)"
        elif c["holm_p"] < ALPHA:
            c["verdict"] = "supported"
        elif c["hi"] < c["null"]:
            c["verdict"] = "contradicted"
        else:
            c["verdict"] = "inconclusive"
    p2, p4 = out[1], out[3]
    gdrt_excess = mean_interval([get(m, ex) for m in hi_s.get("gdrt", {}).values()])
    if p2["verdict"] == "supported":
        removes = gdrt_excess[1] <= 0 <= gdrt_excess[2]
        p2["verdict"] += f" ({'removes' if removes else 'reduces, does not remove'}: GDRT's excess {cell(gdrt_excess)})"
    if p4["n"] >= 2:
        word = ("no material cost" if p4["lo"] > MATERIAL_COST else "costs accuracy" if p4["hi"] < 0
                else "cost not resolved")
        p4["verdict"] += f"; {word}"
    return out


def secondary_word(c, sign=+1) -> str:
    lo, hi = (c["lo"], c["hi"]) if sign > 0 else (-c["hi"], -c["lo"])
    if c["n"] < 2:
        return "not resolved (runs missing)"
    return "consistent with" if lo > 0 else "not consistent with (the other side)" if hi < 0 else "not consistent with (interval holds 0)"


def fmt_d(c) -> str:
    return f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] (n = {c['n']})" if c["n"] >= 2 else "-"


def secondary(data, B=BOOTSTRAP) -> list[str]:
    ex = "excess over the oracle"
    L = ["", "## Secondary (unadjusted 95% intervals; consistent with / not, never supported)", "",
         "| claim | d: mean [95% t-interval] | reading |", "|---|---|---|"]
    for s in sorted(data):
        if s > 0 and s != PRIMARY_SHORTCUT:                # P1's other settings (0.3 is the primary's)
            c = one_sided(paired(data[s]["sft"], data.get(0.0, {}).get("sft", {}), ex))
            L.append(f"| P1 at s={s:g}: excess_SFT(s) - excess_SFT(0) > 0 | {fmt_d(c)} | {secondary_word(c)} |")

    def swap_ratio(s):
        o = get(data[s]["oracle"].get(0), "swap: top-1 changed") if data[s]["oracle"] else float("nan")
        return lambda m: get(m, "swap: top-1 changed") / o
    if PRIMARY_SHORTCUT in data and 0.0 in data:
        a, b = data[PRIMARY_SHORTCUT]["sft"], data[0.0]["sft"]
        d = [swap_ratio(PRIMARY_SHORTCUT)(a[k]) - swap_ratio(0.0)(b[k]) for k in sorted(set(a) & set(b))]
        c = one_sided(d)
        L.append(f"| P1: SFT's swap top-1-changed / the oracle's falls from s=0 to 0.3 | {fmt_d(c)} | "
                 f"{secondary_word(c, -1)} |")
    for s in sorted(data):
        curves = [m["curve"] for m in data[s]["sft"].values() if "curve" in m]
        if curves:
            c = one_sided([cv["top1_generic_share"][-1] - cv["top1_generic_share"][0] for cv in curves])
            L.append(f"| P1 (Fig. 4/9) at s={s:g}: SFT's top-1 generic share, last snapshot - base (step 0) "
                     f"| {fmt_d(c)} | {secondary_word(c)} |")
    L += s2(data) + s1(data, B)
    return L


def s2(data) -> list[str]:
    """S2: at s = 0, SFT against the base model (towards the oracle?) and GDRT against SFT."""
    if 0.0 not in data:
        return []
    d, L = data[0.0], ["", "S2, the control setting s = 0 (nothing planted):", ""]
    base = d["base"].get(0)
    for label in ("excess over the oracle", "MGU@5 (world)", "DGU@5 (world)"):
        sft = mean_interval([get(m, label) for m in d["sft"].values()])
        L.append(f"- {label}: SFT {cell(sft)} vs base {get(base, label):.3f} (oracle "
                 f"{get(d['oracle'].get(0), label):.3f})." if base else f"- {label}: SFT {cell(sft)}, base not measured.")
    if base:
        c = one_sided([abs(get(base, "excess over the oracle")) - abs(get(m, "excess over the oracle"))
                       for m in d["sft"].values()])
        L.append(f"- |excess_base| - |excess_SFT| > 0 (SFT moves towards the oracle): {fmt_d(c)}: {secondary_word(c)}.")
    for label in ("excess over the oracle", "oracle-relative E[NDCG@10]"):
        c = one_sided(paired(d["gdrt"], d["sft"], label))
        L.append(f"- GDRT - SFT at s = 0, {label}: {fmt_d(c)}.")
    return L


def s1(data, B=BOOTSTRAP) -> list[str]:
    """S1: Spearman of each attribution ratio with swap top-1-changed (and with excess) across all
    trained runs; percentile interval from B bootstrap resamples of runs (seed 0)."""
    runs = [m for s in data for r in SEEDED for m in data[s][r].values()]
    L = ["", f"S1, do the measures agree ({len(runs)} trained runs; Spearman, bootstrap 95% over runs, {B} "
         "resamples, seed 0; agree = interval below 0 for reliance):", "",
         "| ratio | with swap top-1 changed | reading | with excess |", "|---|---|---|---|"]
    if len(runs) < 3:
        return L + ["| (fewer than 3 runs) | - | - | - |"]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(runs), size=(B, len(runs)))
    for ratio in S1_RATIOS:
        x = np.array([get(m, ratio) for m in runs])
        cells = []
        for other in ("swap: top-1 changed", "excess over the oracle"):
            y = np.array([get(m, other) for m in runs])
            boot = [spearman(x[i], y[i]) for i in idx]
            boot = np.array([b for b in boot if b == b])
            lo, hi = (np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"),) * 2)
            cells.append((spearman(x, y), lo, hi))
        (r, lo, hi), (r2, lo2, hi2) = cells
        word = "agree" if hi < 0 else "disagree" if lo > 0 else "inconclusive"
        L.append(f"| {ratio} | {r:+.3f} [{lo:+.3f}, {hi:+.3f}] | {word} | {r2:+.3f} [{lo2:+.3f}, {hi2:+.3f}] |")
    return L


def setting_table(s, d, gate: Path) -> list[str]:
    rows = [r for r in ("oracle", *ROWS) if d.get(r)]
    L = ["", f"### s = {s:g}", "", "| measure | " + " | ".join(
        f"{ROWS.get(r, r)} ({'1' if r in ('oracle', 'base') else len(d[r])})" for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|"]
    for label in METRICS:
        L.append(f"| {label} | " + " | ".join(cell(mean_interval([get(m, label) for m in d[r].values()]))
                                              for r in rows) + " |")
    if gate.exists():
        g = json.loads(gate.read_text())
        L.append(f"\nPilot gate at s = {s:g}: {'passed' if g['passed'] else 'FAILED'} ({g['rule']}): SFT swap "
                 f"{g['sft_swap_top1_changed']:.3f}, oracle-relative E[NDCG@10] SFT {g['sft_relative_E[NDCG@10]']:.3f} "
                 f"vs base {g['base_relative_E[NDCG@10]']:.3f}.")
    return L


def report(a):
    shortcuts = tuple(float(x) for x in a.shortcuts.split(","))
    seeds = tuple(int(x) for x in a.seeds.split(","))
    data = load(a.docs, shortcuts, seeds)
    figs = Path(a.figures)
    numbers = {"against_s": {label: against_knob(data, label, figs / f"{slug(label)}.png") for label in METRICS},
               "top1_over_steps": training_curves(data, figs / "top1_generic_over_steps.png")}
    files.write_json(figs / "figures.json", numbers)
    L = ["# Controlled world: results (generated by experiments/controlled/report.py; do not edit by hand)", "",
         "The plan, registered before any run: [plan.md](plan.md). Cells: seed mean [95% t-interval over training "
         "seeds] (n in the header); the oracle and the base model are one run each.", "",
         "## Primary claims (s = 0.3; Holm over P1-P4, alpha 0.05)", "",
         "| claim | d: mean [95% t-interval] | one-sided p | Holm p | verdict |", "|---|---|---|---|---|"]
    for c in primary(data):
        L.append(f"| {c['id']}. {c['claim']} | {fmt_d(c)} | {c['p']:.4f} | {c['holm_p']:.4f} | {c['verdict']} |")
    L += secondary(data, a.bootstrap)
    L += ["", "## Per setting and row"]
    for s in shortcuts:
        L += setting_table(s, data[s], Path(a.docs) / s_name(s) / "gate.json")
    L += ["", "## Figures (S3)", ""]
    rel = lambda p: Path(os.path.relpath(p, Path(a.results).parent)).as_posix()   # noqa: E731
    L += [f"- [{label}]({rel(figs / (slug(label) + '.png'))})" for label in METRICS if (figs / f"{slug(label)}.png").exists()]
    if (figs / "top1_generic_over_steps.png").exists():
        L.append(f"- [top-1 generic share over training steps (Fig. 4/9)]({rel(figs / 'top1_generic_over_steps.png')})")
    L += times(Path(a.docs))
    files.write_text(a.results, "\n".join(L) + "\n")
    print("\n".join(L[:14]))


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_").lower()


def times(docs: Path) -> list[str]:
    m = json.loads((docs / "manifest.json").read_text()) if (docs / "manifest.json").exists() else {}
    L = ["", "## Wall time per stage", "", "| stage | minutes | machine | commands |", "|---|---|---|---|"]
    return L + [f"| {k} | {v['seconds'] / 60:.1f} | {v['machine']} | " + "<br>".join(f"`{c}`" for c in v["commands"])
                + " |" for k, v in m.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default="docs/controlled")
    p.add_argument("--figures", default="docs/figures/controlled")
    p.add_argument("--results", default="docs/controlled/results.md")
    p.add_argument("--shortcuts", default=",".join(f"{s:g}" for s in SHORTCUTS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP)
    a = p.parse_args(argv)
    report(a)


if __name__ == "__main__":
    main()
