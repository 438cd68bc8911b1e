"""Splitting relevance scores into groups: G token groups (§3.2) and the item groups of the metrics.

Token groups. All target tokens of the training set are split by their Eq. 3 relevance
(`nanogdrt.relevance`) into G groups with 1-D k-means, group 1 = highest relevance. scikit-learn's
KMeans is used when importable; otherwise an exact dynamic programme (optimal within-cluster sum
of squares) with the divide-and-conquer speed-up of Grønlund et al. 2017, vectorised over each
recursion level. `quantile` gives equal-size groups instead (the paper's footnote 2).

Item groups. The fairness metrics MGU/DGU (§4.1.4) cut the catalogue into N_ITEM_GROUPS = 5
equal-size groups by Eq. 2 item relevance, group 1 = most relevant (`item_groups`). IFairLRS's
popularity groups (Reweight's, and a grouping GDRT never saw) cut it by training-target counts
(`popularity_groups`).

Both equal-size splits are one function, `quantile_groups`: rank r (0 = highest value) goes to
chunk r of `np.array_split` (sizes differ by at most one, the larger groups first).
"""

from collections import Counter
from typing import Sequence

import numpy as np
import torch

N_ITEM_GROUPS = 5   # item groups of MGU/DGU and of the group-distribution figures (Fig. 3/4/8/9)


# ----------------------------------------------------------------------------- equal sizes

def quantile_groups(values, n_groups: int, keys=None) -> np.ndarray:
    """Equal-size groups 1..G by rank, group 1 = highest values -> int64 array shaped like `values`.

    Rank r (0 = highest) goes to chunk r of np.array_split(range(n), G): the sizes differ by at
    most one, the larger groups first. Equal values are ranked one of two ways:
      keys given: by key, ascending (item groups pass item ids), so every group has its exact
        size and the result does not depend on the input order;
      keys None: a run of equal values is never split, it goes whole to the group of its highest
        rank; sizes are then equal up to ties, and with long ties a group can be empty.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.size
    starts = np.arange(n_groups) * (n // n_groups) + np.minimum(np.arange(n_groups), n % n_groups)
    if keys is not None:
        order = np.lexsort((np.asarray(keys), -v))       # highest value first, then smallest key
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
    else:
        u, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        rank = (n - np.cumsum(counts))[inverse.reshape(-1)]  # values above -> a tie run's highest rank
    return np.searchsorted(starts, rank, side="right").astype(np.int64).reshape(np.shape(values))


def item_groups(relevance: dict[int, float], n_groups: int = N_ITEM_GROUPS) -> dict[int, int]:
    """Item -> group 1..n_groups by Eq. 2 relevance ({item id: score}), group 1 = highest; equal
    sizes (differ by at most one); ties broken by item id, so the grouping is deterministic."""
    if len(relevance) < n_groups:
        raise ValueError(f"{len(relevance)} items cannot fill {n_groups} groups")
    items = list(relevance)
    groups = quantile_groups([relevance[i] for i in items], n_groups, keys=items)
    return dict(zip(items, groups.tolist()))


# ----------------------------------------------------------------------------- k-means (§3.2)

def popularity_groups(train, catalogue, n_groups: int = N_ITEM_GROUPS) -> dict[int, int]:
    """Popularity groups as IFairLRS (Jiang et al., WWW 2024; the paper's Reweight [30]) builds them,
    group 1 = the most popular items, from the training windows `train` (data.Interaction).

    What IFairLRS does. Its repository (JiangM-C/IFairLRS) ships the MovieLens groups as a file,
    movie_pop_count_5.csv (title -> Pop 0..4), which code/finetune_gen_weight_popularity.py (the
    reweighting: per group, share among training histories / share among training targets) and
    code/evaluate_all_pop.py read; the code that built the file is not in the repository. The paper
    divides items into five groups by their number of interactions. From the file: every movie of
    movies.dat has a label (the code looks a movie up by its line in movies.dat), so items with no
    interaction are in it, obscure ones at 0; 4 is the most popular (Toy Story, Star Wars); and the
    labels read as equal-count quintiles of items (a movie of ~500 ratings, Grumpier Old Men, is in
    group 4, which equal-interaction bins would keep for the ~100 most rated).

    Here, and where we depart:
    - counts: each training window's target counts once for its item (the training-target
      frequency). On the full training split that is one count per interaction, IFairLRS's count,
      for all but a user's first MIN_HISTORY items. Ties are broken by the item's count among the
      same windows' histories (as Reweight counts them: once per window it appears in), then kept
      together: a Toy training file is a sample (5,000 windows) on which 72% of the items are never
      a target, and cutting that tie by item id would make the groups partly arbitrary.
    - boundaries: equal-size groups by rank (grouping.quantile_groups: sizes differ by at most one)
      up to ties: a run of equal (target, history) counts is never split and goes whole to the group
      of its most popular rank. Items never seen in training are one such run: the least popular.
    - labels: group 1 = most popular (IFairLRS's 4), mirroring Eq. 2's group 1 = the items a
      biased model over-recommends.
    Independent of the base model: counts of the training data only (the fairness check of
    nanogdrt/analysis/regroup.py and Reweight's `--reweight-groups popularity`)."""
    target, history = Counter(x.target for x in train), Counter(i for x in train for i in x.history)
    items = sorted(catalogue)
    scale = max(history.values(), default=0) + 1               # (target, history) as one exact number
    value = np.array([target[i] * scale + history[i] for i in items], dtype=np.float64)
    groups = quantile_groups(value, n_groups)
    filled = len(set(groups.tolist()))
    if filled < n_groups:
        raise ValueError(f"popularity: the training counts of {len(train)} windows fill only {filled} of "
                         f"{n_groups} groups (ties kept together); give a larger training file")
    return dict(zip(items, groups.tolist()))


def _kmeans_dp(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Exact weighted 1-D k-means of sorted distinct x (m >= k) -> cluster index 0..k-1 per value.

    D[c][j] = min SSE of x[0..j] in c+1 clusters = min_i D[c-1][i-1] + cost(i, j). The leftmost
    best split i*(j) is non-decreasing in j (the SSE cost is Monge), so each row is computed by
    divide and conquer: solve the middle j, then the left half searches only i <= i*(mid) and
    the right half i >= i*(mid). One numpy pass per recursion level: O(k m log m) in all."""
    m = len(x)
    x = x - np.average(x, weights=w)                   # centring keeps the prefix sums small
    P0, P1, P2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, w * x, w * x * x))

    def cost(i, j):                                    # SSE of x[i..j] (inclusive), vectorised
        n, s = P0[j + 1] - P0[i], P1[j + 1] - P1[i]
        return np.maximum(P2[j + 1] - P2[i] - s * s / n, 0.0)

    D_prev = cost(np.zeros(m, dtype=np.int64), np.arange(m))
    start = np.zeros((k, m), dtype=np.int64)           # start[c, j]: first index of cluster c
    for c in range(1, k):
        D = np.full(m, np.inf)
        # Pending (j range, split range) tasks; j >= c so every cluster is non-empty.
        jlo, jhi, olo, ohi = (np.array([v]) for v in (c, m - 1, c, m - 1))
        while jlo.size:
            mid = (jlo + jhi) // 2
            hi = np.minimum(ohi, mid)
            n = hi - olo + 1                                                 # candidates per task
            offs = np.concatenate([[0], np.cumsum(n)[:-1]])
            seg = np.repeat(np.arange(mid.size), n)
            i = olo[seg] + np.arange(n.sum()) - offs[seg]                    # all candidate splits
            val = D_prev[i - 1] + cost(i, mid[seg])
            best = np.minimum.reduceat(val, offs)
            opt = np.minimum.reduceat(np.where(val <= best[seg], i, m), offs)  # leftmost argmin
            D[mid], start[c, mid] = best, opt
            left, right = jlo < mid, mid < jhi
            jlo, jhi, olo, ohi = (np.concatenate([jlo[left], mid[right] + 1]),
                                  np.concatenate([mid[left] - 1, jhi[right]]),
                                  np.concatenate([olo[left], opt[right]]),
                                  np.concatenate([opt[left], ohi[right]]))
        D_prev = D
    bounds, j = [], m - 1                              # backtrack the cluster starts
    for c in range(k - 1, 0, -1):
        bounds.append(start[c, j])
        j = start[c, j] - 1
    return np.searchsorted(np.array(bounds[::-1]), np.arange(m), side="right")


def _kmeans_sklearn(x: np.ndarray, w: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn KMeans on the distinct values, weighted by multiplicity -> 0..k'-1 ascending."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x[:, None], sample_weight=w)
    used = np.unique(km.labels_)                       # a cluster may come out empty
    rank = np.empty(k, dtype=np.int64)
    rank[used[np.argsort(km.cluster_centers_[used, 0])]] = np.arange(used.size)
    return rank[km.labels_]


def group_values(values, n_groups: int, method: str = "kmeans", backend: str = "auto",
                 seed: int = 0) -> np.ndarray:
    """Split 1-D values (e.g. Eq. 3 token relevance) into groups 1..G, group 1 = highest values.

    method "kmeans": 1-D k-means; backend "sklearn" (KMeans, n_init=10, random_state=seed),
      "dp" (exact optimum, no dependency) or "auto" (sklearn if importable, else dp).
      With m < G distinct values each value is its own group: ids 1..m, groups m+1..G empty.
    method "quantile": equal-size groups by rank (footnote 2, `quantile_groups`); a run of equal
      values that would straddle a group boundary goes whole to the higher group, so sizes are
      equal up to ties and a group can be empty when ties are long.
    Always: equal values share a group; empty input -> empty array; non-finite values raise.
    Returns an int64 numpy array shaped like `values`.
    """
    v = np.asarray(values, dtype=np.float64)
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if v.size and not np.isfinite(v).all():
        raise ValueError("values contain NaN or infinity")
    if v.size == 0:
        return np.zeros(v.shape, dtype=np.int64)
    if backend not in ("auto", "sklearn", "dp"):
        raise ValueError(f"unknown backend {backend!r} (auto, sklearn, dp)")
    if method == "quantile":
        return quantile_groups(v, n_groups)
    if method != "kmeans":
        raise ValueError(f"unknown method {method!r} (kmeans, quantile)")
    # k-means runs on the distinct values weighted by their counts: a title's tokens recur in
    # every example that targets it, so there are far fewer distinct values than tokens.
    u, inverse, counts = np.unique(v.reshape(-1), return_inverse=True, return_counts=True)
    k = min(n_groups, u.size)
    if k == u.size:
        cluster = np.arange(k)                         # every distinct value is its own cluster
    elif backend == "auto":
        try:
            cluster = _kmeans_sklearn(u, counts, k, seed)
        except ImportError:
            cluster = _kmeans_dp(u, counts.astype(np.float64), k)
    elif backend == "sklearn":
        cluster = _kmeans_sklearn(u, counts, k, seed)
    else:
        cluster = _kmeans_dp(u, counts.astype(np.float64), k)
    group_of_unique = cluster.max() - cluster + 1      # ascending clusters -> group 1 = highest
    return group_of_unique[inverse].reshape(v.shape).astype(np.int64)


def token_groups(token_values: Sequence[torch.Tensor], n_groups: int, **kwargs) -> list[torch.Tensor]:
    """Group the target tokens of all training examples together (every occurrence counts) and
    return one LongTensor of group ids per example, aligned with its target tokens.
    G greater than the number of distinct values raises ValueError giving both numbers."""
    lengths = [len(t) for t in token_values]
    flat = np.concatenate([t.float().numpy() for t in token_values]) if token_values else np.zeros(0)
    distinct = np.unique(flat).size
    if flat.size and distinct < n_groups:
        # More groups than distinct values would leave groups empty: their L(g) undefined and their
        # logged mean relevance NaN. Refused rather than silently reduced, so G is what was asked.
        raise ValueError(f"--groups {n_groups}: the training targets have only {distinct} distinct token "
                         f"relevance values, so at most {distinct} groups can be non-empty; choose "
                         f"--groups <= {distinct}")
    groups = torch.from_numpy(group_values(flat, n_groups, **kwargs))
    return list(torch.split(groups, lengths))
