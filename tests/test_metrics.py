"""Metrics against hand-computed cases, NDCG against scikit-learn's ndcg_score, and the Gini index
against its mean-absolute-difference definition (brute force over all pairs)."""

import math
import random

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from nanogdrt.metrics import (evaluate, exposure, gini_index, group_distribution, group_unfairness, head_items,
                              per_user_metrics, popularity_terms, target_ranks)

# four users: target at rank 0, rank 4, rank 7, and absent
RANKED = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
          [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
          [21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
          [31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
TARGETS = [1, 15, 28, 99]


def test_ranks_hr_ndcg_by_hand():
    assert target_ranks(RANKED, TARGETS) == [0, 4, 7, None]
    m5 = per_user_metrics(RANKED, TARGETS, 5)
    np.testing.assert_allclose(m5["hit"], [1, 1, 0, 0])
    np.testing.assert_allclose(m5["ndcg"], [1, 1 / math.log2(6), 0, 0])
    out = evaluate(RANKED, TARGETS, histories=[[]] * 4)
    # HR@5 = 2/4; NDCG@5 = (1 + 1/log2(6)) / 4; HR@10 = 3/4; NDCG@10 adds 1/log2(9)
    assert out["HR@5"] == pytest.approx(0.5)
    assert out["NDCG@5"] == pytest.approx((1 + 0.3868528) / 4, abs=1e-7)
    assert out["HR@10"] == pytest.approx(0.75)
    assert out["NDCG@10"] == pytest.approx((1 + 0.3868528 + 0.3154649) / 4, abs=1e-7)
    assert set(out) == {"NDCG@5", "HR@5", "NDCG@10", "HR@10"}  # no groups given: no MGU/DGU
    assert all(isinstance(v, float) for v in out.values())


def test_shared_titles_count_as_the_target():
    titles = {1: "Uno", 2: "Jenga", 3: "Uno"}
    assert target_ranks([[2, 3]], [1]) == [None]
    assert target_ranks([[2, 3]], [1], titles=titles) == [1]
    assert evaluate([[2, 3]], [1], [[]], titles=titles, ks=(1, 2)) == {
        "NDCG@1": 0.0, "HR@1": 0.0, "NDCG@2": pytest.approx(1 / math.log2(3)), "HR@2": 1.0}


def test_ndcg_matches_sklearn():
    # one relevant item per user: scikit-learn's NDCG@k on scores that rank our list first
    rng = random.Random(0)
    ranked, targets = [], []
    for _ in range(50):
        items = rng.sample(range(100), 20)
        ranked.append(items)
        targets.append(rng.choice(items) if rng.random() < 0.8 else 100)
    for k in (5, 10):
        ours = per_user_metrics(ranked, targets, k)["ndcg"]
        for items, target, value in zip(ranked, targets, ours):
            y_true = np.zeros((1, 101))
            y_true[0, target] = 1
            y_score = np.full((1, 101), -1.0)  # unlisted items below every listed one
            y_score[0, items] = np.arange(len(items), 0, -1)
            if target == 100:
                y_score[0, 100] = -2.0  # the absent target last: ndcg 0 at k <= 20
            assert value == pytest.approx(ndcg_score(y_true, y_score, k=k), abs=1e-12)


def test_mgu_dgu_by_hand():
    item_group = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 1}
    ranked = [[1, 6, 3], [1, 2, 99]]   # 99 has no group: ignored
    histories = [[3, 4], [5, 1, 99]]
    # top-2 groups: 1, 1, 1, 2 -> GP = [.75, .25, 0, 0, 0]; history groups 3, 4, 5, 1 -> GH = [.25, 0, .25, .25, .25]
    # GP - GH = [.5, .25, -.25, -.25, -.25] -> MGU = 1.5 / 5 = .3, DGU = .5 - (-.25) = .75
    assert group_unfairness(ranked, histories, item_group, k=2) == pytest.approx((0.3, 0.75))
    # top-1: groups 1, 1 -> GP = [1, 0, 0, 0, 0]; GP - GH = [.75, 0, -.25, -.25, -.25]
    assert group_unfairness(ranked, histories, item_group, k=1) == pytest.approx((0.3, 1.0))
    out = evaluate(ranked, [1, 2], histories, item_group=item_group, ks=(1, 2))
    assert out["MGU@2"] == pytest.approx(0.3) and out["DGU@1"] == pytest.approx(1.0)
    # recommendations that mirror the histories are perfectly fair
    assert group_unfairness([[3, 4], [5, 1]], histories, item_group, k=2) == pytest.approx((0.0, 0.0))


def test_group_distribution():
    item_group = {1: 1, 2: 2, 3: 2, 4: 5}
    np.testing.assert_allclose(group_distribution([1, 2, 3, 4, 7], item_group), [0.25, 0.5, 0, 0, 0.25])
    np.testing.assert_allclose(group_distribution([], item_group), np.zeros(5))
    top1 = group_distribution([r[0] for r in [[1, 2], [3], [3, 1]]], item_group, n_groups=5)
    np.testing.assert_allclose(top1, [1 / 3, 2 / 3, 0, 0, 0])


def test_bad_input():
    with pytest.raises(ValueError):
        evaluate([[1]], [1, 2], [[]])
    with pytest.raises(ValueError):
        per_user_metrics([[1]], [1], k=0)


# ----------------------------------------------------------------------------- beyond accuracy

def test_default_output_is_todays_dict():
    """With today's arguments evaluate returns today's keys in today's order (docs/results.md and
    results.json regenerate from it); the new metrics come only after them, only when asked for."""
    item_group = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 1}
    ranked, histories = [[1, 6, 3], [1, 2, 99]], [[3, 4], [5, 1, 99]]
    today = evaluate(ranked, [1, 2], histories, item_group=item_group)
    assert list(today) == ["NDCG@5", "HR@5", "NDCG@10", "HR@10", "MGU@5", "DGU@5", "MGU@10", "DGU@10"]
    more = evaluate(ranked, [1, 2], histories, item_group=item_group, popularity={1: 3, 2: 1}, n_items=100)
    assert list(more)[:8] == list(today) and [more[k] for k in today] == list(today.values())
    assert list(more)[8:] == ["Coverage@5", "Gini@5", "ARP@5", "Tail@5", "Coverage@10", "Gini@10", "ARP@10", "Tail@10"]


def test_coverage_and_gini_by_hand():
    # three users' top-2 lists show item 1 three times, item 2 twice, item 3 once
    ranked = [[1, 2, 3], [1, 2], [1, 3]]
    assert exposure(ranked, 2) == {1: 3, 2: 2, 3: 1}
    out = evaluate(ranked, [0, 0, 0], [[]] * 3, ks=(1, 2), n_items=6)
    # top-1: only item 1 -> coverage 1/6; exposure over 6 items sorted: 0,0,0,0,0,3 -> Gini (2*6-7)*3 / (6*3) = 5/6
    assert out["Coverage@1"] == pytest.approx(1 / 6) and out["Gini@1"] == pytest.approx(5 / 6)
    # top-2: items 1, 2, 3 -> 3/6; sorted 0,0,0,1,2,3 at positions 4,5,6: (1*1 + 3*2 + 5*3) / (6*6) = 22/36
    assert out["Coverage@2"] == pytest.approx(0.5) and out["Gini@2"] == pytest.approx(22 / 36)


def test_gini_matches_mean_absolute_difference():
    # the Gini index's other definition: sum_ij |x_i - x_j| / (2 n^2 mean), zeros of the unshown items included
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_items = int(rng.integers(5, 30))
        counts = rng.integers(0, 6, size=int(rng.integers(1, n_items + 1))).astype(float)
        x = np.concatenate([counts, np.zeros(n_items - len(counts))])
        ref = np.abs(x[:, None] - x[None, :]).sum() / (2 * n_items ** 2 * x.mean()) if x.sum() else 0.0
        assert gini_index(counts, n_items) == pytest.approx(ref, abs=1e-12)
    assert gini_index([2, 2, 2], 3) == pytest.approx(0.0)               # equal exposure
    assert gini_index([7], 4) == pytest.approx(3 / 4)                   # one item takes all: (n - 1) / n
    np.testing.assert_allclose(gini_index([[1, 1], [2, 0]], 2), [0.0, 0.5])   # a batch, row by row
    with pytest.raises(ValueError):
        gini_index([1, 1, 1], 2)


def test_head_tail_and_arp_by_hand():
    # ten trained items, counts 9, 5, 5, 3, 1 x 6: the top 20% of 10 is 2 items, the 2nd has 5, and item 3
    # ties it, so the head is {1, 2, 3}; item 99 was never a training target: tail
    popularity = {1: 9, 2: 5, 3: 5, 4: 3, **{i: 1 for i in range(5, 11)}, 11: 0}
    assert head_items(popularity) == {1, 2, 3}
    assert head_items({}) == set() and head_items({1: 4}) == {1}
    ranked = [[1, 4], [99, 2], []]                      # the empty list is left out of both means
    t = popularity_terms(ranked, 2, popularity)
    np.testing.assert_allclose(t["arp"], [(9 + 3) / 2, (0 + 5) / 2, 0])
    np.testing.assert_allclose(t["tail"], [0.5, 0.5, 0])
    np.testing.assert_allclose(t["listed"], [1, 1, 0])
    out = evaluate(ranked, [0, 0, 0], [[]] * 3, ks=(1, 2), popularity=popularity)
    assert out["ARP@1"] == pytest.approx((9 + 0) / 2) and out["Tail@1"] == pytest.approx(0.5)
    assert out["ARP@2"] == pytest.approx((6 + 2.5) / 2) and out["Tail@2"] == pytest.approx(0.5)
    assert "Coverage@1" not in out                      # no n_items: no catalogue metrics
