"""nanogdrt.analysis.compare: docs/results.md's GDRT - SFT lines reproduced from the committed
predictions (real Toy data), its refusals on tiny made-up files, and its resampled beyond-accuracy
table's point (every weight 1) against nanogdrt.metrics.evaluate."""

import json

import numpy as np
import pytest

from nanogdrt import metrics, synthetic
from nanogdrt.analysis.compare import AtK, main
from nanogdrt.data import load_dataset

from conftest import ROOT


def write_run(folder, records, dataset=None):
    """A made-up run folder: test_predictions.jsonl, and results.json naming `dataset` if given."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if dataset:
        (folder / "results.json").write_text(json.dumps({"dataset": {"name": dataset}, "config": {}}))
    return str(folder)


def rec(row, target, items):
    return {"row": row, "target_item_id": target, "topk_item_ids": items}


def test_reproduces_the_results_md_lines(toy_dir, capsys):
    """The same statistics, seed and resamples as experiments/repro/report.py: the GDRT - SFT row of
    the main table and the GDRT beats SFT verdict line match docs/results.md character for character."""
    docs = ROOT / "docs" / "repro"
    main([str(docs / "sft-s0" / "test_predictions.jsonl"), str(docs / "gdrt-G5-tau0.5-s0" / "test_predictions.jsonl"),
          "--names", "SFT", "GDRT", "--dataset", "toy", "--data-dir", str(toy_dir),
          "--item-groups", str(docs / "item_groups.json"), "--paper"])
    out = capsys.readouterr().out.splitlines()
    results = (ROOT / "docs" / "results.md").read_text().splitlines()
    for start in ("| GDRT - SFT | paired | ", "| GDRT beats SFT | "):
        ours = next(line for line in out if line.startswith(start))
        assert ours in results, ours
    paper = next(line for line in out if line.startswith("| SFT | 1000 |"))
    assert paper.endswith("| NDCG@10 0.0158, DGU@5 0.612 |")


def test_refuses_different_test_users(tmp_path):
    a = write_run(tmp_path / "a", [rec(0, 5, [1, 2]), rec(1, 6, [2, 3])])
    b = write_run(tmp_path / "b", [rec(1, 6, [2, 3]), rec(2, 7, [3, 4])])     # neither holds the other's users
    with pytest.raises(SystemExit, match="different test users"):
        main([a, b, "--dataset", "synthetic"])


def test_refuses_other_datasets_and_targets(tmp_path):
    a = write_run(tmp_path / "a", [rec(0, 5, [1, 2])], dataset="toy")
    b = write_run(tmp_path / "b", [rec(0, 5, [1, 2])], dataset="book")
    with pytest.raises(SystemExit, match="different datasets"):
        main([a, b])
    c = write_run(tmp_path / "c", [rec(0, 9, [1, 2])], dataset="toy")      # same row, another target
    with pytest.raises(SystemExit, match="different datasets or splits"):
        main([a, c])
    d = write_run(tmp_path / "d", [rec(0, 5, [1, 2]), rec(0, 5, [1, 2])])
    with pytest.raises(SystemExit, match="appears twice"):
        main([a, d])


def test_refuses_predictions_of_another_split(tmp_path):
    """Both runs agree on a row's target, but the dataset's split holds another one there."""
    x = load_dataset("synthetic", synthetic=synthetic.SMALL).test[0]
    a = write_run(tmp_path / "a", [rec(x.row, x.target + 1, [x.target])])
    b = write_run(tmp_path / "b", [rec(x.row, x.target + 1, [x.target])])
    with pytest.raises(SystemExit, match="another dataset or split"):
        main([a, b, "--dataset", "synthetic", "--synthetic-size", "small"])


def test_end_to_end_on_nested_users(tmp_path, capsys):
    """Runs on the first 30 and the first 60 users of one draw compare on their 30 common users."""
    ds = load_dataset("synthetic", synthetic=synthetic.SMALL)
    rng = np.random.default_rng(0)
    items = sorted(ds.titles)
    lists = [[x.target] * (i % 3 == 0) + [int(i) for i in rng.choice(items, 9, replace=False) if i != x.target][:9]
             for i, x in enumerate(ds.test[:60])]
    a = write_run(tmp_path / "a", [rec(x.row, x.target, l) for x, l in zip(ds.test[:60], lists)])
    b = write_run(tmp_path / "b", [rec(x.row, x.target, l[::-1]) for x, l in zip(ds.test[:30], lists)])
    main([a, b, "--dataset", "synthetic", "--synthetic-size", "small", "--bootstrap", "50", "--k", "1", "5"])
    out = capsys.readouterr().out
    assert "| a | 60 |" in out and "| b | 30 |" in out and "| b - a | paired |" in out and "| b beats a |" in out
    assert "MGU@5" not in out.split("## At each")[0]            # no --item-groups: no fairness columns
    assert "### @1" in out and "### @5" in out
    with pytest.raises(SystemExit, match="--k 20"):                # lists of 10 cannot give @20
        main([a, b, "--dataset", "synthetic", "--synthetic-size", "small", "--k", "20"])


def test_resample_point_is_evaluate():
    """AtK's row of all-one weights is metrics.evaluate's value, for every metric at every cut-off."""
    rng = np.random.default_rng(1)
    ranked = [[int(i) for i in rng.choice(50, int(rng.integers(0, 8)), replace=False)] for _ in range(40)]
    targets = [int(t) for t in rng.integers(0, 50, 40)]
    popularity = {int(i): int(c) for i, c in enumerate(rng.integers(0, 6, 50))}
    records = [rec(u, t, r) for u, (t, r) in enumerate(zip(targets, ranked))]
    ks = (1, 3, 5)
    at = AtK(records, targets, None, ks, popularity, n_items=60).table(np.ones((1, 40)))
    ref = metrics.evaluate(ranked, targets, [[]] * 40, ks=ks, popularity=popularity, n_items=60)
    assert set(at) == set(ref)
    for k, v in ref.items():
        assert at[k][0] == pytest.approx(v, abs=1e-12), k
