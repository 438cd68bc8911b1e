"""The reproduction's vocabulary: row folder names, the grid spec, the metric columns, and the one
place a row is chosen (`chosen`: which GDRT (G, tau) and which MSL tau the report, the figures and
the stages use; by nanogdrt.stats.choose, the rule the GPU protocol also applies). The bottom layer
of experiments/repro: it imports only nanogdrt.

A row is a folder of docs/repro/ (`sft-s0`, `gdrt-G5-tau0.5-s0`, ...); a report label ("SFT",
"GDRT", ...) names the row a table shows (`row_names`).
"""

import json
from pathlib import Path

from nanogdrt.infra.stages import sha256
from nanogdrt.stats import SELECT_KEYS, TABLE_KEYS, choose

__all__ = ["TABLE_KEYS", "SELECT_KEYS", "parse_grid", "gdrt_row", "control_row", "msl_row", "sha256",
           "best_valid", "chosen", "row_names"]


def parse_grid(spec: str) -> list[tuple[int, float]]:
    """"5:0.5,2:0.5" -> [(5, 0.5), (2, 0.5)]"""
    try:
        return [(int(g), float(t)) for g, t in (item.split(":") for item in spec.split(","))]
    except ValueError:
        raise SystemExit(f"--grid {spec!r}: expected G:TAU[,G:TAU...], e.g. 5:0.5,2:0.5") from None


def gdrt_row(g, tau, seed=0) -> str:
    return f"gdrt-G{g}-tau{tau:g}-s{seed}"


def control_row(g, seed=0) -> str:
    """Our control (methods.py's group-mean): GDRT's G token groups with Q fixed uniform."""
    return f"groupmean-G{g}-s{seed}"


def msl_row(tau, seed=0) -> str:
    return f"msl-tau{tau:g}-s{seed}"


def best_valid(train_results: Path) -> dict:
    """Validation metrics of a run's best epoch (train.py's results.json)."""
    r = json.loads(Path(train_results).read_text())
    return next(e["valid"] for e in r["epochs"] if e["epoch"] == r["best_epoch"])


def chosen(docs, rows) -> str | None:
    """The trained row of `rows` (docs/<row>/train_results.json exists) chosen on validation
    (nanogdrt.stats.choose), or None when none is trained yet."""
    trained = [r for r in rows if (Path(docs) / r / "train_results.json").exists()]
    return choose({r: best_valid(Path(docs) / r / "train_results.json") for r in trained}) if trained else None


def row_names(docs, grid: str) -> dict:
    """Report label -> docs/repro folder, for the rows that exist (tested). GDRT: the grid's chosen
    row; MSL: the chosen one of the MSL taus that were trained. Reweight: IFairLRS's popularity groups;
    the Eq. 2 variant (our v2 row) is a labelled extra."""
    docs = Path(docs)
    msl = sorted(p.name for p in docs.glob("msl-tau*-s0"))
    gdrt = chosen(docs, [gdrt_row(g, t) for g, t in parse_grid(grid)])
    labels = {"Base model": "base", "SFT": "sft-s0", "GDRT": gdrt, "MSL": chosen(docs, msl), "MSL+GDRT": "msl-gdrt-s0",
              "Reweight": "reweight-pop-s0", "Reweight (Eq. 2 groups)": "reweight-s0", "SFT+D3": "sft-d3",
              "SASRec": "sasrec", "SASRec++": "sasrec-pp"}
    return {k: v for k, v in labels.items() if v and (docs / v / "test_predictions.jsonl").exists()}
