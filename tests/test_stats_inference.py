"""nanogdrt/inference.py against independent references: scipy's t distribution and t tests, Holm by
closed testing over every subset (its definition) and by the step-down rule, the bootstrap p-value
against a search for the smallest alpha whose percentile interval excludes 0, and stats.paired's
resamples one for one."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats

from nanogdrt import inference as inf
from nanogdrt import stats


def _users(n, hit_rate, seed):
    rng = np.random.default_rng(seed)
    records, by_row = [], {}
    for u in range(n):
        items = [int(x) for x in rng.choice(50, 10, replace=False)]
        target = items[int(rng.integers(0, 10))] if rng.random() < hit_rate else 99
        by_row[u] = SimpleNamespace(row=u, target=target, history=[int(x) for x in rng.choice(50, 4)])
        records.append({"row": u, "topk_item_ids": items})
    return stats.Users(records, by_row, {i: f"item {i}" for i in range(100)}, {i: 1 + i % 5 for i in range(100)})


# --- Student's t ---

@pytest.mark.parametrize("df", [1, 2, 2.5, 3.7, 9, 30, 1000])
def test_t_distribution_matches_scipy(df):
    for t in [-40, -3, -1.2, 0, 0.2, 1.96, 4, 25, 1e4]:
        assert inf.t_sf(t, df) == pytest.approx(scipy.stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    for q in [0.01, 0.2, 0.5, 0.8, 0.95, 0.975, 0.995, 0.99995]:
        assert inf.t_ppf(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


# --- Holm ---

def test_holm_hand_computed():
    # sorted: d .005, a .01, c .03, b .04; m = 4: 4*.005 = .02, 3*.01 = .03, 2*.03 = .06, max(.06, 1*.04) = .06
    h = inf.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}, alpha=0.05)
    assert list(h.adjusted) == ["a", "b", "c", "d"]                      # the input's order
    assert h.adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert h.reject == {"a": True, "b": False, "c": False, "d": True}
    assert inf.holm({"x": 0.5, "y": 0.6}).adjusted == {"x": 1.0, "y": 1.0}   # capped at 1
    with pytest.raises(ValueError, match="'y'"):
        inf.holm({"x": 0.1, "y": math.nan})


def _holm_by_closed_testing(p: dict, alpha):
    """Holm's definition: the closed test of Bonferroni tests (Marcus, Peritz & Gabriel 1976). H_i is
    rejected when every intersection S holding i is, |S| min_{j in S} p_j <= alpha; its adjusted p is
    the largest of those over S."""
    names = list(p)
    adjusted = {i: max(min(1.0, len(S) * min(p[j] for j in S))
                       for r in range(1, len(names) + 1) for S in itertools.combinations(names, r) if i in S)
                for i in names}
    return adjusted, {i: a <= alpha for i, a in adjusted.items()}


def _holm_step_down(p: dict, alpha):
    """The step-down procedure as Holm (1979) states it: reject the smallest p while p_(i) <= alpha/(m-i+1)."""
    reject, m = {i: False for i in p}, len(p)
    for i, name in enumerate(sorted(p, key=p.get)):
        if p[name] > alpha / (m - i):
            break
        reject[name] = True
    return reject


def test_holm_against_closed_testing_and_step_down_on_random_families():
    rng = np.random.default_rng(0)
    for trial in range(300):
        m = int(rng.integers(1, 8))
        raw = rng.uniform(0, 0.2, m) if trial % 2 else rng.beta(0.3, 1.0, m)
        if trial % 3 == 0:
            raw = np.round(raw, 2)                                      # ties
        p = {f"h{i}": float(x) for i, x in enumerate(raw)}
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        h = inf.holm(p, alpha)
        adjusted, reject = _holm_by_closed_testing(p, alpha)
        assert h.adjusted == pytest.approx(adjusted, abs=1e-15) and h.reject == reject
        assert h.reject == _holm_step_down(p, alpha)
        order = sorted(p, key=p.get)                                     # monotone, >= raw, <= 1
        assert all(h.adjusted[a] <= h.adjusted[b] for a, b in zip(order, order[1:]))
        assert all(p[k] <= h.adjusted[k] <= 1 for k in p)


def test_resamples_for_holm_is_the_fewest_that_let_a_family_pass():
    for m in (1, 6, 22, 30):
        B = inf.resamples_for_holm(m)
        strongest = lambda B: inf.bootstrap_difference(np.ones(B + 1)).p    # noqa: E731  every resample > 0
        assert strongest(B) == pytest.approx(2 / (B + 1))
        assert all(inf.holm({str(i): strongest(B) for i in range(m)}).reject.values())
        assert not any(inf.holm({str(i): strongest(B - 1) for i in range(m)}).reject.values())
    assert inf.resamples_for_holm(30) == 1199                           # 2 * 30 / 0.05 - 1


# --- The paired bootstrap's p-value ---

def _smallest_alpha_excluding_0(rest):
    """Bisection on alpha for the percentile interval [q(alpha/2), q(1 - alpha/2)] to exclude 0."""
    excludes = lambda a: np.percentile(rest, 50 * a) > 0 or np.percentile(rest, 100 - 50 * a) < 0   # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lo, hi = (lo, (lo + hi) / 2) if excludes((lo + hi) / 2) else ((lo + hi) / 2, hi)
    return hi


def test_bootstrap_p_is_the_smallest_alpha_whose_interval_excludes_0():
    rng = np.random.default_rng(1)
    for trial in range(60):
        B = int(rng.choice([99, 400, 1000]))
        shift = rng.uniform(-3, 3)
        draws = rng.normal(shift, 1, B + 1)
        if trial % 4 == 0:
            draws = np.round(draws)                                     # ties at 0, as for HR
        d = inf.bootstrap_difference(draws)
        a_star = _smallest_alpha_excluding_0(draws[1:])
        # the +1 rule: p = 2(1 + c)/(B + 1), c the count on the smaller side; the interval's exact
        # crossing depends on numpy's interpolation, within [2(c - 1), 2c]/(B - 1)
        assert a_star - 1e-12 <= d.p <= a_star + 4 / (B - 1) + 1e-12 or (d.p == 1.0 and a_star >= 1 - 4 / (B - 1))
        if d.p <= 0.05:                                                  # p <= alpha => interval excludes 0
            assert d.lo > 0 or d.hi < 0
        for margin in (0.5, 2.0):                                        # TOST p <= alpha => 90% inside
            e = inf.bootstrap_difference(draws, margin=margin)
            if e.p_equivalent <= 0.05:
                assert -margin < e.eq_lo and e.eq_hi < margin
            c_lo, c_hi = (draws[1:] <= -margin).sum(), (draws[1:] >= margin).sum()
            assert e.p_equivalent == pytest.approx((1 + max(c_lo, c_hi)) / (B + 1))
    assert inf.bootstrap_difference(np.zeros(11)).p == 1.0              # identical arms
    with pytest.raises(ValueError, match="draws"):
        inf.bootstrap_difference(np.array([0.1, math.nan, 0.2]))


def test_paired_differences_reuse_stats_paired_resamples():
    a, b = _users(120, 0.5, 0), _users(120, 0.3, 1)
    ref = stats.paired(a, b, 200, 3)
    draws = inf.paired_draws(a, b, 200, 3)
    diffs = inf.paired_differences(a, b, 200, 3, margins={"NDCG@10": 0.05})
    for k in stats.TABLE_KEYS:
        assert stats.interval(draws[k]) == ref[k]                        # bit for bit
        assert diffs[k][:3] == ref[k] and diffs[k].p == inf.bootstrap_difference(draws[k]).p
        assert stats.verdict(diffs[k][:3], k) == stats.verdict(ref[k], k)
    assert not math.isnan(diffs["NDCG@10"].p_equivalent) and math.isnan(diffs["HR@10"].p_equivalent)


# --- Training seeds ---

def test_paired_t_matches_scipy_ttest_rel_and_tost():
    rng = np.random.default_rng(2)
    for n in (2, 3, 5, 12):
        for _ in range(10):
            seed_effect = rng.normal(0, 0.05, n)                        # shared by both arms of a seed
            xs, ys = seed_effect + rng.normal(0.01, 0.01, n), seed_effect + rng.normal(0, 0.01, n)
            for alpha in (0.05, 0.1):
                d = inf.paired_t(xs, ys, alpha=alpha, margin=0.01)
                ref = scipy.stats.ttest_rel(xs, ys)
                ci, ci_eq = ref.confidence_interval(1 - alpha), ref.confidence_interval(1 - 2 * alpha)
                assert d.point == pytest.approx(np.mean(xs - ys), abs=1e-15)
                assert d.p == pytest.approx(ref.pvalue, rel=1e-8)
                assert (d.lo, d.hi, d.eq_lo, d.eq_hi) == pytest.approx((ci.low, ci.high, ci_eq.low, ci_eq.high),
                                                                       rel=1e-9)
                # TOST: the two one-sided tests on the seed differences, by scipy's t distribution
                diff = xs - ys
                t_lower = (diff.mean() + 0.01) / (diff.std(ddof=1) / math.sqrt(n))
                t_upper = (diff.mean() - 0.01) / (diff.std(ddof=1) / math.sqrt(n))
                p_eq = max(scipy.stats.t.sf(t_lower, n - 1), scipy.stats.t.cdf(t_upper, n - 1))
                assert d.p_equivalent == pytest.approx(p_eq, rel=1e-8)
                one_sided = max(scipy.stats.ttest_1samp(diff, -0.01, alternative="greater").pvalue,
                                scipy.stats.ttest_1samp(diff, 0.01, alternative="less").pvalue)
                assert d.p_equivalent == pytest.approx(one_sided, rel=1e-8)
                assert (d.p_equivalent < alpha) == (-0.01 < d.eq_lo and d.eq_hi < 0.01)   # TOST == the interval rule
    with pytest.raises(ValueError, match="one per seed"):
        inf.paired_t([0.1, 0.2, 0.3], [0.1, 0.2])


def test_welch_t_matches_scipy_and_stats_welch_interval():
    rng = np.random.default_rng(3)
    for nx, ny in ((2, 3), (3, 3), (5, 8)):
        xs, ys = rng.normal(0.1, 0.02, nx), rng.normal(0.12, 0.05, ny)
        d = inf.welch_t(xs, ys)
        ref = scipy.stats.ttest_ind(xs, ys, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert d.p == pytest.approx(ref.pvalue, rel=1e-8) and (d.lo, d.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert d[:3] == pytest.approx(stats.welch_interval(xs, ys), rel=1e-9)


def test_pairing_by_seed_removes_the_seed_effect():
    # fixed numbers: the seed moves both arms by 0.1 .. 0.3; within a seed A is ~0.01 above B
    ys = np.array([0.10, 0.20, 0.30])
    xs = ys + np.array([0.011, 0.009, 0.010])
    paired, welch = inf.paired_t(xs, ys), inf.welch_t(xs, ys)
    assert paired.p < 0.01 and paired.lo > 0                          # resolved once the seed cancels
    assert welch.p > 0.5 and welch.lo < 0 < welch.hi                   # drowned by the seed effect


# --- Labels ---

def _diff(point, lo, hi, eq_lo, eq_hi, margin=math.nan, p=0.5, p_eq=math.nan):
    return inf.Difference(point, lo, hi, p, eq_lo, eq_hi, p_eq, margin, 0.05)


def test_label_splits_not_resolved_and_keeps_the_verdict():
    tight = _diff(0.001, -0.002, 0.004, -0.0015, 0.0035, margin=0.005)
    wide = _diff(0.001, -0.02, 0.02, -0.015, 0.015, margin=0.005)
    better = _diff(0.03, 0.01, 0.05, 0.013, 0.047, margin=0.005)
    assert inf.label(tight, "NDCG@10") == "smaller than the margin"
    assert inf.label(wide, "NDCG@10") == "underpowered"
    assert inf.label(tight._replace(margin=math.nan), "NDCG@10") == "underpowered"    # no margin, no equivalence
    assert inf.label(better, "NDCG@10") == stats.verdict(better[:3], "NDCG@10") == "reproduced"
    assert inf.label(better, "DGU@5") == "not reproduced"                             # lower is better
    assert inf.label(better, "NDCG@10", significant=False) == "underpowered"           # lost to Holm
    assert inf.label(tight, "NDCG@10", equivalent=False) == "underpowered"
    rng = np.random.default_rng(4)              # resolved cells: the label is stats.verdict, word for word
    for _ in range(200):
        lo, hi = np.sort(rng.normal(0, 1, 2))
        d, k = _diff((lo + hi) / 2, lo, hi, lo, hi), str(rng.choice(stats.TABLE_KEYS))
        v = stats.verdict(d[:3], k)
        assert inf.label(d, k) == (v if v != inf.NOT_RESOLVED else "underpowered")


def test_labels_apply_holm_to_a_family():
    # three "reproduced" cells uncorrected; Holm: .01 -> .03, .03 -> .06, .04 -> .06: one survives
    family = {name: (_diff(0.02, 0.005, 0.035, 0.007, 0.033, margin=0.05, p=p, p_eq=p_eq), "NDCG@10")
              for name, p, p_eq in (("x", 0.01, 0.2), ("y", 0.03, 0.001), ("z", 0.04, 0.3))}
    out = inf.labels(family)
    assert [out[k].label for k in "xyz"] == ["reproduced", "smaller than the margin", "underpowered"]
    assert out["y"].p_holm == pytest.approx(0.06) and out["y"].p_equivalent_holm == pytest.approx(0.003)
    assert inf.label_cell(family["x"][0], out["x"]) == "reproduced (+0.0200 [+0.0050, +0.0350], p 0.01, Holm 0.03)"
    with pytest.raises(ValueError, match="one alpha"):
        inf.labels({"x": family["x"], "w": (family["z"][0]._replace(alpha=0.1), "NDCG@10")})


def test_labels_on_a_real_paired_bootstrap_and_seed_t_together():
    a, b = _users(200, 0.6, 0), _users(200, 0.2, 1)
    family = {f"A beats B on {k}": (d, k) for k, d in inf.paired_differences(a, b, 600, 0).items()}
    family["over seeds"] = (inf.paired_t([0.31, 0.42, 0.25], [0.30, 0.40, 0.26]), "NDCG@10")
    out = inf.labels(family)
    assert out["A beats B on HR@10"].label == "reproduced"              # hit rate 0.6 against 0.2, 200 users
    assert out["over seeds"].label == "underpowered"
    for k, (d, metric) in family.items():                                 # Holm only ever removes a verdict
        v = stats.verdict(d[:3], metric)
        assert out[k].label in (v, "underpowered", "smaller than the margin")
        assert out[k].p_holm >= d.p


# --- The bootstrap's own randomness ---

def _mean_draws(x):
    return lambda B, seed: stats.weights(len(x), B, seed) @ x / len(x)


def _shifted_so_lo_is(x, target):
    """x shifted so that its 95% lower bootstrap endpoint, at B = 20000, sits at target (a shift of x
    moves every resampled mean by the same amount)."""
    lo = np.percentile(_mean_draws(x)(20000, 99)[1:], 2.5)
    return x - lo + target


def test_seed_stability_flags_an_edge_near_0_and_passes_one_far_from_it():
    x = np.random.default_rng(5).normal(0, 1, 400)
    se = x.std() / math.sqrt(len(x))
    near = inf.seed_stability(_mean_draws(_shifted_so_lo_is(x, 0.0)), "NDCG@10", B=200, seeds=20)
    far = inf.seed_stability(_mean_draws(_shifted_so_lo_is(x, 6 * se)), "NDCG@10", B=200, seeds=5)
    assert set(near.labels) == {"reproduced", "underpowered"} and not near.stable
    assert near.resamples is None or near.resamples > 10 * 200
    assert far.stable and far.labels[0] == "reproduced" and far.resamples == 200
    # with a margin TOST's endpoints count too: a margin right at the binding 90% endpoint is unstable
    centred = x - x.mean()
    edge = float(np.abs(np.percentile(_mean_draws(centred)(20000, 99)[1:], [5, 95])).max())
    on_edge = inf.seed_stability(_mean_draws(centred), "NDCG@10", B=200, seeds=20, margin=edge)
    assert set(on_edge.labels) == {"smaller than the margin", "underpowered"}
    assert on_edge.resamples is None or on_edge.resamples > 10 * 200
    wide = inf.seed_stability(_mean_draws(centred), "NDCG@10", B=200, seeds=5, margin=10 * se)
    assert wide.stable and wide.labels[0] == "smaller than the margin" and wide.resamples == 200
