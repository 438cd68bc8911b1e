"""The plan's two decisions, read from committed JSON: which (G, tau) a setting's GDRT and control
use (the selection rule), and whether SFT passes the pilot's gate. Each is also a small command
that writes its decision down before the runs it governs (plan.py's stages):

    python -m experiments.controlled.rules choose --setting docs/controlled/s0.3 --grid 2:0.2,...
        -> docs/controlled/s0.3/chosen.json
    python -m experiments.controlled.rules gate --setting docs/controlled/s0.3
        -> docs/controlled/s0.3/gate.json (and printed)

The rules (docs/controlled/plan.md): the best validation NDCG@5 that train.py reports, ties broken
by the smaller G, then the larger tau (not nanogdrt.stats.choose, whose ties go to NDCG@10: the
plan was registered with its own rule). The gate: SFT (seed 0) changes its top-1 under a swapped
history for more than 0.3 of the users, and its oracle-relative E[NDCG@10] is above the base
model's. Layer: above settings.py; imports no torch.
"""

import argparse
import json
from pathlib import Path

from experiments.controlled.settings import GATE_SWAP, parse_grid, select_folder
from nanogdrt import files


def best_valid(train_results: Path) -> dict:
    """Validation metrics of a run's best epoch (the collected results of train.py)."""
    r = json.loads(Path(train_results).read_text())
    return next(e["valid"] for e in r["epochs"] if e["epoch"] == r["best_epoch"])


def choose(valid_ndcg5: dict[tuple[int, float], float]) -> tuple[int, float]:
    """The plan's rule: {(G, tau): validation NDCG@5} -> the best; ties: smaller G, then larger tau."""
    return max(valid_ndcg5, key=lambda gt: (valid_ndcg5[gt], -gt[0], gt[1]))


def chosen_record(setting: Path, grid) -> dict:
    """What chosen.json holds: every grid run's validation NDCG@5 and the chosen (G, tau)."""
    missing = [select_folder(g, t) for g, t in grid
               if not (setting / select_folder(g, t) / "train_results.json").exists()]
    if missing:
        raise SystemExit(f"error: choosing (G, tau) in {setting} needs every grid run; missing {missing}")
    valid = {(g, t): best_valid(setting / select_folder(g, t) / "train_results.json")["NDCG@5"] for g, t in grid}
    g, tau = choose(valid)
    return {"groups": g, "tau": tau, "rule": "best validation NDCG@5; ties: smaller G, then larger tau",
            "valid_NDCG@5": {f"{g}:{t:g}": v for (g, t), v in valid.items()}}


def read_chosen(setting: Path) -> tuple[int, float]:
    c = json.loads((Path(setting) / "chosen.json").read_text())
    return c["groups"], c["tau"]


def gate_record(setting: Path) -> dict:
    """The pilot's gate at one setting from SFT seed 0's and the base model's measures.json."""
    sft = json.loads((setting / "sft-seed0" / "measures.json").read_text())
    base = json.loads((setting / "base" / "measures.json").read_text())
    swap = sft["reliance"]["swap"]["top1_changed"]
    rel_sft, rel_base = sft["relative"]["E[NDCG@10]"], base["relative"]["E[NDCG@10]"]
    passed = swap > GATE_SWAP and rel_sft > rel_base
    return {"shortcut": sft["shortcut"], "sft_swap_top1_changed": swap, "threshold": GATE_SWAP,
            "sft_relative_E[NDCG@10]": rel_sft, "base_relative_E[NDCG@10]": rel_base,
            "sft_E[NDCG@10]": sft["expected"]["NDCG@10"], "base_E[NDCG@10]": base["expected"]["NDCG@10"],
            "oracle_swap_top1_changed": sft["oracle"]["swap_top1_changed"], "passed": passed,
            "rule": f"SFT swap top-1-changed > {GATE_SWAP} and SFT oracle-relative E[NDCG@10] > the base model's"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["choose", "gate"])
    p.add_argument("--setting", required=True, help="a setting's committed folder, e.g. docs/controlled/s0.3")
    p.add_argument("--grid", default=None, help="choose: the G:TAU grid")
    a = p.parse_args(argv)
    setting = Path(a.setting)
    if a.command == "choose":
        record = chosen_record(setting, parse_grid(a.grid))
        files.write_json(setting / "chosen.json", record)
        print(f"{setting.name}: chosen G {record['groups']}, tau {record['tau']:g} ({record['valid_NDCG@5']})")
    else:
        record = gate_record(setting)
        files.write_json(setting / "gate.json", record)
        print(f"gate {setting.name}: {'PASSED' if record['passed'] else 'FAILED'}: SFT swap top-1 changed "
              f"{record['sft_swap_top1_changed']:.3f} (> {GATE_SWAP}; oracle "
              f"{record['oracle_swap_top1_changed']:.3f}), oracle-relative E[NDCG@10] SFT "
              f"{record['sft_relative_E[NDCG@10]']:.3f} vs base {record['base_relative_E[NDCG@10]']:.3f}")


if __name__ == "__main__":
    main()
