"""The robustness part of the reproduction's report (docs/results.md): training seeds, what GDRT
trains on (Q over training, the loss spread, the token groups' composition), the G x tau grid
against SFT, our uniform-Q control against GDRT, and the item groups' link to title length.
A section of the report (experiments/repro/report.py assembles it); layer: above rows.py and data.py.
"""

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from experiments.repro.data import top1_items, top1_summary
from experiments.repro.rows import SELECT_KEYS, TABLE_KEYS, best_valid, control_row, gdrt_row, parse_grid
from nanogdrt.metrics import N_ITEM_GROUPS
from nanogdrt.stats import (effect_word, fmt, group_weight, paired, point, q_entropy, q_summary, spearman, token_cell,
                            verdict_cell, welch_interval)


CONTROL = "uniform Q (control)"


def seed_values(a, docs, rows) -> dict:
    """{"SFT": [...], "GDRT": [...], CONTROL: [...]}: each tested training seed's test metrics (point
    estimates), and GDRT's mean exp(H(Q)) per seed under "GDRT exp(H(Q))". The control (our addition)
    has GDRT's G."""
    g, tau = parse_grid(a.robust_gdrt)[0]
    out = {}
    for name, make in (("SFT", lambda s: f"sft-s{s}"), ("GDRT", lambda s: gdrt_row(g, tau, s)),
                       (CONTROL, lambda s: control_row(g, s))):
        folders = [make(s) for s in range(a.seeds) if (docs / make(s) / "test_predictions.jsonl").exists()]
        out[name] = [rows.point(f) for f in folders]
        if name == "GDRT":
            out["GDRT exp(H(Q))"] = [np.nanmean(q_entropy(json.loads((docs / f / "train_results.json").read_text())["steps"]))
                                     for f in folders]
    return out


def seed_differences(seeds, A="GDRT", B="SFT") -> dict | None:
    """{metric: (A's seed mean - B's, Welch lo, hi)}, when both rows have two seeds at least."""
    xa, xb = seeds.get(A, []), seeds.get(B, [])
    if len(xa) < 2 or len(xb) < 2:
        return None
    return {k: welch_interval([v[k] for v in xa], [v[k] for v in xb]) for k in TABLE_KEYS}


def seed_verdicts(seeds) -> list[str]:
    """The Verdicts table's row over training seeds, when both rows have two seeds at least."""
    d = seed_differences(seeds)
    if d is None:
        return []
    return [f"| GDRT beats SFT over training seeds ({len(seeds['GDRT'])} vs {len(seeds['SFT'])}; Welch interval of "
            "the seed means) | " + " | ".join(verdict_cell(d[k], k) for k in TABLE_KEYS) + " |"]


def seeds_section(a, seeds):
    g, tau = parse_grid(a.robust_gdrt)[0]
    L = ["", f"## Training seeds (SFT and GDRT G={g} tau={tau:g}): mean +- sd of test metrics, Q's effective groups", "",
         "| row | seeds | " + " | ".join(TABLE_KEYS) + " | mean exp(H(Q)) |", "|---" * (len(TABLE_KEYS) + 3) + "|"]

    def cell(xs):   # a spread needs two seeds at least
        return f"{np.mean(xs):.4f} +- {np.std(xs, ddof=1):.4f}" if len(xs) > 1 else f"{xs[0]:.4f} (one seed)"
    for name in ("SFT", "GDRT", CONTROL):
        vals = seeds.get(name, [])
        if vals:
            eff = seeds.get(f"{name} exp(H(Q))")
            L.append(f"| {name} | {len(vals)} | " + " | ".join(cell([v[k] for v in vals]) for k in TABLE_KEYS)
                     + (f" | {np.mean(eff):.2f} |" if eff else " | - |"))
    shown = False
    for A, B in (("GDRT", "SFT"), (CONTROL, "SFT"), ("GDRT", CONTROL)):
        diffs = seed_differences(seeds, A, B)
        if diffs is not None:
            L.append(f"| {A} - {B} | seed means | " + " | ".join(fmt(diffs[k]) for k in TABLE_KEYS) + " | - |")
            shown = True
    if shown:
        L += ["", "The A - B rows: difference of the seed means [Welch t 95% interval]. They measure training "
              "noise, which the bootstrap over users above does not; with 2-3 seeds per row they are wide. "
              f"The {CONTROL} row is our addition (GDRT's groups, Q = 1/G; section \"Control\" below)."]
    return L


def trains_on_section(a, docs):
    """Q over training for every GDRT-weighted run, the plain-words reading of its scale, and the
    token groups' composition by position (from the figures stage's figures.json, when it ran)."""
    runs = [f for f in sorted(docs.glob("gdrt-*")) + sorted(docs.glob("msl-gdrt-*"))
            if (f / "train_results.json").exists()]
    if not runs:
        return []
    L = ["", "## What GDRT trains on", "",
         "Per run, over its logged optimizer steps: exp(H(Q)), the effective number of groups (G when Q is "
         "uniform, 1 when one group takes all the weight); the mean of max Q; the share of steps with max Q > 0.9; "
         "the group most often weighted highest; the mean spread of the group losses L(g) (max - min, in nats) "
         "and that spread divided by tau.", "",
         "| run | G | tau | steps | exp(H(Q)) | max Q | steps max Q > 0.9 | top group (share of steps) | "
         "L(g) spread | spread / tau | mean L(g) | mean Q(g) |", "|---" * 12 + "|"]
    summaries = {}
    for f in runs:
        r = json.loads((f / "train_results.json").read_text())
        G, tau = r["config"]["groups"], r["config"]["tau"]
        q = summaries[f.name] = q_summary(r["steps"], tau) | {"tau": tau}
        L.append(f"| {f.name} | {G} | {tau:g} | {q['steps']} | {q['exp_H_Q']:.2f} | {q['max_q']:.2f} | "
                 f"{q['one_hot_share']:.0%} | {q['top_group']} ({q['top_group_share']:.0%}) | {q['loss_spread']:.2f} | "
                 f"{q['spread_over_tau']:.1f} | {' '.join(f'{x:.2f}' for x in q['group_loss'])} | "
                 f"{' '.join(f'{x:.2f}' for x in q['q_mean'])} |")
    for f in sorted(docs.glob("sft-s*")):   # SFT's own group losses, for comparison (no Q)
        if (f / "train_results.json").exists():
            r = json.loads((f / "train_results.json").read_text())
            mean_loss = np.mean([s["group_loss"] for s in r["steps"]], axis=0)
            L.append(f"| {f.name} (SFT, for comparison) | {len(mean_loss)} | - | {len(r['steps'])} | - | - | - | - | - | - | "
                     f"{' '.join(f'{x:.2f}' for x in mean_loss)} | - |")
    robust = gdrt_row(*parse_grid(a.robust_gdrt)[0])          # the seeds' configuration, else the first run
    name, q = (robust, summaries[robust]) if robust in summaries else next(iter(summaries.items()))
    tau = q["tau"]
    L += ["", f"Why Q goes one-hot, in plain words: Q(g) is proportional to exp(L(g)/tau), so two groups whose mean "
          f"losses differ by d nats get weights in the ratio exp(d/tau). Only d/tau matters; adding a constant to "
          f"every loss changes nothing. In {name}, the hardest and the easiest group present in a step differ by "
          f"{q['loss_spread']:.2f} nats on average; at tau = {tau:g} that is a weight ratio of about "
          f"exp({q['spread_over_tau']:.1f}) = {math.exp(min(q['spread_over_tau'], 700)):.3g}, so the hardest group "
          f"takes {q['max_q']:.0%} of the weight on average and the effective number of groups is "
          f"{q['exp_H_Q']:.2f}: on average group {q['top_group']} gets {q['q_mean'][q['top_group'] - 1]:.0%} of the weight "
          f"and the groups that SFT already fits well get next to none. For Q to mix several groups, "
          f"tau must be on the scale of the spread (a few nats): the grid's tau = 2 and 5 rows."]
    figs = Path(a.figures) / "figures.json"
    comp = json.loads(figs.read_text()).get("group_composition") if figs.exists() else None
    if comp:
        names = [k for k in comp[0] if k not in ("group", "tokens", "top_tokens")]
        top = "top_tokens" in comp[0]          # figures.json of an older figures stage lacks them
        L += ["", "Token groups of the chosen GDRT run by position in the target (share of each group's "
              "target tokens; group 1 = the highest Eq. 3 relevance to the auxiliary tokens, G = the lowest)"
              + (", and each group's most frequent tokens with their share of it" if top else "") + ":", "",
              "| group | tokens | " + " | ".join(names) + (" | most frequent tokens" if top else "") + " |",
              "|---" * (len(names) + 2 + top) + "|"]
        L += [f"| {c['group']} | {c['tokens']} | " + " | ".join(f"{c[k]:.0%}" for k in names)
              + (" | " + ", ".join(f"{token_cell(t)} {share:.0%}" for t, share in c["top_tokens"]) if top else "")
              + " |" for c in comp]
    return L


def grid_section(a, docs, rows, sft, seeds=None):
    """Fig. 10/11 as a table: every grid point's validation scores (the selection), its test scores,
    its paired difference against SFT of the same seed (`sft`: sft-s0's users, or None), and how
    many groups its Q really mixes. `seeds` (seed_values): SFT's spread over training seeds, which
    these intervals leave out."""
    L = ["", "## GDRT grid (seed 0): validation (selection by NDCG@5), test, and the paired difference against SFT", "",
         "Where GDRT helps, does nothing and hurts: each grid point's test NDCG@10 and DGU@5 minus SFT's (sft-s0), "
         f"paired over the same users [bootstrap 95%, {a.bootstrap} resamples], read by the verdict rule "
         "(helps / hurts when the interval excludes 0 on that side). exp(H(Q)): the mean effective number of groups.", "",
         "| G | tau | " + " | ".join(f"valid {k}" for k in SELECT_KEYS)
         + " | exp(H(Q)) | test NDCG@5 | test DGU@5 | NDCG@10 - SFT | DGU@5 - SFT |",
         "|---" * (len(SELECT_KEYS) + 7) + "|"]
    effects = []

    def row(f, g, tau_cell):
        valid = best_valid(f / "train_results.json")
        eff = np.nanmean(q_entropy(json.loads((f / "train_results.json").read_text())["steps"]))
        test = "- | - | - | -"
        if (f / "test_predictions.jsonl").exists():
            users = rows.users(f.name)
            c = rows.point(f.name)
            test = f"{c['NDCG@5']:.4f} | {c['DGU@5']:.4f}"
            if sft is not None:
                d = paired(users, sft, a.bootstrap, 0)
                test += "".join(f" | {fmt(d[k])}: {effect_word(d[k], k)}" for k in ("NDCG@10", "DGU@5"))
                effects.append({k: effect_word(d[k], k) for k in ("NDCG@10", "DGU@5")})
            else:
                test += " | - | -"
        scores = " | ".join(f"{valid[k]:.4f}" for k in SELECT_KEYS)
        return f"| {g} | {tau_cell} | {scores} | {eff:.2f} | {test} |"

    for g, t in parse_grid(a.grid):
        f = docs / gdrt_row(g, t)
        if not (f / "train_results.json").exists():
            L.append(f"| {g} | {t:g} | " + " | ".join("-" for _ in SELECT_KEYS) + " | - | - | - | - | - |")
            continue
        L.append(row(f, g, f"{t:g}"))
    controls = sorted(f for f in docs.glob("groupmean-G*-s0") if (f / "train_results.json").exists())
    for f in controls:
        g = json.loads((f / "train_results.json").read_text())["config"]["groups"]
        L.append(row(f, g, "inf: uniform Q (control)"))
    if effects:
        words = ("helps", "no resolved difference", "hurts")
        counts = {k: ", ".join(f"{sum(e[k] == w for e in effects)} {w}" for w in words) for k in ("DGU@5", "NDCG@10")}
        L += ["", f"Tested rows: {len(effects)}. DGU@5: {counts['DGU@5']}. NDCG@10: {counts['NDCG@10']}. "
              f"These are {2 * len(effects)} comparisons at 95% each, uncorrected: one interval that barely "
              "excludes 0 is weak evidence."]
        sft_seeds = (seeds or {}).get("SFT", [])
        if len(sft_seeds) > 1:
            sd = {k: np.std([v[k] for v in sft_seeds], ddof=1) for k in ("NDCG@10", "DGU@5")}
            off = {k: point(sft)[k] - np.mean([v[k] for v in sft_seeds]) for k in ("NDCG@10", "DGU@5")}
            L[-1] += (f" The intervals hold the test users' sampling noise only, not training noise: over SFT's "
                      f"{len(sft_seeds)} seeds the sd is {sd['NDCG@10']:.4f} for NDCG@10 and {sd['DGU@5']:.4f} "
                      f"for DGU@5, and sft-s0 scores {off['NDCG@10']:+.4f} NDCG@10 and {off['DGU@5']:+.4f} DGU@5 "
                      "against the mean of SFT's seeds.")
    return L + control_section(a, docs, rows, controls)


def control_section(a, docs, rows, controls) -> list[str]:
    """Our control against GDRT of the same G and seed: what the worst-case weighting adds to
    weighting the token groups equally."""
    if not controls:
        return []
    L = ["", "### Control: GDRT's token groups with Q fixed uniform (our addition, not the paper's)", "",
         "`--method group-mean` trains on the mean of the G group losses, Q(g) = 1/G for every step: the tau -> inf "
         "limit of Eq. 5. Against SFT (the table above) it measures what weighting the groups equally does, instead "
         "of weighting every token equally; against GDRT it measures what the worst-case (DRO) weighting adds. "
         "Paired over the same test users; one training seed each, so training noise (SFT's seed sd of DGU@5 is in "
         "the seeds table) is not in these intervals.", "",
         "| A - B | users | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 2) + "|"]
    shown = 0
    for f in controls:
        if not (f / "test_predictions.jsonl").exists():
            continue
        g = json.loads((f / "train_results.json").read_text())["config"]["groups"]
        ctrl = rows.users(f.name)
        for t in sorted(t for G, t in parse_grid(a.grid) if G == g):
            other = docs / gdrt_row(g, t)
            if not (other / "test_predictions.jsonl").exists():
                continue
            users = rows.users(other.name)
            d = paired(users, ctrl, a.bootstrap, 0)
            n = len(set(users.rows) & set(ctrl.rows))
            words = {"helps": "A better", "hurts": "A worse"}
            L.append(f"| {other.name} - {f.name} | {n} | " + " | ".join(
                f"{fmt(d[k])}: {words.get(effect_word(d[k], k), effect_word(d[k], k))}" for k in TABLE_KEYS) + " |")
            shown += 1
    return L if shown else L[:4] + ["The control is trained; its test decode is still to run."]


def weight_points(a, docs, rows) -> list[dict]:
    """Every tested SFT, GDRT and control run with the robust G: the share of its loss weight on
    group G (the tokens least relevant to the auxiliary tokens), its mean training loss there,
    and its test metrics. Sorted by that weight."""
    G = parse_grid(a.robust_gdrt)[0][0]
    out = []
    for f in sorted(docs.glob("*-s*")):
        res = f / "train_results.json"
        if not (res.exists() and (f / "test_predictions.jsonl").exists()):
            continue
        r = json.loads(res.read_text())
        method = r["config"]["method"]
        if method not in ("sft", "gdrt", "group-mean") or r["config"]["groups"] != G:
            continue
        kind = {"sft": "SFT", "group-mean": "uniform Q (control)"}.get(method, f"GDRT tau={r['config']['tau']:g}")
        c = rows.point(f.name)
        out.append({"run": f.name, "kind": kind, "weight": group_weight(r, G),
                    "train_loss": float(np.mean([s["group_loss"][G - 1] for s in r["steps"]])),
                    **{k: c[k] for k in ("DGU@5", "MGU@5", "NDCG@10")}})
    return sorted(out, key=lambda p: p["weight"])


def weight_section(a, docs, rows) -> list[str]:
    """Dose and response: does fairness follow the weight a run puts on group G?"""
    pts = weight_points(a, docs, rows)
    if len(pts) < 3:
        return []
    G = parse_grid(a.robust_gdrt)[0][0]
    L = ["", f"## Dose and response: the weight on token group {G} and fairness", "",
         f"Group {G} holds the target tokens with the lowest Eq. 3 relevance to the auxiliary tokens: the ones the "
         "model can least predict from the task text and the title's prefix alone. SFT weighs it by its share of "
         "the tokens; the uniform-Q control by 1/G; GDRT by its mean Q(G), more as tau falls. Every tested run of "
         f"G = {G} (all seeds), sorted by that weight:", "",
         f"| run | weight on group {G} | its mean training loss | test DGU@5 | test MGU@5 | test NDCG@10 |",
         "|---|---|---|---|---|---|"]
    L += [f"| {p['run']} ({p['kind']}) | {p['weight']:.2f} | {p['train_loss']:.2f} | {p['DGU@5']:.4f} | "
          f"{p['MGU@5']:.4f} | {p['NDCG@10']:.4f} |" for p in pts]
    rho = {k: spearman([p["weight"] for p in pts], [p[k] for p in pts]) for k in ("DGU@5", "NDCG@10")}
    seeded = Counter(p["kind"] for p in pts)
    L += ["", f"Spearman rank correlation over these {len(pts)} runs, weight on group {G} against test DGU@5: "
          f"{rho['DGU@5']:+.2f}; against NDCG@10: {rho['NDCG@10']:+.2f}. Runs of one seed each apart from "
          f"{', '.join(k for k, n in seeded.items() if n > 1) or 'none'}, whose seed rows show how much of an "
          "ordering training noise alone can make."]
    return L


def title_length_section(docs, labels, item_group, length, targets) -> list[str]:
    """Item groups and title length (our measurement): Eq. 2 averages a title's token relevance, and
    the later tokens of a long title are easy to predict from its prefix, so the item groups of
    MGU/DGU also sort the catalogue by title length. A row's fairness can move with the length of
    the titles it ranks first, which this section lets a reader check. `length`: title_lengths;
    `targets`: the test users' target items, the first row of the second table."""
    groups = range(1, N_ITEM_GROUPS + 1)
    L = ["", "## Item groups and title length (our measurement)", "",
         "Eq. 2 averages the relevance of a title's tokens to the auxiliary tokens, and the later tokens of a long "
         "title are easy to predict from its first ones; so the item groups also sort the catalogue by length "
         "(title tokens, without quotes and EOS):", "",
         "| item group | " + " | ".join(str(g) for g in groups) + " |", "|---" * (N_ITEM_GROUPS + 1) + "|",
         "| catalogue items | " + " | ".join(str(sum(v == g for v in item_group.values())) for g in groups) + " |",
         "| mean title tokens | " + " | ".join(f"{np.mean([length[i] for i, v in item_group.items() if v == g]):.1f}"
                                             for g in groups) + " |",
         "", "Each row's top-1 recommendations on its test users: their mean title length and where they fall.", "",
         f"| row | top-1 mean title tokens | top-1 in item group 1 | top-1 in item group {N_ITEM_GROUPS} |",
         "|---|---|---|---|"]
    shown = {"test targets": ("test targets (the same users)", targets)}
    shown |= {label: (f"{label} ({folder})", top1_items(docs, folder)) for label, folder in labels.items()}
    mean_length = {}
    for key, (name, items) in shown.items():
        t = top1_summary(items, item_group, length)
        mean_length[key] = t["mean_length"]
        L.append(f"| {name} | {t['mean_length']:.1f} | {t['share'][0]:.0%} | {t['share'][-1]:.0%} |")
    if "SFT" in mean_length and "GDRT" in mean_length:
        longer = mean_length["GDRT"] - mean_length["SFT"]
        L += ["", f"GDRT's top-1 titles minus SFT's, in mean title tokens: {longer:+.1f}. A fairness change that "
              "came from ranking shorter titles (as D3's unnormalised scores do) would make this negative."]
    return L
