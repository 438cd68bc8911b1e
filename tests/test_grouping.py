"""grouping.py against references: brute force and scikit-learn (k-means), np.array_split (equal sizes)."""

import itertools
import sys

import numpy as np
import pytest

from nanogdrt.grouping import N_ITEM_GROUPS, group_values, item_groups, quantile_groups, token_groups


# ----------------------------------------------------------------------------- grouping

def sse(values, groups):
    values, groups = np.asarray(values, float), np.asarray(groups)
    return sum(((values[groups == g] - values[groups == g].mean()) ** 2).sum() for g in np.unique(groups))


def brute_force_sse(values, k):
    """Optimal 1-D k-means clusters are contiguous in sorted order: try every set of cut points."""
    u, counts = np.unique(values, return_counts=True)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(u)), k - 1):
        labels = np.searchsorted(np.array(cuts), np.arange(len(u)), side="right")
        best = min(best, sse(np.repeat(u, counts), np.repeat(labels, counts)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=rng.integers(4, 11)) * 2, 1)       # rounding makes ties
    for k in range(1, min(4, len(np.unique(values))) + 1):
        groups = group_values(values, k, backend="dp")
        assert sse(values, groups) == pytest.approx(brute_force_sse(values, k), abs=1e-9)


@pytest.mark.parametrize("G", [2, 5, 10])
def test_dp_never_worse_than_sklearn(G):
    rng = np.random.default_rng(G)
    # Log-prob-like values: a heavy cluster near 0, a long tail, plenty of exact ties.
    values = np.concatenate([-rng.exponential(0.3, 3000), -rng.exponential(4.0, 1500),
                             np.repeat(-rng.uniform(0, 12, 50), 20)])
    dp = group_values(values, G, backend="dp")
    sk = group_values(values, G, backend="sklearn")
    assert sse(values, dp) <= sse(values, sk) + 1e-7 * max(1.0, sse(values, sk))
    for groups in (dp, sk):
        assert sorted(np.unique(groups)) == list(range(1, G + 1))
        means = [values[groups == g].mean() for g in range(1, G + 1)]
        assert means == sorted(means, reverse=True)                        # group 1 = highest


def test_ties_stay_together_and_groups_are_ordered():
    values = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 5.0, 9.0])
    for kwargs in ({"backend": "dp"}, {"backend": "sklearn"}, {"method": "quantile"}):
        g = group_values(values, 3, **kwargs)
        for v in np.unique(values):
            assert len(np.unique(g[values == v])) == 1
        assert all(np.diff(g[np.argsort(values)]) <= 0)                   # higher value, lower id


def test_edge_cases():
    # G above the number of distinct values: one group per value, ids 1..m.
    assert group_values([3.0, 1.0, 3.0, 2.0], 10).tolist() == [1, 3, 1, 2]
    # Constant input: a single group.
    assert group_values(np.full(7, -2.5), 5, backend="dp").tolist() == [1] * 7
    assert group_values(np.full(7, -2.5), 5, method="quantile").tolist() == [1] * 7
    # Empty input: empty output.
    assert group_values([], 5).shape == (0,)
    assert [g.tolist() for g in token_groups([], 3)] == []
    with pytest.raises(ValueError):
        group_values([1.0, float("nan")], 2)
    with pytest.raises(ValueError):
        group_values([1.0, 2.0], 0)
    with pytest.raises(ValueError):
        group_values([1.0, 2.0], 2, backend="nope")


def test_quantile_equal_sizes():
    values = np.random.default_rng(0).normal(size=1000)
    g = group_values(values, 5, method="quantile")
    assert np.bincount(g)[1:].tolist() == [200] * 5
    assert values[g == 1].min() > values[g == 2].max()


def test_auto_falls_back_to_dp_without_sklearn(monkeypatch):
    values = np.random.default_rng(1).normal(size=300)
    monkeypatch.setitem(sys.modules, "sklearn", None)                      # import now fails
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    assert np.array_equal(group_values(values, 4), group_values(values, 4, backend="dp"))


def test_dp_handles_many_distinct_values():
    values = np.random.default_rng(2).normal(size=100_000)
    g = group_values(values, 10, backend="dp")
    assert sorted(np.unique(g)) == list(range(1, 11))


def test_item_groups_equal_sizes_highest_first():
    relevance = {i: float(i) for i in range(1, 11)}  # item 10 most relevant
    groups = item_groups(relevance)
    assert groups == {10: 1, 9: 1, 8: 2, 7: 2, 6: 3, 5: 3, 4: 4, 3: 4, 2: 5, 1: 5}
    sizes = np.bincount(list(item_groups({i: 0.0 for i in range(11)}).values()))[1:]
    assert sizes.tolist() == [3, 2, 2, 2, 2]  # sizes differ by at most one
    ties = item_groups({5: 1.0, 3: 1.0, 4: 1.0, 1: 1.0, 2: 1.0})
    assert ties == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # ties broken by item id
    with pytest.raises(ValueError):
        item_groups({1: 0.0}, n_groups=N_ITEM_GROUPS)


@pytest.mark.parametrize("n", [5, 11, 12, 13, 14, 1003])
def test_item_groups_equal_sort_then_array_split(n):
    """The reference: sort by (-relevance, id), cut with np.array_split; ties and any input order."""
    rng = np.random.default_rng(n)
    ids = rng.permutation(10 * n)[:n].tolist()
    scores = np.round(rng.normal(size=n), 1).tolist()                    # rounding makes ties
    relevance = dict(zip(ids, scores))
    order = sorted(relevance, key=lambda i: (-relevance[i], i))
    expected = {order[i]: g for g, chunk in enumerate(np.array_split(np.arange(n), 5), 1) for i in chunk}
    assert item_groups(relevance) == expected


def test_quantile_groups_without_keys_keep_ties_in_the_higher_group():
    values = np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])                    # chunks of 2: ranks 0-1, 2-3, 4-5
    assert quantile_groups(values, 3).tolist() == [1, 1, 1, 1, 3, 3]     # the 2.0 run starts in chunk 1
    assert quantile_groups(values, 3, keys=range(6)).tolist() == [1, 1, 2, 2, 3, 3]
