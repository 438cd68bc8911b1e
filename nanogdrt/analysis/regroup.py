"""Fairness under item groupings that GDRT never saw (nanogdrt/analysis/groupings.py): MGU/DGU
(Eq. 2's metric) and the Fig. 8 check, from committed predictions only (no model forward, no retraining).

    python -m nanogdrt.analysis.regroup SFT=docs/repro/sft-s0 GDRT=docs/repro/gdrt-G5-tau0.5-s0 \
        --dataset toy --data-dir ../shared/data/toy --item-groups docs/repro/item_groups.json --ref SFT

Why. MGU/DGU (§4.1.4, nanogdrt/metrics.py) judge a model by five item groups cut from the base
model's Eq. 2 relevance, and GDRT's token groups (Eq. 3) come from the same base-model signal, so
GDRT partly optimises the yardstick that judges it. Here the same metric is computed under three
groupings built without the base model, beside the Eq. 2 groups themselves (--item-groups):

    popularity   IFairLRS's popularity groups (the Reweight baseline's) from training-target counts
    ngram        Eq. 2's notion, "predictable from the title's own prefix", under a count-based
                 n-gram model of the catalogue's titles instead of the LLM
    length       title length in tokens

Each is a dict item id -> group 1..5 over the whole catalogue (every title the trie can produce).

Per grouping and row (a predictions file), on the row's test users:
    MGU@K, DGU@K (K = 5, 10)  metrics.group_unfairness itself, given the other grouping
    top-1 shares              metrics.group_distribution of the users' first recommendations, and
                              of their test targets
    TV                        the Fig. 8 check: the total variation distance between the two,
                              TV(p, q) = 1/2 sum_g |p_g - q_g|
Per pair A - B (--ref, --pair): each difference with a paired bootstrap interval over the users
both rows hold, drawn by stats.weights exactly as stats.paired draws them (the same seed and count
give the same resamples); MGU/DGU pool each resample's group counts as stats.Users does.

Why total variation for Fig. 8. The figure asks whether the top-1 recommendations land in the item
groups as often as the test targets do. TV is half the L1 gap: the largest difference in
probability that any set of groups gets, in [0, 1], symmetric, finite when a group is empty on
either side (KL is infinite as soon as the top-1 never hits a group the targets hold, which a
collapsed model does), and a function of pooled shares, so a resample needs no re-scoring. The
repository computed no distance for Fig. 8 before (experiments/repro draws the bars only). One
caution: a distance of two estimated distributions is biased upwards (sampling noise only adds
to it when they are close), so a row's own TV interval sits high; paired differences A - B carry
that bias on both sides and are the numbers to read.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nanogdrt import files, metrics, stats, synthetic
from nanogdrt.analysis.compare import check_targets, check_users, dataset_name, read_run
from nanogdrt.analysis.groupings import NGRAM_ORDER, build_groupings, describe
from nanogdrt.grouping import popularity_groups
from nanogdrt.data import load_dataset
from nanogdrt.grouping import N_ITEM_GROUPS

KS = (5, 10)
KEYS = ("MGU@5", "DGU@5", "MGU@10", "DGU@10", "TV")


# ----------------------------------------------------------------------------- per-user terms

class Terms(NamedTuple):
    """One row under one grouping, per user, so that a bootstrap resample is a weighted sum."""
    rows: list
    users: dict        # K -> stats.Users pooling the top-K lists (its "MGU@5"/"DGU@5" are @K)
    top1: np.ndarray   # (n, G) one-hot group of each user's first recommendation (zeros: none)
    target: np.ndarray  # (n, G) one-hot group of each user's test target

    def subset(self, rows):
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = [pos[r] for r in rows]
        return Terms(list(rows), {k: u.subset(rows) for k, u in self.users.items()}, self.top1[idx], self.target[idx])

    def table(self, w):
        """w (B, n) resample weights -> {key: (B,)} for KEYS."""
        out = {}
        for k, u in self.users.items():
            t = u.table(w)
            out[f"MGU@{k}"], out[f"DGU@{k}"] = t["MGU@5"], t["DGU@5"]
        out["TV"] = total_variation(w @ self.top1, w @ self.target)
        return out


def one_hot(items, item_group, n_groups=N_ITEM_GROUPS) -> np.ndarray:
    out = np.zeros((len(items), n_groups))
    for u, i in enumerate(items):
        if i is not None and i in item_group:
            out[u, item_group[i] - 1] = 1.0
    return out


def total_variation(p, q) -> np.ndarray:
    """1/2 sum_g |p_g - q_g| of the shares of two (..., G) count arrays, each normalised first."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-12)
    return 0.5 * np.abs(p - q).sum(-1)


def terms(records, by_row, titles, item_group) -> Terms:
    users = {k: stats.Users(records, by_row, titles, item_group, k_groups=k) for k in KS}
    top1 = one_hot([r["topk_item_ids"][0] if r["topk_item_ids"] else None for r in records], item_group)
    target = one_hot([by_row[r["row"]].target for r in records], item_group)
    return Terms([r["row"] for r in records], users, top1, target)


def row_cells(t: Terms, B: int, seed: int) -> dict:
    """{key: (point, lo, hi)} on the row's users (stats.weights' row 0 is the point)."""
    return {k: stats.interval(v) for k, v in t.table(stats.weights(len(t.rows), B, seed)).items()}


def paired_cells(a: Terms, b: Terms, B: int, seed: int) -> dict:
    """{key: (point, lo, hi)} of A - B on the users both hold, stats.paired's draw."""
    common = [r for r in a.rows if r in set(b.rows)]
    w = stats.weights(len(common), B, seed)
    ta, tb = a.subset(common).table(w), b.subset(common).table(w)
    return {k: stats.interval(ta[k] - tb[k]) for k in KEYS}


def side(c) -> str:
    """A paired interval read in words: A lower / A higher when it excludes 0, else unresolved."""
    return "A lower" if c[2] < 0 else "A higher" if c[1] > 0 else "not resolved"


def score(runs, ds, groupings: dict, pairs: list[tuple[str, str]], B: int, seed: int) -> dict:
    """The JSON's "rows" and "paired" entries: every row under every grouping, every pair."""
    by_row = {x.row: x for x in ds.test}
    rows, paired = {}, {}
    for gname, g in groupings.items():
        t = {run.name: terms(run.records, by_row, ds.titles, g) for run in runs}
        for run in runs:
            ranked = [r["topk_item_ids"] for r in run.records]
            histories = [by_row[r["row"]].history for r in run.records]
            cells = row_cells(t[run.name], B, seed)
            for k in KS:            # the point: the metric itself, on all of the row's users (the same number)
                point = metrics.group_unfairness(ranked, histories, g, k)
                for key, v in zip((f"MGU@{k}", f"DGU@{k}"), point):
                    cells[key] = (v, *cells[key][1:])
            top1 = [x[0] for x in ranked if x]
            rows.setdefault(run.name, {"users": len(run.records)})[gname] = {
                **cells, "top1_share": metrics.group_distribution(top1, g).tolist(),
                "target_share": metrics.group_distribution([by_row[r["row"]].target for r in run.records], g).tolist()}
        for a, b in pairs:
            paired.setdefault(f"{a} - {b}", {})[gname] = paired_cells(t[a], t[b], B, seed)
    return {"rows": rows, "paired": paired}


# ----------------------------------------------------------------------------- report

def cell(c) -> str:
    return f"{c:.4f}" if not isinstance(c, (tuple, list)) else f"{c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]"


def diff(c) -> str:
    return f"{c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}] {side(c)}"


def markdown(out: dict) -> list[str]:
    """The report: command, groupings, paired differences, then each grouping's rows."""
    names = list(out["groupings"])
    L = ["# Fairness under item groupings GDRT never saw (nanogdrt.analysis.regroup)", "",
         f"Command: `{out['command']}`", "",
         f"Dataset {out['dataset']}; training counts from {out['train_windows']} windows ({out['train_file']}). "
         f"Intervals: bootstrap 95% percentile, {out['bootstrap']} resamples of test users, seed {out['seed']}; "
         "'A - B': paired on the users both rows hold (stats.paired's draw). 'A lower' / 'A higher': the "
         "interval excludes 0 on that side. TV: total variation between the row's top-1 group shares and its "
         "test targets' (the Fig. 8 check; lower = closer). Definitions: nanogdrt/analysis/groupings.py and regroup.py.", "",
         "## Groupings", "", "| grouping | what | sizes (groups 1..5) | Spearman with Eq. 2 groups |", "|---|---|---|---|"]
    L += [f"| {n} | {d['what']} | {', '.join(map(str, d['sizes']))} | {d['spearman_with_eq2']:+.3f} |"
          for n, d in out["groupings"].items()]
    if out["paired"]:
        short = lambda c: f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}] {side(c).removeprefix('A ')}"  # noqa: E731
        L += ["", "## Summary: DGU@5 and the Fig. 8 distance (TV), A - B under each grouping", "",
              "| A - B | " + " | ".join(f"DGU@5 {n}" for n in names) + " | " + " | ".join(f"TV {n}" for n in names)
              + " |", "|---" * (2 * len(names) + 1) + "|"]
        L += [f"| {p} | " + " | ".join(short(cells[n][k]) for k in ("DGU@5", "TV") for n in names) + " |"
              for p, cells in out["paired"].items()]
        L += ["", "## Paired differences A - B", "", "| A - B | grouping | " + " | ".join(KEYS) + " |",
              "|---" * (len(KEYS) + 2) + "|"]
        L += [f"| {p} | {n} | " + " | ".join(diff(cells[n][k]) for k in KEYS) + " |"
              for p, cells in out["paired"].items() for n in names]
    for n in names:
        L += ["", f"## Rows under {n}", "", "| row | users | " + " | ".join(KEYS[:-1]) +
              " | top-1 shares (1..5) | target shares (1..5) | TV |", "|---" * (len(KEYS) + 4) + "|"]
        for row, r in out["rows"].items():
            c = r[n]
            L.append(f"| {row} | {r['users']} | " + " | ".join(cell(c[k]) for k in KEYS[:-1]) + " | "
                     + ", ".join(f"{x:.3f}" for x in c["top1_share"]) + " | "
                     + ", ".join(f"{x:.3f}" for x in c["target_share"]) + f" | {cell(c['TV'])} |")
    return L


# ----------------------------------------------------------------------------- command line

def parse_rows(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=PATH arguments -> [(name, path)], one line on the first bad one."""
    out = []
    for s in specs:
        name, eq, path = s.partition("=")
        if not eq or not name or not path:
            raise SystemExit(f"rows: {s!r} is not NAME=PATH (a name, '=', a run folder or predictions file)")
        if any(name == n for n, _ in out):
            raise SystemExit(f"rows: the name {name!r} is given twice")
        out.append((name, path))
    return out


def read_item_groups(path, catalogue) -> dict[int, int]:
    """--item-groups: {"item id": group 1..5} covering the catalogue; one line on anything else."""
    try:
        raw = json.loads(Path(path).read_text())
        groups = {int(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise SystemExit(f"--item-groups {path}: {e}") from None
    bad = next((k for k, v in groups.items() if not 1 <= v <= N_ITEM_GROUPS), None)
    if bad is not None:
        raise SystemExit(f"--item-groups {path}: item {bad} has group {groups[bad]}, outside 1..{N_ITEM_GROUPS}")
    missing = [i for i in catalogue if i not in groups]
    if missing:
        raise SystemExit(f"--item-groups {path}: {len(missing)} catalogue items have no group (first: {missing[0]}): "
                         "another dataset?")
    return {i: groups[i] for i in catalogue}


def check_pairs(a, names: list[str]) -> list[tuple[str, str]]:
    """--ref and --pair -> [(A, B)]: every other row minus the reference, then the pairs given."""
    for flag, given in [("--ref", [a.ref] if a.ref else [])] + [("--pair", p) for p in a.pair or []]:
        unknown = [n for n in given if n not in names]
        if unknown:
            raise SystemExit(f"{flag}: no row named {unknown[0]!r} (rows: {', '.join(names)})")
    pairs = [(n, a.ref) for n in names if a.ref and n != a.ref] + [tuple(p) for p in a.pair or []]
    same = next((p for p in pairs if p[0] == p[1]), None)
    if same:
        raise SystemExit(f"--pair: {same[0]} minus itself")
    return list(dict.fromkeys(pairs))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", help="NAME=PATH: a run folder or a predictions file (JSON lines with row, "
                                           "target_item_id, topk_item_ids), one per row")
    p.add_argument("--dataset", default=None, help="toy | clothing | book | synthetic (default: the runs' results.json)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: load_dataset's rule)")
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"])
    p.add_argument("--train-file", default=None, help="training CSV the popularity counts come from (default: "
                                                      "load_dataset's rule, the largest: train_5000.csv on Toy)")
    p.add_argument("--item-groups", required=True, help="item id -> Eq. 2 group JSON (docs/repro/item_groups.json)")
    p.add_argument("--tokenizer", default=None, help="model folder whose tokenizer.json tokenizes the titles "
                                                     "(default: the embedded SmolLM2 checkpoint; no weights are read)")
    p.add_argument("--ngram-order", type=int, default=NGRAM_ORDER, help="order of the title n-gram model")
    p.add_argument("--ref", default=None, help="row name: every other row gets a paired 'row - ref'")
    p.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), help="one more paired A - B (repeatable)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of test users")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="write the numbers here (JSON)")
    p.add_argument("--md", default=None, help="write the markdown report here too")
    return p


def load(a, runs):
    """The dataset of the runs (checked against their targets) and the tokenizer's prompt builder."""
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer

    name = dataset_name(runs, a.dataset)
    try:
        ds = load_dataset(name, data_dir=a.data_dir, train_file=a.train_file,
                          synthetic=synthetic.config_for(name, a.synthetic_size))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--dataset {name}: {e}") from None
    for run in runs:
        check_targets(run, {x.row: x for x in ds.test}, f"{name}/test")
    try:
        builder = PromptBuilder(Tokenizer(a.tokenizer or ensure_embedded_checkpoint()), name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--tokenizer: {e}") from None
    return ds, builder


def main(argv=None):
    a = parser().parse_args(argv)
    if a.bootstrap < 1 or a.ngram_order < 1:
        raise SystemExit("--bootstrap and --ngram-order: positive integers")
    specs = parse_rows(a.rows)
    pairs = check_pairs(a, [n for n, _ in specs])
    runs = [read_run(path, name) for name, path in specs]
    check_users(runs)
    ds, builder = load(a, runs)
    eq2 = read_item_groups(a.item_groups, sorted(ds.titles))
    try:
        popularity = popularity_groups(ds.train, ds.titles)       # the one that can refuse its data: first
    except ValueError as e:
        raise SystemExit(f"--train-file: {e}") from None
    groupings = build_groupings(ds, builder, eq2, popularity, a.ngram_order)
    out = {"command": "python -m nanogdrt.analysis.regroup " + shlex.join(argv if argv is not None else
                                                                           sys.argv[1:]),
           "dataset": ds.name, "train_file": a.train_file or "load_dataset's rule", "train_windows": len(ds.train),
           "bootstrap": a.bootstrap, "seed": a.seed, "groupings": describe(groupings, a.ngram_order),
           **score(runs, ds, groupings, pairs, a.bootstrap, a.seed)}
    text = "\n".join(markdown(out)) + "\n"
    if a.out:
        files.write_json(a.out, out)
    if a.md:
        files.write_text(a.md, text)
    print(text, end="")
    return out


if __name__ == "__main__":
    main()
