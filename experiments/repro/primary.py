"""The pre-registered primary family (docs/repro_v3_plan.md): the only claims the report calls
confirmatory, tested and corrected as registered before the Books runs.

    GDRT (G 5, tau 0.5, fixed in advance) against SFT, on NDCG@10 and DGU@5, on each dataset,
    (a) over users: seed 0 of both arms on the same seeded test users, paired bootstrap, 10,000
        resamples, two-sided p with the +1 rule (nanogdrt.inference.bootstrap_difference);
    (b) over training seeds 0, 1, 2: paired t on the per-seed differences (seed k fixes both arms'
        initialisation, data order and data sample).
    Holm over all 8 p-values at 0.05; a claim whose rows are missing counts with p = 1, so the
    family's size stays 8 whatever has run. NDCG@10 also gets TOST at a margin of 28.5% of the SFT
    arm's level (the paper's Toy change SFT -> GDRT, relative), uncorrected, as a label of the claims
    Holm does not reject: "smaller than the paper's effect" or "underpowered".
    A user-level label must be the same under bootstrap seeds 0-4 (the whole family recomputed under
    each); one that changes is "unstable" and counts as not rejected.

Everything else in the report is exploratory. Layer: above data.py and rows.py (reads row folders).
"""

import math
from typing import NamedTuple

from experiments.repro.rows import gdrt_row
from nanogdrt import inference

METRICS = ("NDCG@10", "DGU@5")
GDRT = (5, 0.5)
SEEDS = (0, 1, 2)
RESAMPLES = 10_000
BOOTSTRAP_SEEDS = (0, 1, 2, 3, 4)
ALPHA = 0.05
PAPER_TOY = {"SFT": 0.0158, "GDRT": 0.0203}           # Table 2, Toy, NDCG@10 (Llama-3.2-3B)
RELATIVE_MARGIN = PAPER_TOY["GDRT"] / PAPER_TOY["SFT"] - 1   # +28.5%
LABELS = {"reproduced": "reproduced", "not reproduced": "contradicted", inference.NOT_RESOLVED: "not resolved",
          inference.EQUIVALENT: "smaller than the paper's effect", inference.UNDERPOWERED: "underpowered"}


class Test(NamedTuple):
    claim: str              # "Toy, NDCG@10, users"
    metric: str
    difference: object      # inference.Difference of GDRT - SFT, or None when a row is missing
    detail: str             # which rows / seeds


def sft_gdrt(seed):
    return f"sft-s{seed}", gdrt_row(*GDRT, seed)


def tost_margin(metric, sft_levels) -> float | None:
    """The registered equivalence margin: 28.5% of SFT's mean NDCG@10; none for DGU@5, or when SFT
    scored 0 (no level to scale: a tiny test model)."""
    level = sum(sft_levels) / len(sft_levels)
    return RELATIVE_MARGIN * level if metric == "NDCG@10" and level > 0 else None


def user_test(dataset, rows, metric, boot_seed, B=RESAMPLES) -> Test:
    """Seed 0 of both arms, paired over the users they share."""
    sft, gdrt = sft_gdrt(0)
    claim = f"{dataset}, {metric}, users"
    if not (rows.has(sft) and rows.has(gdrt)):
        return Test(claim, metric, None, f"{gdrt} or {sft} not run yet")
    a, b = rows.users(gdrt), rows.users(sft)
    margin = tost_margin(metric, [rows.point(sft)["NDCG@10"]])
    draws = inference.paired_draws(a, b, B, boot_seed)[metric]
    return Test(claim, metric, inference.bootstrap_difference(draws, ALPHA, margin),
                f"{gdrt} - {sft}, {len(a.rows)} users, {B} resamples")


def seed_test(dataset, rows, metric) -> Test:
    """Seeds that both arms have run, paired by seed (two at least)."""
    claim = f"{dataset}, {metric}, seeds"
    seeds = [s for s in SEEDS if all(rows.has(f) for f in sft_gdrt(s))]
    if len(seeds) < 2:
        return Test(claim, metric, None, f"{len(seeds)} of {len(SEEDS)} seed pairs run")
    sft = [rows.point(sft_gdrt(s)[0])[metric] for s in seeds]
    gdrt = [rows.point(sft_gdrt(s)[1])[metric] for s in seeds]
    margin = tost_margin(metric, [rows.point(sft_gdrt(s)[0])["NDCG@10"] for s in seeds])
    return Test(claim, metric, inference.paired_t(gdrt, sft, ALPHA, margin),
                f"seeds {', '.join(map(str, seeds))} (paired t, {len(seeds) - 1} df)")


def family(datasets: dict, boot_seed: int, B=RESAMPLES) -> list[Test]:
    """datasets: {"Toy": rows, "Books": rows or None}, rows with .has(folder), .users(), .point()."""
    out = []
    for name, rows in datasets.items():
        for metric in METRICS:
            out.append(user_test(name, rows, metric, boot_seed, B) if rows is not None
                       else Test(f"{name}, {metric}, users", metric, None, "dataset not run yet"))
        for metric in METRICS:
            out.append(seed_test(name, rows, metric) if rows is not None
                       else Test(f"{name}, {metric}, seeds", metric, None, "dataset not run yet"))
    return out


def labelled(tests: list[Test]) -> dict[str, tuple[str, float]]:
    """{claim: (label, Holm p)}: Holm over every claim (a missing one with p = 1), then the TOST
    label of the registered margin, uncorrected, where Holm does not reject."""
    adjusted = inference.holm({t.claim: (t.difference.p if t.difference else 1.0) for t in tests}, ALPHA)
    out = {}
    for t in tests:
        if t.difference is None:
            out[t.claim] = ("not run yet", 1.0)
            continue
        d = t.difference
        equivalent = not math.isnan(d.p_equivalent) and d.p_equivalent <= ALPHA
        words = inference.label(d, t.metric, adjusted.reject[t.claim], equivalent)
        if words == inference.UNDERPOWERED and math.isnan(d.margin):
            words = inference.NOT_RESOLVED              # no equivalence was registered for this metric
        out[t.claim] = (LABELS.get(words, words), adjusted.adjusted[t.claim])
    return out


def verdicts(datasets: dict, B=RESAMPLES) -> list[dict]:
    """The family under bootstrap seed 0, each user-level label checked under seeds 1-4."""
    runs = {s: family(datasets, s, B) for s in BOOTSTRAP_SEEDS}
    found = {s: labelled(runs[s]) for s in BOOTSTRAP_SEEDS}
    out = []
    for t in runs[0]:
        label, p_holm = found[0][t.claim]
        seen = sorted({found[s][t.claim][0] for s in BOOTSTRAP_SEEDS})
        if len(seen) > 1:
            label = f"unstable ({' / '.join(seen)} across bootstrap seeds)"
        out.append({"claim": t.claim, "metric": t.metric, "detail": t.detail, "label": label,
                    "p_holm": p_holm, "difference": t.difference._asdict() if t.difference else None})
    return out


def section(datasets: dict, B=RESAMPLES) -> tuple[list[str], list[dict]]:
    """The report's first verdict table, and its rows for report.json."""
    rows = verdicts(datasets, B)
    L = ["", "## The primary family (confirmatory, pre-registered: docs/repro_v3_plan.md)", "",
         f"GDRT (G {GDRT[0]}, tau {GDRT[1]:g}, fixed before the Books runs) against SFT. Users: seed 0 of both arms, "
         f"paired bootstrap over the same test users, {B} resamples, labels checked under bootstrap seeds "
         f"{BOOTSTRAP_SEEDS[0]}-{BOOTSTRAP_SEEDS[-1]}. Seeds: paired t over training seeds {', '.join(map(str, SEEDS))}. "
         f"Holm over all {len(rows)} claims at {ALPHA} (a claim not run yet counts with p = 1). NDCG@10: TOST at "
         f"{RELATIVE_MARGIN:.1%} of SFT's level (the paper's Toy change, relative), 90% interval, uncorrected.", "",
         "| claim | GDRT - SFT [95%] | p | Holm p | TOST margin, 90% interval | verdict | rows |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["difference"]
        if d is None:
            L.append(f"| {r['claim']} | - | - | - | - | {r['label']} | {r['detail']} |")
            continue
        tost = (f"+-{d['margin']:.4f}, [{d['eq_lo']:+.4f}, {d['eq_hi']:+.4f}]" if not math.isnan(d["margin"]) else "-")
        L.append(f"| {r['claim']} | {d['point']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {d['p']:.3g} | "
                 f"{r['p_holm']:.3g} | {tost} | {r['label']} | {r['detail']} |")
    return L, rows
