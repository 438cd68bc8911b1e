"""Report of the GPU protocol (experiments/gpu/protocol.py): Table 2 with bootstrap intervals, on CPU.

Reads a state folder (the test predictions of the base model, SFT and the chosen GDRT, the item
groups the device computed, the validation of every run, the stages' wall times) and writes
report.md and report.json beside them: the section "Paper protocol on one GPU" of
docs/results.md is taken from report.md. A protocol still in progress gets the rows tested so
far, marked as such, so each session's progress is readable. The bootstrap is the reproduction's
(nanogdrt/stats.py: users resampled, GDRT - SFT paired on the same resamples). Layer: above plan.py.
"""

import gzip
import json
from pathlib import Path

from experiments.gpu.plan import is_done, read_jsonl_gz, run_names, stage_names
from nanogdrt import stats
from nanogdrt.data import load_dataset
from nanogdrt.stats import SELECT_KEYS, TABLE_KEYS

NAMES = {"base model": "base", "SFT": "sft"}


def bootstrap(models: dict, titles, item_group, n_boot=1000, seed=0) -> dict:
    """{name: (records, by_row)} -> point estimates and 95% intervals over users, and the paired
    GDRT - SFT only (the table's rows)."""
    users = {name: stats.Users(records, by_row, titles, item_group) for name, (records, by_row) in models.items()}
    table = stats.bootstrap(users, "SFT", n_boot, seed)
    return {k: v for k, v in table.items() if " - " not in k or k == "GDRT - SFT"}


def report(state: Path, data_dir, n_boot=1000):
    plan = json.loads((state / "plan.json").read_text())
    progress = json.loads((state / "progress.json").read_text())
    chosen = progress.get("selection", {}).get("run")
    folders = {**NAMES, **({f"GDRT ({chosen[5:]})": chosen} if chosen else {})}
    tested = {name: f for name, f in folders.items() if (state / f / "test_predictions.jsonl.gz").exists()}
    if not tested:
        raise SystemExit(f"{state}: no test predictions yet (python -m experiments.gpu status)")
    todo = [name for name in stage_names(plan) if not is_done(state, progress, name)]
    dataset = load_dataset(plan["dataset"], data_dir=data_dir, train_file=plan["train_file"])
    item_group = {int(k): v for k, v in json.loads((state / "item_groups.json").read_text()).items()}
    by_row = {x.row: x for x in dataset.test}
    models = {("GDRT" if f == chosen else name): (read_jsonl_gz(state / f / "test_predictions.jsonl.gz"), by_row)
              for name, f in tested.items()}
    table = bootstrap(models, dataset.titles, item_group, n_boot, plan["seed"])
    keys = TABLE_KEYS

    calls = progress["calls"]
    devices = sorted({c["device"] for c in calls})
    users = len(next(iter(models.values()))[0])
    lines = ([f"**In progress**: {len(todo)} stages left ({', '.join(todo)}); the rows below are the ones "
              "tested so far.", ""] if todo else [])
    grid = ", ".join(f"G{g} tau {t:g}" for g, t in plan["grid"])
    lines += [f"Device: {', '.join(devices)}; {len(calls)} calls; dtype {progress['dtype']}; GDRT grid: {grid}. "
              f"Test users: {users} "
             f"(the whole test split). Cells: point estimate [bootstrap 95% interval, {n_boot} resamples of users].",
             "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in table.items():
        label = f"GDRT ({chosen[5:]})" if name == "GDRT" else name
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in row.values()) + " |")

    agreement = progress.get("agreement")
    if agreement:
        lines += ["", f"bf16 vs fp32 beam search, {agreement['users']} validation users, base model: same top-10 "
                  f"lists {agreement['same_lists']:.1%}, same top-1 {agreement['same_top1']:.1%}, mean overlap@10 "
                  f"{agreement['overlap@10']:.3f}; s/user " + ", ".join(f"{d} {v:.4f}" for d, v in
                                                                      agreement["s_per_user"].items() if v)]
    valid, valid_lines = {}, []
    for name in run_names(plan):
        if not (state / name / "trainer_state.json.gz").exists():
            continue                                                   # still training
        with gzip.open(state / name / "trainer_state.json.gz", "rt") as f:
            st = json.load(f)
        best = next(e["valid"] for e in st["epochs"] if e["epoch"] == st["best"]["epoch"])
        valid[name] = {"best_epoch": st["best"]["epoch"], "epochs": [e["valid"] for e in st["epochs"]]}
        mark = " (chosen)" if name == chosen else ""
        valid_lines.append(f"| {name}{mark} | {st['best']['epoch']} | "
                           + " | ".join(f"{best[k]:.4f}" for k in SELECT_KEYS) + " |")

    if valid_lines:
        lines += ["", f"Validation ({plan['valid_users']} users per epoch); best epoch by NDCG@5:", "",
                  "| run | best epoch | " + " | ".join(f"valid {k}" for k in SELECT_KEYS) + " |",
                  "|---" * (len(SELECT_KEYS) + 2) + "|"] + valid_lines
    lines += ["", "Wall time per stage (device seconds, summed over calls; one process per chunk):", "",
              "| stage | seconds | processes | command (first chunk) |", "|---|---|---|---|"]
    for name in stage_names(plan):
        e = progress["stages"].get(name)
        if e:
            lines.append(f"| {name} | {e['seconds']:.0f} | {e['processes']} | `{e['command']}` |")
    text = "\n".join(lines) + "\n"
    (state / "report.md").write_text(text)
    (state / "report.json").write_text(json.dumps({"table": table, "valid": valid, "agreement": agreement,
                                                   "selection": progress.get("selection"), "devices": devices,
                                                   "stages_left": todo}, indent=1))
    print(text)
