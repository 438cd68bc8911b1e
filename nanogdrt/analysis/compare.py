"""Compare runs: every metric with its bootstrap interval, and each run's paired difference from the
first run on the test users they share, as markdown tables with the report's verdict wording.

    python -m nanogdrt.analysis.compare docs/repro/sft-s0 docs/repro/gdrt-G5-tau0.5-s0 --names SFT GDRT \
        --dataset toy --data-dir ../shared/data/toy --item-groups docs/repro/item_groups.json --paper

A run is a train.py folder (results.json, or the reproduction's train_results.json, beside
test_predictions.jsonl) or a predictions file (JSON lines with "row", "target_item_id",
"topk_item_ids", as train.py, recommend.py and experiments/repro write them). The statistics are
nanogdrt/stats.py's, called as experiments/repro/report.py calls them (its docstring has the
definitions): the same seed and resamples give docs/results.md's "GDRT - SFT" and "GDRT beats SFT"
lines digit for digit. Hits match by title, as the paper's code does (the dataset's id2name.json).

The first run is the reference: each other run X gets an "X - first" row (paired over the users
both hold) and an "X beats first" verdict (higher NDCG/HR, lower MGU/DGU). A second set of tables
gives, at each --k, accuracy and the beyond-accuracy metrics of nanogdrt/metrics.py (Coverage, ARP
and Tail from the training targets' counts, Gini of exposure) with the same resamples; no verdict,
as their better direction is the study's choice, not a claim of the paper, and Coverage and Gini
as points only (SET_LEVEL says why).

Refused, with the reason: runs of different datasets (results.json), runs on different test users
(neither run's users contain the other's: the first n users of one seeded draw may be compared), a
row whose target differs between runs or from the dataset's split (another dataset or split).
"""

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import sparse

from nanogdrt import metrics, synthetic
from nanogdrt.data import load_dataset
from nanogdrt.stats import TABLE_KEYS, Users, bootstrap, fmt, interval, verdict_cell, weights

# The paper's Table 2 cells (Llama-3.2-3B) that the reproduction quotes (experiments/repro/report.py's
# PAPER_TOY holds the same cells); a run named like a method there gets them beside its row.
PAPER = {"toy": {"SFT": {"NDCG@10": 0.0158, "DGU@5": 0.612}, "GDRT": {"NDCG@10": 0.0203, "DGU@5": 0.403}}}
PREDICTIONS = "test_predictions.jsonl"
FIELDS = ("row", "target_item_id", "topk_item_ids")
# Metrics of the whole set of lists (distinct items shown, exposure inequality) get no interval: a
# resample repeats some users and drops about 37% of them, so it shows fewer distinct items than the
# data did (on Toy every percentile interval of Coverage and Gini lay wholly off its own point).
SET_LEVEL = ("Coverage", "Gini")


class Run(NamedTuple):
    name: str
    path: Path              # the predictions file
    records: list[dict]
    results: dict | None    # the run folder's results.json, when there is one


def read_run(path, name=None) -> Run:
    """A run folder or a predictions file -> Run; bad input is one line naming the file."""
    p = Path(path)
    pred = p / PREDICTIONS if p.is_dir() else p
    if not pred.is_file():
        raise SystemExit(f"{pred}: no such predictions file (a run folder holds {PREDICTIONS})")
    records = []
    for n, line in enumerate(pred.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{pred}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(r, dict) or any(f not in r for f in FIELDS):
            raise SystemExit(f"{pred}, line {n}: expected an object with {', '.join(FIELDS)}")
        records.append(r)
    if not records:
        raise SystemExit(f"{pred}: no predictions")
    found = [p / f for f in ("results.json", "train_results.json")] if p.is_dir() else []
    results = next((json.loads(f.read_text()) for f in found if f.is_file()), None)
    default = p.name if p.is_dir() else pred.parent.name if pred.name == PREDICTIONS else pred.stem
    return Run(name or default, pred, records, results)


def check_users(runs: list[Run]) -> None:
    """Refuse runs that are not comparable user by user: a row twice in one file, test users that
    are not nested (neither run's set holds the other's), or one row with two different targets."""
    rows = []
    for run in runs:
        r = [x["row"] for x in run.records]
        if len(set(r)) != len(r):
            raise SystemExit(f"{run.path}: row {next(x for x in r if r.count(x) > 1)} appears twice")
        rows.append(set(r))
    first, first_rows = runs[0], rows[0]
    target = {x["row"]: x["target_item_id"] for x in first.records}
    for run, r in zip(runs[1:], rows[1:]):
        if not (r <= first_rows or first_rows <= r):
            raise SystemExit(f"{first.path} and {run.path} were decoded on different test users "
                             f"({len(first_rows & r)} in common of {len(first_rows)} and {len(r)}): "
                             "compare runs of one test draw")
        for x in run.records:
            if x["row"] in target and target[x["row"]] != x["target_item_id"]:
                raise SystemExit(f"{first.path} and {run.path}: row {x['row']} has target {target[x['row']]} in one "
                                 f"and {x['target_item_id']} in the other: different datasets or splits")


def dataset_name(runs: list[Run], given: str | None) -> str:
    """The one dataset of the runs' results.json files and of --dataset; refuse when they differ."""
    named = {str(run.path): run.results["dataset"]["name"] for run in runs
             if run.results and "dataset" in run.results}
    names = set(named.values()) | ({given} if given else set())
    if len(names) > 1:
        said = [f"{p}: {n}" for p, n in named.items()] + ([f"--dataset: {given}"] if given else [])
        raise SystemExit("runs of different datasets (" + "; ".join(said) + ")")
    if not names:
        raise SystemExit("--dataset: needed (no run folder has a results.json naming it)")
    return names.pop()


def check_targets(run: Run, by_row: dict, where: str) -> None:
    """Every row of the run exists in the loaded split, with the same target."""
    for x in run.records:
        truth = by_row.get(x["row"])
        if truth is None or truth.target != x["target_item_id"]:
            held = "no such row" if truth is None else f"target {truth.target}"
            raise SystemExit(f"{run.path}: row {x['row']} has target {x['target_item_id']} but {where} has "
                             f"{held}: decoded on another dataset or split")


class AtK:
    """Per-user terms of the metrics at each cut-off (NDCG, HR, ARP, Tail) and per-user exposure counts
    (Coverage, Gini), so that a bootstrap resample is a weighted sum, as stats.Users does for its table."""

    def __init__(self, records, targets, titles, ks, popularity, n_items):
        ranked = [r["topk_item_ids"] for r in records]
        self.rows, self.ks, self.n_items = [r["row"] for r in records], tuple(ks), n_items
        self.terms, self.counts = {}, {}
        head = metrics.head_items(popularity)
        items = sorted({i for x in ranked for i in x})
        col = {i: j for j, i in enumerate(items)}
        for k in ks:
            m = metrics.per_user_metrics(ranked, targets, k, titles)
            self.terms[k] = {"ndcg": m["ndcg"], "hit": m["hit"], **metrics.popularity_terms(ranked, k, popularity, head)}
            u, i = zip(*[(u, col[i]) for u, x in enumerate(ranked) for i in x[:k]]) if any(ranked) else ((), ())
            self.counts[k] = sparse.csr_matrix((np.ones(len(u)), (u, i)), shape=(len(ranked), len(items)))

    def subset(self, rows):
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = [pos[r] for r in rows]
        out = object.__new__(AtK)
        out.rows, out.ks, out.n_items = list(rows), self.ks, self.n_items
        out.terms = {k: {n: v[idx] for n, v in t.items()} for k, t in self.terms.items()}
        out.counts = {k: c[idx] for k, c in self.counts.items()}
        return out

    def table(self, w):
        """w (B, n) resample weights -> {metric: (B,)}, in the column order of one cut-off's table."""
        out = {}
        for k in self.ks:
            t, listed = self.terms[k], w @ self.terms[k]["listed"]
            exposed = (self.counts[k].T @ w.T).T                                  # (B, items shown)
            out[f"NDCG@{k}"], out[f"HR@{k}"] = w @ t["ndcg"] / w.sum(1), w @ t["hit"] / w.sum(1)
            out[f"Coverage@{k}"] = metrics.coverage(exposed, self.n_items)
            out[f"ARP@{k}"] = np.where(listed > 0, w @ t["arp"] / np.maximum(listed, 1e-12), 0.0)
            out[f"Tail@{k}"] = np.where(listed > 0, w @ t["tail"] / np.maximum(listed, 1e-12), 0.0)
            out[f"Gini@{k}"] = metrics.gini_index(exposed, self.n_items)
        return out


def at_k_table(rows: dict, ref: str, B: int, seed: int) -> dict:
    """stats.bootstrap's layout for AtK rows: {row: {metric: (point, lo, hi)}}, then {"X - ref": ...}
    paired on the users both rows hold, each resample drawn once for both. Coverage and Gini: (point,
    None, None), see SET_LEVEL."""
    def cells(t):
        return {k: (float(v[0]), None, None) if k.split("@")[0] in SET_LEVEL else interval(v) for k, v in t.items()}
    out = {name: cells(u.table(weights(len(u.rows), B, seed))) for name, u in rows.items()}
    for name, u in rows.items():
        if name != ref:
            common = [r for r in u.rows if r in set(rows[ref].rows)]
            w = weights(len(common), B, seed)
            ta, tb = u.subset(common).table(w), rows[ref].subset(common).table(w)
            out[f"{name} - {ref}"] = cells({k: ta[k] - tb[k] for k in ta})
    return out


def markdown(table: dict, rows: dict, keys, paper: dict | None = None) -> list[str]:
    """The report's main-table layout: | row | users | cells | [paper] |, paired rows marked "paired"."""
    head = "| row | users | " + " | ".join(keys) + " |" + (" paper |" if paper is not None else "")
    L = [head, "|---" * (len(keys) + 2 + (paper is not None)) + "|"]
    for name, cells in table.items():
        n = "paired" if " - " in name else len(rows[name].rows)
        line = f"| {name} | {n} | " + " | ".join(fmt(cells[k]) if cells[k][1] is not None else f"{cells[k][0]:.4f}"
                                                  for k in keys) + " |"
        if paper is not None:
            cited = paper.get(name) if " - " not in name else None
            line += " " + (", ".join(f"{k} {v}" for k, v in cited.items()) if cited else "") + " |"
        L.append(line)
    return L


def verdicts(table: dict, names: list[str], keys) -> list[str]:
    """One line per later run: "X beats first" and stats.verdict_cell for each metric."""
    ref = names[0]
    L = ["| claim | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    return L + [f"| {n} beats {ref} | " + " | ".join(verdict_cell(table[f"{n} - {ref}"][k], k) for k in keys) + " |"
                for n in names[1:]]


def compare(runs: list[Run], ds, item_group: dict | None, ks, B: int, seed: int, paper: bool) -> list[str]:
    """The markdown report of `runs` (checked) on dataset `ds`'s test split."""
    by_row = {x.row: x for x in ds.test}
    rows = {run.name: Users(run.records, by_row, ds.titles, item_group or {}) for run in runs}
    names, ref = list(rows), runs[0].name
    keys = TABLE_KEYS if item_group else [k for k in TABLE_KEYS if k not in ("MGU@5", "DGU@5")]
    table = bootstrap(rows, ref, B, seed)
    L = [f"# {' vs '.join(names)} on {ds.name} (nanogdrt.analysis.compare)", "",
         f"Cells: point estimate [bootstrap 95% interval, {B} resamples of test users, seed {seed}]. "
         f"'- {ref}' rows: paired differences on the users both runs share. Definitions: nanogdrt/stats.py."
         + ("" if item_group else " No --item-groups: MGU/DGU left out."), ""]
    L += markdown(table, rows, keys, PAPER.get(ds.name, {}) if paper else None)
    L += ["", "## Verdicts", "", "Rule: the paired 95% interval of A - B wholly on the claimed side of 0: "
          "reproduced; wholly on the other side: not reproduced; containing 0: not resolved at this scale.", ""]
    L += verdicts(table, names, keys)
    popularity = metrics.target_popularity(x.target for x in ds.train)   # phi(i): training windows whose target is i
    at = {run.name: AtK(run.records, [by_row[x["row"]].target for x in run.records], ds.titles, ks, popularity,
                        len(ds.titles)) for run in runs}
    t = at_k_table(at, ref, B, seed)
    L += ["", "## At each cut-off, beyond accuracy", "",
          f"Popularity phi: training-target counts of {len(ds.train)} training windows; tail: items outside "
          f"the top {metrics.HEAD_SHARE:.0%} of trained items by phi; catalogue: {len(ds.titles)} items "
          "(nanogdrt/metrics.py's docstring). No verdicts; Coverage and Gini without intervals (a resample "
          "drops about 37% of the users, so it shows fewer distinct items than the data: the bootstrap is biased "
          "for them)."]
    for k in ks:
        L += ["", f"### @{k}", ""] + markdown(t, at, [f"{m}@{k}" for m in ("NDCG", "HR", "Coverage", "ARP", "Tail", "Gini")])
    return L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders or predictions files; the first is the reference")
    p.add_argument("--names", nargs="+", default=None, help="one label per run (default: the folder names)")
    p.add_argument("--dataset", default=None, help="toy | clothing | book | synthetic (default: the runs' results.json)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: load_dataset's rule)")
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"])
    p.add_argument("--train-file", default=None, help="training CSV for popularity (default: the runs' train_file)")
    p.add_argument("--item-groups", default=None, help="item id -> Eq. 2 group JSON (docs/repro/item_groups.json); "
                                                       "without it no MGU/DGU")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="cut-offs of the beyond-accuracy tables (default: 5 10, those the lists reach)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of test users")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--paper", action="store_true", help="the paper's numbers beside runs named like its methods")
    a = p.parse_args(argv)
    if len(a.runs) < 2:
        raise SystemExit("runs: give at least two runs to compare")
    if a.names is not None and len(a.names) != len(a.runs):
        raise SystemExit(f"--names: {len(a.names)} names for {len(a.runs)} runs")
    if any(k < 1 for k in a.k or []) or a.bootstrap < 1:
        raise SystemExit("--k and --bootstrap: positive integers")
    runs = [read_run(r, n) for r, n in zip(a.runs, a.names or [None] * len(a.runs))]
    if len({r.name for r in runs}) < len(runs):
        raise SystemExit(f"--names: two runs share a name ({', '.join(r.name for r in runs)}); give --names")
    check_users(runs)
    name = dataset_name(runs, a.dataset)
    cfg = next((r.results["config"] for r in runs if r.results and "config" in r.results), {})
    train_file = a.train_file or (cfg.get("train_file") if name not in ("synthetic", "controlled") else None)
    try:
        ds = load_dataset(name, data_dir=a.data_dir or cfg.get("data_dir"), train_file=train_file,
                          synthetic=synthetic.config_for(name, a.synthetic_size))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--dataset {name}: {e}") from None
    for run in runs:
        check_targets(run, {x.row: x for x in ds.test}, f"{name}/test")
    item_group = None
    if a.item_groups:
        try:
            item_group = {int(k): int(v) for k, v in json.loads(Path(a.item_groups).read_text()).items()}
        except (OSError, ValueError, AttributeError) as e:
            raise SystemExit(f"--item-groups {a.item_groups}: {e}") from None
    longest = max(len(x["topk_item_ids"]) for r in runs for x in r.records)
    ks = sorted(set(a.k or [k for k in (5, 10) if k <= longest] or [longest]))
    if ks[-1] > longest:
        raise SystemExit(f"--k {ks[-1]}: the runs' lists hold at most {longest} items, so @{ks[-1]} would "
                         f"repeat @{longest}; decode with --beams >= {ks[-1]}")
    print("\n".join(compare(runs, ds, item_group, ks, a.bootstrap, a.seed, a.paper)))


if __name__ == "__main__":
    main()
