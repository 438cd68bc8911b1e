"""The reproduction's report (docs/results.md) and figures, from the committed docs/repro/ folder.

    python scripts/repro_report.py report  --dataset toy --data-dir D     # tables, verdicts -> docs/results.md
    python scripts/repro_report.py figures --dataset toy --data-dir D     # PNG + JSON -> docs/figures/repro

Definitions (the numbers' meanings):
- Cells: the metric on a row's test users, [bootstrap 95% percentile interval], B resamples of users.
- "- SFT": the paired difference row - SFT (sft-s0), on the users both rows were decoded on; each
  resample draws users once and scores both rows on them.
- Verdict of a claim "A beats B on M" (higher NDCG/HR, lower MGU/DGU): reproduced when the paired
  95% interval of A - B lies wholly on the claimed side of 0; not reproduced when it lies wholly
  on the other side; not resolved at this scale when it contains 0 (or a row is missing).
- Seeds: mean and sample standard deviation over the training seeds of a row's test metric. The
  seed verdict uses the same rule on the Welch t 95% interval of GDRT's seed mean - SFT's.
- Q entropy: per optimizer step, H(Q) = -sum_g Q(g) log Q(g) of the logged GDRT weights and the
  effective number of groups exp(H(Q)) (G when uniform, 1 when one group takes all the weight).
- Group composition: for each token group, the share of its target-token occurrences at each
  position of the target '"Title"' + EOS: opening quote (the tokens before the first one with
  title text), first title token, later title tokens, closing quote (the token before EOS when it
  is a bare '"'; one merged with title text counts as title text), EOS (the last).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from nanogdrt import files, metrics  # noqa: E402
from repro import SELECT_KEYS, TABLE_KEYS, best_valid, gdrt_row, parse_grid  # noqa: E402
from repro_data import dataset_of  # noqa: E402

LOWER_IS_BETTER = {"MGU@5", "DGU@5"}
# The paper's Toy numbers (Table 2, Llama-3.2-3B) that this report quotes; its other cells are not
# transcribed here. Its abstract's summary over the three datasets: GDRT +24.29% NDCG@10 on average.
PAPER_TOY = {"SFT": {"NDCG@10": 0.0158, "DGU@5": 0.612}, "GDRT": {"NDCG@10": 0.0203, "DGU@5": 0.403}}
CLAIMS = [("GDRT", "SFT"), ("GDRT", "MSL"), ("GDRT", "Reweight"), ("MSL+GDRT", "MSL"), ("GDRT", "SFT+D3")]


# ----------------------------------------------------------------------------- per-user terms

class Users:
    """Per-user terms of one row, so that a bootstrap resample is a weighted sum (no re-scoring)."""

    def __init__(self, records, by_row, titles, item_group, k_groups=5):
        inter = [by_row[r["row"]] for r in records]
        ranked = [r["topk_item_ids"] for r in records]
        self.rows = [r["row"] for r in records]
        self.acc = {}
        for k in (5, 10):
            m = metrics.per_user_metrics(ranked, [x.target for x in inter], k, titles)
            self.acc[f"NDCG@{k}"], self.acc[f"HR@{k}"] = m["ndcg"], m["hit"]
        G = 5   # MGU/DGU pool group counts over users: keep each user's counts (n, G)
        self.rec = np.array([np.bincount([item_group[i] - 1 for i in items[:k_groups] if i in item_group],
                                         minlength=G) for items in ranked], dtype=float).reshape(-1, G)
        self.hist = np.array([np.bincount([item_group[i] - 1 for i in x.history if i in item_group],
                                          minlength=G) for x in inter], dtype=float).reshape(-1, G)

    def subset(self, rows):
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = [pos[r] for r in rows]
        out = object.__new__(Users)
        out.rows, out.acc = list(rows), {k: v[idx] for k, v in self.acc.items()}
        out.rec, out.hist = self.rec[idx], self.hist[idx]
        return out

    def table(self, w):
        """w (B, n) resample weights -> {metric: (B,)}."""
        out = {k: w @ v / w.sum(1) for k, v in self.acc.items()}
        gp, gh = w @ self.rec, w @ self.hist
        gap = gp / np.maximum(gp.sum(1, keepdims=True), 1e-12) - gh / np.maximum(gh.sum(1, keepdims=True), 1e-12)
        out["MGU@5"], out["DGU@5"] = np.abs(gap).mean(1), gap.max(1) - gap.min(1)
        return out


def weights(n, B, seed):
    """Row 0: the point estimate (all weights 1); rows 1..B: bootstrap resample counts."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=B)])


def interval(x):
    return float(x[0]), float(np.percentile(x[1:], 2.5)), float(np.percentile(x[1:], 97.5))


def bootstrap(rows: dict, ref="SFT", B=1000, seed=0) -> dict:
    """{row: {metric: (point, lo, hi)}}, and {f"{row} - {ref}": ...} on common users."""
    out = {}
    for name, u in rows.items():
        t = u.table(weights(len(u.rows), B, seed))
        out[name] = {k: interval(t[k]) for k in TABLE_KEYS}
    for name, u in rows.items():
        if name != ref and ref in rows:
            out[f"{name} - {ref}"] = paired(u, rows[ref], B, seed)
    return out


def paired(a, b, B, seed):
    common = [r for r in a.rows if r in set(b.rows)]
    w = weights(len(common), B, seed)
    ta, tb = a.subset(common).table(w), b.subset(common).table(w)
    return {k: interval(ta[k] - tb[k]) for k in TABLE_KEYS}


def verdict(point_lo_hi, metric) -> str:
    _, lo, hi = point_lo_hi
    better_lo, better_hi = (-hi, -lo) if metric in LOWER_IS_BETTER else (lo, hi)
    if better_lo > 0:
        return "reproduced"
    if better_hi < 0:
        return "not reproduced"
    return "not resolved at this scale"


def q_entropy(steps) -> list[float]:
    """exp(H(Q)) per logged step: the effective number of groups GDRT trains on."""
    out = []
    for s in steps:
        q = np.asarray(s["q"], dtype=float)
        q = q[q > 0]
        out.append(float(np.exp(-(q * np.log(q)).sum())) if q.size else float("nan"))
    return out


def q_summary(steps, tau) -> dict:
    """What GDRT's weights did over a run: mean exp(H(Q)), mean max Q, the share of steps with
    max Q > 0.9, the group that most often took the largest weight, and the spread of the logged
    group losses (max - min over the groups present in the step) against tau. Q(g) is proportional
    to exp(L(g)/tau), so two groups whose losses differ by d nats get weights in the ratio
    exp(d/tau): only d/tau matters, not the losses' level."""
    Q = np.array([s["q"] for s in steps], dtype=float)                     # (S, G)
    L = np.array([s["group_loss"] for s in steps], dtype=float)            # (S, G), 0 when absent
    present = Q > 0
    spread = np.array([(l[p].max() - l[p].min()) if p.sum() > 1 else 0.0 for l, p in zip(L, present)])
    top = np.bincount(Q.argmax(1), minlength=Q.shape[1])
    return {"steps": len(steps), "exp_H_Q": float(np.nanmean(q_entropy(steps))), "max_q": float(Q.max(1).mean()),
            "one_hot_share": float((Q.max(1) > 0.9).mean()), "top_group": int(top.argmax()) + 1,
            "top_group_share": float(top.max() / len(steps)), "loss_spread": float(spread.mean()),
            "spread_over_tau": float(spread.mean() / tau), "group_loss": L.mean(0).round(3).tolist(),
            "q_mean": Q.mean(0).round(3).tolist()}


def group_composition(examples, token_groups, n_groups, tokenizer) -> list[dict]:
    """Per token group, the share of its target tokens at each position of the target."""
    from nanogdrt.attribution import first_title_token
    names = ["opening quote", "first title token", "later title tokens", "closing quote", "EOS"]
    counts = np.zeros((n_groups, len(names)))
    for p, g in zip(examples, token_groups):
        ids, first = p.ids[p.target[0]:p.target[1]], first_title_token(p, tokenizer)
        for t, gid in enumerate(g.tolist()):
            if t == len(ids) - 1:
                pos = 4
            elif t < first:
                pos = 0
            elif t == first:
                pos = 1
            elif t == len(ids) - 2 and tokenizer.decode([ids[t]]).strip() == '"':
                pos = 3
            else:
                pos = 2   # a closing quote merged with title text counts as title text
            counts[gid - 1, pos] += 1
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return [{"group": g + 1, "tokens": int(counts[g].sum()), **dict(zip(names, shares[g].round(4).tolist()))}
            for g in range(n_groups)]


# ----------------------------------------------------------------------------- rows

def row_names(a) -> dict:
    """Report label -> docs/repro folder, for the rows that exist."""
    docs = Path(a.docs)
    grid = parse_grid(a.grid)
    trained = [gdrt_row(g, t) for g, t in grid if (docs / gdrt_row(g, t) / "train_results.json").exists()]
    chosen = max(trained, key=lambda r: best_valid(docs / r / "train_results.json")) if trained else None
    msl = [p.name for p in docs.glob("msl-tau*-s0") if (p / "train_results.json").exists()]
    msl = max(msl, key=lambda r: best_valid(docs / r / "train_results.json")) if msl else None
    labels = {"Base model": "base", "SFT": "sft-s0", "GDRT": chosen, "MSL": msl, "MSL+GDRT": "msl-gdrt-s0",
              "Reweight": "reweight-s0", "SFT+D3": "sft-d3", "SASRec": "sasrec", "SASRec++": "sasrec-pp"}
    return {k: v for k, v in labels.items() if v and (docs / v / "test_predictions.jsonl").exists()}


def load_users(a, folder, by_row, titles, item_group):
    lines = (Path(a.docs) / folder / "test_predictions.jsonl").read_text().splitlines()
    return Users([json.loads(x) for x in lines], by_row, titles, item_group)


def fmt(c):
    return f"{c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]"


def report(a):
    docs = Path(a.docs)
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size)
    by_row = {x.row: x for x in ds.test}
    item_group = {int(k): v for k, v in json.loads((docs / "item_groups.json").read_text()).items()}
    labels = row_names(a)
    rows = {k: load_users(a, v, by_row, ds.titles, item_group) for k, v in labels.items()}
    table = bootstrap(rows, "SFT", a.bootstrap)
    L = ["# Reproduction v2 on Toy (generated by scripts/repro_report.py; do not edit by hand)", ""]
    L += setup_section(a, docs, labels) + [
         f"Cells: point estimate [bootstrap 95% interval, {a.bootstrap} resamples of test users]. "
         "'- SFT' rows: paired differences on the users both rows share. Definitions: "
         "scripts/repro_report.py's docstring.", "",
         "| row | users | " + " | ".join(TABLE_KEYS) + " | paper (Toy) |", "|---" * (len(TABLE_KEYS) + 3) + "|"]
    for name, cells in table.items():
        base = name.split(" - ")[0]
        n = len(rows[base].rows) if " - " not in name else "paired"
        paper = PAPER_TOY.get(name) if " - " not in name else None
        paper_txt = ", ".join(f"{k} {v}" for k, v in paper.items()) if paper else ""
        shown = f"{name} ({labels[name]})" if name in labels else name
        L.append(f"| {shown} | {n} | " + " | ".join(fmt(cells[k]) for k in TABLE_KEYS)
                 + f" | {paper_txt} |")
    L += ["", "## Verdicts", "", "Rule: the paired 95% interval of A - B wholly on the claimed side of 0: reproduced; "
          "wholly on the other side: not reproduced; containing 0 or a row missing: not resolved at this scale.", "",
          "| claim | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 1) + "|"]
    for A, Bn in CLAIMS:
        if A in rows and Bn in rows:
            d = paired(rows[A], rows[Bn], a.bootstrap, 0)
            L.append(f"| {A} beats {Bn} | " + " | ".join(f"{verdict(d[k], k)} ({d[k][0]:+.4f})" for k in TABLE_KEYS) + " |")
        else:
            L.append(f"| {A} beats {Bn} | " + " | ".join("not resolved (row missing)" for _ in TABLE_KEYS) + " |")
    seeds = seed_values(a, docs, ds, by_row, item_group)
    L += seed_verdicts(seeds)
    L += seeds_section(a, seeds) + trains_on_section(a, docs)
    L += grid_section(a, docs, ds, by_row, item_group)
    L += figures_section(a)
    L += times_section(docs)
    L += gpu_section(Path(a.results).parent / "gpu" / "protocol" / "report.md")   # docs/gpu/protocol
    files.write_text(a.results, "\n".join(L) + "\n")
    files.write_json(Path(a.figures) / "report.json", {"rows": labels, "table": table})
    print("\n".join(L))


def setup_section(a, docs, labels) -> list[str]:
    """What was run, on what, and how much of the plan exists: read from the committed outputs."""
    m = json.loads((docs / "manifest.json").read_text()) if (docs / "manifest.json").exists() else {}
    machines = sorted({v["machine"] for v in m.values()})
    minutes = sum(v["seconds"] for v in m.values()) / 60
    L = ["## Setup", ""]
    sft = docs / "sft-s0" / "train_results.json"
    if sft.exists():
        c = json.loads(sft.read_text())["config"]
        L.append(f"- Every LLM row: {Path(c['model']).name if c['model'] else 'SmolLM2-135M-Instruct (embedded)'} + LoRA r {c['lora_r']} on {', '.join(c['lora_targets'])}; "
                 f"{c['train_samples']} training windows of {c['train_file']}, {c['epochs']} epochs, batch "
                 f"{c['batch_size']} x accum {c['grad_accum']}, lr {c['lr']:g}; best epoch by validation NDCG@5 on "
                 f"{c['valid_users']} users. Decoding: constrained beam search, beam {c['beams']}.")
    n_users = len(json.loads((docs / "test_users.json").read_text())["index"]) if (docs / "test_users.json").exists() else 0
    L += [f"- Test users: the same {n_users} seeded test users for every row (docs/repro/test_users.json); "
          "item groups by Eq. 2 over the title tokens under the base model (docs/repro/item_groups.json).",
          "- GDRT's token groups: Eq. 3 relevance of every target token (the title's tokens, its quotes and EOS) "
          "under the base model with the history replaced by \"N/A\", scored once before training and cut by 1-D "
          "k-means; Eq. 2 averages the title's own tokens only (the quotes and EOS are a constant format). "
          "train.py's `--regroup-every-epoch` re-scores under the current model instead (not used here).",
          f"- Machine(s): {', '.join(machines) or '-'}; wall time of the stages so far: {minutes:.0f} min "
          "(per stage at the end).",
          f"- Rows present: {', '.join(f'{k} ({v})' for k, v in labels.items()) or 'none'}. Every tested row "
          f"folder: {', '.join(sorted(p.parent.name for p in docs.glob('*/test_predictions.jsonl'))) or 'none'}. "
          "The plan and what is left: `python scripts/repro.py --data-dir ../shared/data/toy --list`.", ""]
    return L


def seed_values(a, docs, ds, by_row, item_group) -> dict:
    """{"SFT": [...], "GDRT": [...]}: each tested training seed's test metrics (point estimates), and
    GDRT's mean exp(H(Q)) per seed under "GDRT exp(H(Q))"."""
    g, tau = parse_grid(a.robust_gdrt)[0]
    out = {}
    for name, make in (("SFT", lambda s: f"sft-s{s}"), ("GDRT", lambda s: gdrt_row(g, tau, s))):
        folders = [make(s) for s in range(a.seeds) if (docs / make(s) / "test_predictions.jsonl").exists()]
        out[name] = [{k: v[0] for k, v in bootstrap({"x": load_users(a, f, by_row, ds.titles, item_group)}, "x", 1)["x"].items()}
                     for f in folders]
        if name == "GDRT":
            out["GDRT exp(H(Q))"] = [np.nanmean(q_entropy(json.loads((docs / f / "train_results.json").read_text())["steps"]))
                                     for f in folders]
    return out


def welch_interval(xs, ys, level=0.95):
    """mean(xs) - mean(ys) and its Welch t interval: training seeds are independent runs, few of
    them, with unequal spreads, so neither a pooled variance nor a normal quantile fits."""
    from scipy import stats
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    vx, vy = xs.var(ddof=1) / len(xs), ys.var(ddof=1) / len(ys)
    d, se = xs.mean() - ys.mean(), math.sqrt(vx + vy)
    if se == 0:
        return d, d, d
    df = (vx + vy) ** 2 / (vx ** 2 / (len(xs) - 1) + vy ** 2 / (len(ys) - 1))   # Welch-Satterthwaite
    h = stats.t.ppf(0.5 + level / 2, df) * se
    return d, d - h, d + h


def seed_verdicts(seeds) -> list[str]:
    """The Verdicts table's row over training seeds, when both rows have two seeds at least."""
    sft, gdrt = seeds.get("SFT", []), seeds.get("GDRT", [])
    if len(sft) < 2 or len(gdrt) < 2:
        return []
    cells = [welch_interval([v[k] for v in gdrt], [v[k] for v in sft]) for k in TABLE_KEYS]
    return [f"| GDRT beats SFT over training seeds ({len(gdrt)} vs {len(sft)}; Welch interval of the seed means) | "
            + " | ".join(f"{verdict(c, k)} ({c[0]:+.4f})" for c, k in zip(cells, TABLE_KEYS)) + " |"]


def seeds_section(a, seeds):
    g, tau = parse_grid(a.robust_gdrt)[0]
    L = ["", f"## Training seeds (SFT and GDRT G={g} tau={tau:g}): mean +- sd of test metrics, Q's effective groups", "",
         "| row | seeds | " + " | ".join(TABLE_KEYS) + " | mean exp(H(Q)) |", "|---" * (len(TABLE_KEYS) + 3) + "|"]

    def cell(xs):   # a spread needs two seeds at least
        return f"{np.mean(xs):.4f} +- {np.std(xs, ddof=1):.4f}" if len(xs) > 1 else f"{xs[0]:.4f} (one seed)"
    for name in ("SFT", "GDRT"):
        vals = seeds.get(name, [])
        if vals:
            eff = seeds.get(f"{name} exp(H(Q))")
            L.append(f"| {name} | {len(vals)} | " + " | ".join(cell([v[k] for v in vals]) for k in TABLE_KEYS)
                     + (f" | {np.mean(eff):.2f} |" if eff else " | - |"))
    if len(seeds.get("SFT", [])) > 1 and len(seeds.get("GDRT", [])) > 1:
        diffs = [welch_interval([v[k] for v in seeds["GDRT"]], [v[k] for v in seeds["SFT"]]) for k in TABLE_KEYS]
        L.append("| GDRT - SFT | seed means | " + " | ".join(fmt(d) for d in diffs) + " | - |")
        L += ["", "The GDRT - SFT row: difference of the seed means [Welch t 95% interval]. It measures training "
              "noise, which the bootstrap over users above does not; with 2-3 seeds per row it is wide."]
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
    name, q = next(iter(summaries.items()))
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
        names = [k for k in comp[0] if k not in ("group", "tokens")]
        L += ["", "Token groups of the chosen GDRT run by position in the target (share of each group's "
              "target tokens; group 1 = the highest Eq. 3 relevance to the auxiliary tokens, G = the lowest):", "",
              "| group | tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        L += [f"| {c['group']} | {c['tokens']} | " + " | ".join(f"{c[k]:.0%}" for k in names) + " |" for c in comp]
    return L


def effect_word(c, metric) -> str:
    """A grid point's paired difference against SFT in words: the verdict rule, read as an effect."""
    return {"reproduced": "helps", "not reproduced": "hurts"}.get(verdict(c, metric), "no resolved difference")


def grid_section(a, docs, ds, by_row, item_group):
    """Fig. 10/11 as a table: every grid point's validation scores (the selection), its test scores,
    its paired difference against SFT of the same seed, and how many groups its Q really mixes."""
    sft = load_users(a, "sft-s0", by_row, ds.titles, item_group) if (docs / "sft-s0" / "test_predictions.jsonl").exists() else None
    L = ["", "## GDRT grid (seed 0): validation (selection by NDCG@5), test, and the paired difference against SFT", "",
         "Where GDRT helps, does nothing and hurts: each grid point's test NDCG@10 and DGU@5 minus SFT's (sft-s0), "
         f"paired over the same users [bootstrap 95%, {a.bootstrap} resamples], read by the verdict rule "
         "(helps / hurts when the interval excludes 0 on that side). exp(H(Q)): the mean effective number of groups.", "",
         "| G | tau | " + " | ".join(f"valid {k}" for k in SELECT_KEYS)
         + " | exp(H(Q)) | test NDCG@5 | test DGU@5 | NDCG@10 - SFT | DGU@5 - SFT |",
         "|---" * (len(SELECT_KEYS) + 7) + "|"]
    for g, t in parse_grid(a.grid):
        f = docs / gdrt_row(g, t)
        if not (f / "train_results.json").exists():
            L.append(f"| {g} | {t:g} | " + " | ".join("-" for _ in SELECT_KEYS) + " | - | - | - | - | - |")
            continue
        v = best_valid(f / "train_results.json")
        eff = np.nanmean(q_entropy(json.loads((f / "train_results.json").read_text())["steps"]))
        test = "- | - | - | -"
        if (f / "test_predictions.jsonl").exists():
            users = load_users(a, f.name, by_row, ds.titles, item_group)
            c = bootstrap({"x": users}, "x", 1)["x"]
            test = f"{c['NDCG@5'][0]:.4f} | {c['DGU@5'][0]:.4f}"
            if sft is not None:
                d = paired(users, sft, a.bootstrap, 0)
                test += "".join(f" | {fmt(d[k])}: {effect_word(d[k], k)}" for k in ("NDCG@10", "DGU@5"))
            else:
                test += " | - | -"
        L.append(f"| {g} | {t:g} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {eff:.2f} | {test} |")
    return L


def figures_section(a) -> list[str]:
    """Fig. 2/7 numbers under both attribution definitions, and links to every figure the figures
    stage drew (paths relative to docs/results.md's folder)."""
    figs = Path(a.figures)
    analysis = figs / "analyze" / "analysis.json"
    if not analysis.exists():
        return ["", "## Figures", "", "Not drawn yet: the `figures` stage of `make repro`."]
    an = json.loads(analysis.read_text())
    rel = lambda p: Path(os.path.relpath(figs / p, Path(a.results).parent)).as_posix()   # noqa: E731
    att = an.get("attribution") or {}
    L = ["", "## Attribution ratios (Fig. 2/7)", ""]
    if att:
        from nanogdrt.analyze import PAPER_TASK_RATIOS, XTICKS
        defs = list(att["definitions"])
        paper = PAPER_TASK_RATIOS.get(a.dataset, {})
        L += [f"{len(att['rows'])} seeded {att['split']} examples; ratio of the mean ablation drops, auxiliary : "
              "interaction (1 = equal reliance). Definitions (nanogdrt/attribution.py): "
              + "; ".join(f"{att['definitions'][d]}: {XTICKS[d][0].replace(chr(10), ' ')} (task ratio), "
                          f"{XTICKS[d][1].replace(chr(10), ' ')} (prefix ratio)" for d in defs) + ".", "",
              "| model | " + " | ".join(f"{att['definitions'][d]} task ratio | {att['definitions'][d]} prefix ratio"
                                       for d in defs) + " | paper's task ratio (Toy) |",
              "|---" * (2 * len(defs) + 2) + "|"]
        for model, per in att["models"].items():
            L.append(f"| {model} | " + " | ".join(f"{per[d]['task_ratio']:.3f} | {per[d]['prefix_ratio']:.3f}"
                                                  for d in defs) + f" | {paper.get(model, '-')} |")
        L += attribution_verdicts(att, a.bootstrap)
    L += ["", "## Figures", ""]
    drawn = [("top-1 item groups of every row (Fig. 3/8)", "fig3_rows_top1_groups.png"),
             ("GDRT's effective number of groups exp(H(Q)) per step", "q_effective_groups.png"),
             ("sensitivity to G, validation / test (Fig. 10)", "fig10_sensitivity_G_valid.png"),
             ("sensitivity to tau, validation / test (Fig. 11)", "fig11_sensitivity_tau_valid.png")]
    drawn += [(f"{k} (nanogdrt.analyze)", f"analyze/{v}") for k, v in an.get("figures", {}).items()]
    drawn += [("token heat maps, base vs SFT vs GDRT (Fig. 1 style; open the HTML page in a browser)",
               "analyze/heatmap/heatmap.html")]
    L += [f"- [{k}]({rel(v)})" for k, v in drawn if (figs / v).exists()]
    L += [f"- the numbers behind them: [{rel('figures.json')}]({rel('figures.json')}), "
          f"[{rel('analyze/analysis.json')}]({rel('analyze/analysis.json')})"]
    return L


ATTRIBUTION_CLAIMS = [  # (A, B, ratio, the paper's direction of A - B)
    ("SFT", "base (no fine-tuning)", "task", +1), ("GDRT", "SFT", "task", -1), ("GDRT", "SFT", "prefix", -1)]


def attribution_verdicts(att, B) -> list[str]:
    """Paired bootstrap over the examples (the same users under each model) of a ratio of means,
    A - B, per definition, with the verdict rule of the accuracy claims."""
    terms = {"task": ("task", "interaction"), "prefix": ("prefix", "interaction_after")}
    models, defs = att["models"], list(att["definitions"])
    L = ["", "Attribution claims, paired bootstrap over the examples (" + str(B) + " resamples) of the ratio "
         "difference A - B; the verdict rule is the one above:", "",
         "| claim | " + " | ".join(att["definitions"][d] for d in defs) + " |", "|---" * (len(defs) + 1) + "|"]
    for A, Bm, kind, sign in ATTRIBUTION_CLAIMS:
        if A not in models or Bm not in models:
            continue
        cells = []
        for d in defs:
            num, den = terms[kind]
            xa, xb = ({k: np.array([e[k] for e in models[m][d]["per_example"]]) for k in (num, den)} for m in (A, Bm))
            w = weights(len(xa[num]), B, 0)
            diff = (w @ xa[num]) / (w @ xa[den]) - (w @ xb[num]) / (w @ xb[den])
            point, lo, hi = interval(diff)
            lo_s, hi_s = (lo, hi) if sign > 0 else (-hi, -lo)
            v = "reproduced" if lo_s > 0 else "not reproduced" if hi_s < 0 else "not resolved at this scale"
            cells.append(f"{v} ({point:+.3f} [{lo:+.3f}, {hi:+.3f}])")
        word = "raises" if sign > 0 else "lowers"
        L.append(f"| {A} {word} the {kind} ratio (A = {A}, B = {Bm}) | " + " | ".join(cells) + " |")
    return L


def times_section(docs):
    m = json.loads((docs / "manifest.json").read_text()) if (docs / "manifest.json").exists() else {}
    L = ["", "## Wall time per stage", "", "| stage | minutes | machine | command |", "|---|---|---|---|"]
    return L + [f"| {k} | {v['seconds'] / 60:.1f} | {v['machine']} | `{v['command']}` |" for k, v in m.items()]


def gpu_section(report_md: Path):
    """The paper's protocol on a lent GPU (docs/gpu_protocol.md), as its own report wrote it."""
    if not report_md.exists():
        return []
    return ["", "## Paper protocol on one GPU", "",
            "The paper's protocol (train_5000.csv, 5 epochs, best epoch by validation NDCG@5 on 500 users, "
            "the whole test split), run in resumable stages on lent GPUs (docs/gpu_protocol.md); "
            f"`python scripts/gpu_protocol.py report --data-dir ../shared/data/toy` wrote `{report_md}`:", "",
            *report_md.read_text().splitlines()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["report", "figures"])
    for flag, default in (("--dataset", "toy"), ("--data-dir", None), ("--synthetic-size", "small"),
                          ("--model", None), ("--device", "cpu"), ("--docs", "docs/repro"), ("--runs", "runs/repro"),
                          ("--figures", "docs/figures/repro"), ("--grid", "5:0.5"), ("--robust-gdrt", "5:0.5"),
                          ("--results", "docs/results.md")):
        p.add_argument(flag, default=default)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--examples", type=int, default=100)
    a = p.parse_args(argv)
    if a.command == "report":
        report(a)
    else:
        from repro_figures import figures
        figures(a)


if __name__ == "__main__":
    main()
