"""experiments/repro/primary.py: the registered primary family (docs/repro_v3_plan.md) labels its
claims as registered: Holm over all 8 (a missing claim counts with p = 1), TOST only on NDCG@10,
"unstable" when a bootstrap seed changes a label."""

import numpy as np

from experiments.repro import primary
from nanogdrt import inference


def _test(claim, metric, draws=None, margin=None):
    d = None if draws is None else inference.bootstrap_difference(np.asarray(draws), primary.ALPHA, margin)
    return primary.Test(claim, metric, d, "rows")


def _draws(center, spread, B=2000, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([[center], center + spread * rng.standard_normal(B)])


def test_holm_counts_missing_claims_and_tost_labels_only_ndcg():
    strong = _draws(-0.12, 0.01)                 # p = 2 / (B + 1): survives Holm over 8
    tests = [_test("Toy, DGU@5, users", "DGU@5", strong),
             _test("Toy, NDCG@10, users", "NDCG@10", _draws(-0.0005, 0.001), margin=0.004),   # inside the margin
             _test("Toy, NDCG@10, seeds", "NDCG@10", _draws(0.0, 0.01), margin=0.004),        # too wide
             _test("Toy, DGU@5, seeds", "DGU@5", _draws(-0.05, 0.05))]
    tests += [_test(f"Books, {m}, {u}", m) for m in primary.METRICS for u in ("users", "seeds")]
    out = primary.labelled(tests)
    p_strong = tests[0].difference.p
    assert out["Toy, DGU@5, users"] == ("reproduced", min(1.0, 8 * p_strong))   # m = 8 although 4 are missing
    assert out["Toy, NDCG@10, users"][0] == "smaller than the paper's effect"
    assert out["Toy, NDCG@10, seeds"][0] == "underpowered"
    assert out["Toy, DGU@5, seeds"][0] == "not resolved"                       # no margin registered for DGU
    assert out["Books, DGU@5, users"] == ("not run yet", 1.0)


def test_a_rejection_the_other_way_is_contradicted_and_margin_needs_a_level():
    out = primary.labelled([_test("Toy, DGU@5, users", "DGU@5", _draws(+0.2, 0.01))])
    assert out["Toy, DGU@5, users"][0] == "contradicted"
    assert primary.tost_margin("NDCG@10", [0.01, 0.02]) == primary.RELATIVE_MARGIN * 0.015
    assert primary.tost_margin("NDCG@10", [0.0]) is None and primary.tost_margin("DGU@5", [0.3]) is None
    assert abs(primary.RELATIVE_MARGIN - (0.0203 / 0.0158 - 1)) < 1e-12


def test_a_label_that_changes_with_the_bootstrap_seed_is_unstable(monkeypatch):
    def family(datasets, boot_seed, B):     # an edge on the threshold: the seed decides the label
        center = -0.02 if boot_seed % 2 else -0.0001
        return [_test("Toy, DGU@5, users", "DGU@5", _draws(center, 0.001, seed=boot_seed))]
    monkeypatch.setattr(primary, "family", family)
    (row,) = primary.verdicts({"Toy": None})
    assert row["label"].startswith("unstable (") and "reproduced" in row["label"]
