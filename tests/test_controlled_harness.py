"""experiments/controlled: the plan's rules and statistics against direct computations, and the
staged sweep end to end on a tiny random Llama (the 400-user world, 8 test users): the pilot and
its gate, the selection, trained and measured runs, the manifest's commands, skipping, the report."""

import json

import numpy as np
import pytest

from experiments.controlled import report, rules
from experiments.controlled.runner import main as controlled_main
from nanogdrt.infra.stages import sha256
from nanogdrt import controlled
from nanogdrt.controlled import ControlledConfig
from nanogdrt.data import load_dataset


def test_selection_rule_breaks_ties_by_smaller_g_then_larger_tau():
    assert rules.choose({(2, 0.2): 0.1, (5, 1.0): 0.3, (2, 0.5): 0.2}) == (5, 1.0)
    assert rules.choose({(5, 1.0): 0.3, (2, 0.2): 0.3, (2, 1.0): 0.3}) == (2, 1.0)


def test_one_sided_test_and_holm_against_scipy_and_by_hand():
    import scipy.stats
    d = [0.12, 0.05, 0.2, 0.09, 0.15]
    c = report.one_sided(d, -0.05)
    ref = scipy.stats.ttest_1samp(np.array(d) + 0.05, 0.0, alternative="greater")
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-9) and c["mean"] == pytest.approx(np.mean(d))
    half = 2.776 * np.std(d, ddof=1) / np.sqrt(5)                       # the plan's t(4)
    assert (c["lo"], c["hi"]) == pytest.approx((np.mean(d) - half, np.mean(d) + half), abs=1e-3)
    # Holm: sorted 0.01, 0.02, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 0.04); a missing claim stays NaN
    adj = report.holm({"P1": 0.04, "P2": 0.01, "P3": 0.02, "P4": float("nan")})
    assert (adj["P2"], adj["P3"], adj["P1"]) == pytest.approx((0.03, 0.04, 0.04)) and adj["P4"] != adj["P4"]


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controlled")
    args = ["--model", str(tiny_model_dir), "--shortcuts", "0,0.3", "--seeds", "0,1", "--grid", "2:0.5",
            "--train-samples", "16", "--epochs", "1", "--batch-size", "8", "--valid-users", "4", "--test-users", "8",
            "--beams", "3", "--snapshot-every", "1", "--curve-seeds", "0", "--curve-users", "4",
            "--attribution-users", "2", "--bootstrap", "200", "--docs", str(tmp / "docs"), "--runs", str(tmp / "runs"),
            "--figures", str(tmp / "figs"), "--results", str(tmp / "docs" / "results.md")]
    return tmp, args


def test_staged_sweep_runs_records_skips_and_reports(sweep, capsys):
    tmp, args = sweep
    docs = tmp / "docs"
    controlled_main(args + ["--max-minutes", "0.001"])               # nothing fits: nothing runs
    assert "does not fit" in capsys.readouterr().out and not (docs / "manifest.json").exists()
    controlled_main(args + ["--only", "pilot:*"])
    for s in ("s0", "s0.3"):
        gate = json.loads((docs / s / "gate.json").read_text())
        sft = json.loads((docs / s / "sft-seed0" / "measures.json").read_text())
        assert gate["sft_swap_top1_changed"] == sft["reliance"]["swap"]["top1_changed"]
        assert gate["passed"] == (gate["sft_swap_top1_changed"] > 0.3
                                  and gate["sft_relative_E[NDCG@10]"] > gate["base_relative_E[NDCG@10]"])
        assert sft["curve"]["steps"] == [0, 1, 2] and len(sft["curve"]["top1_generic_share"]) == 3
    manifest = json.loads((docs / "manifest.json").read_text())
    commands = manifest["pilot:sft-s0.3"]["commands"]
    assert commands[0].startswith("python train.py --dataset controlled --shortcut 0.3 --world-seed 0 --method sft "
                                  "--seed 0") and "--snapshot-every 1" in commands[0]
    assert "experiments.controlled.rules gate" in commands[-1] and len(commands) == 4
    adapter = docs / "s0.3" / "sft-seed0" / "adapter" / "adapter_model.safetensors"
    assert manifest["pilot:sft-s0.3"]["sha256"]["s0.3/sft-seed0/adapter/adapter_model.safetensors"] == sha256(adapter)
    capsys.readouterr()
    controlled_main(args + ["--only", "pilot:*,base:*,train:sft-s0-seed0,measure:sft-s0-seed0"])   # the pilot did them
    assert capsys.readouterr().out.count("done, skipped") == 6
    assert json.loads((docs / "manifest.json").read_text()) == manifest
    controlled_main(args + ["--only", "select:s0.3*,train:sft-*-seed1,measure:sft-*-seed1,train:gdrt-s0.3-seed0,"
                                      "measure:gdrt-s0.3-seed0,report"])
    assert json.loads((docs / "s0.3" / "chosen.json").read_text())["groups"] == 2
    manifest = json.loads((docs / "manifest.json").read_text())
    assert "--method gdrt --seed 0" in manifest["train:gdrt-s0.3-seed0"]["commands"][0]
    assert "--groups 2 --tau 0.5" in manifest["train:gdrt-s0.3-seed0"]["commands"][0]   # chosen.json's
    assert "--no-test" in manifest["select:s0.3-G2-tau0.5"]["commands"][0]
    assert not (docs / "s0.3" / "sft-seed1" / "adapter").exists()             # seed 0's adapters only
    assert "prompt_ids" not in (docs / "s0.3" / "sft-seed1" / "test_predictions.jsonl").read_text()
    check_measures_against_the_world(docs / "s0.3" / "sft-seed1", 0.3, seed=1)
    text = (docs / "results.md").read_text()
    d = [json.loads((docs / "s0.3" / f"sft-seed{k}" / "measures.json").read_text())["excess"]
         - json.loads((docs / "s0" / f"sft-seed{k}" / "measures.json").read_text())["excess"] for k in (0, 1)]
    assert f"| P1. SFT learns the shortcut: excess_SFT(s=0.3) - excess_SFT(s=0) | {np.mean(d):+.3f}" in text
    assert "| P2. GDRT removes it" in text and "not resolved (runs missing)" in text   # one GDRT seed
    assert "Pilot gate at s = 0.3" in text and "### s = 0.3" in text and "train:gdrt-s0.3-seed0" in text
    assert "S1, do the measures agree (5 trained runs" in text
    assert (tmp / "figs" / "excess_over_the_oracle.png").stat().st_size > 1000
    assert (tmp / "figs" / "top1_generic_over_steps.png").stat().st_size > 1000
    capsys.readouterr()
    controlled_main(args + ["--list", "--only", "train:control-s0.3-*"])
    assert "todo  train   train:control-s0.3-seed0" in capsys.readouterr().out


def check_measures_against_the_world(folder, s, seed):
    """measures.json's accuracy and shortcut numbers against the world's own functions on the
    committed predictions."""
    world = controlled.generate(ControlledConfig(seed=0, shortcut=s))
    ds = load_dataset("controlled", controlled=world.config, test_samples=8, seed=seed)
    by_row = {x.row: x for x in ds.test}
    records = [json.loads(x) for x in (folder / "test_predictions.jsonl").read_text().splitlines()]
    users, ranked = [by_row[r["row"]] for r in records], [r["topk_item_ids"] for r in records]
    m = json.loads((folder / "measures.json").read_text())
    oracle = controlled.expected_accuracy(world, users, controlled.oracle_topk(world, users))
    assert m["expected"] == pytest.approx(controlled.expected_accuracy(world, users, ranked))
    assert m["relative"]["E[NDCG@10]"] == pytest.approx(m["expected"]["NDCG@10"] / oracle["NDCG@10"])
    share = np.mean([items[0] in world.generic for items in ranked])
    oracle_share = np.mean([items[0] in world.generic for items in controlled.oracle_topk(world, users)])
    assert m["excess"] == pytest.approx(share - oracle_share)
