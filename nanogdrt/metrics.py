"""Evaluation metrics on id lists: NDCG@K, HR@K (accuracy) and MGU@K, DGU@K (group unfairness), §4.1.4.

Everything here takes plain lists of item ids -- one ranked recommendation list per test user, the
targets and the histories -- and never a model.

Accuracy. With `rank` the 0-based position of the target in a user's ranked list,
    HR@K   = share of users with rank < K
    NDCG@K = mean over users of 1 / log2(rank + 2) if rank < K, else 0   (one relevant item: IDCG = 1)
The paper's code generates titles and compares strings, so an item whose title is shared by several
ids (57 titles in Toy) counts as a hit for any of them: pass `titles` (id -> title) to match that way.

Unfairness. Items are cut into N_ITEM_GROUPS = 5 equal-size groups by their relevance to auxiliary
tokens (Eq. 2), group 1 holding the most relevant items (`nanogdrt.grouping.item_groups`). Over all
test users,
    GP_g = share of group g among all top-K recommended items
    GH_g = share of group g among all history items
    MGU@K = mean_g |GP_g - GH_g|          DGU@K = max_g (GP_g - GH_g) - min_g (GP_g - GH_g)
This is our reading of the public evaluation code of the fairness baselines the paper borrows the
metrics from (shares pooled over users, not averaged per user). Items without a group are left out
of both shares. `group_distribution` gives the histograms of Fig. 3 / Fig. 8 (e.g. the top-1
recommendations beside the test targets).
"""

import math

import numpy as np

from nanogdrt.grouping import N_ITEM_GROUPS


def target_ranks(ranked, targets, titles=None) -> list[int | None]:
    """0-based position of each user's target in their ranked list, None when absent."""
    if len(ranked) != len(targets):
        raise ValueError(f"{len(ranked)} ranked lists for {len(targets)} targets")
    ranks = []
    for items, target in zip(ranked, targets):
        if titles is None:
            hit = [i for i, item in enumerate(items) if item == target]
        else:  # string match, as the paper's code: any id with the target's title is a hit
            hit = [i for i, item in enumerate(items) if titles[item] == titles[target]]
        ranks.append(hit[0] if hit else None)
    return ranks


def per_user_metrics(ranked, targets, k, titles=None) -> dict[str, np.ndarray]:
    """Per-user hit (0/1) and NDCG@k arrays, e.g. for bootstrap confidence intervals."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = target_ranks(ranked, targets, titles)
    hit = np.array([r is not None and r < k for r in ranks], dtype=np.float64)
    ndcg = np.array([1.0 / math.log2(r + 2) if r is not None and r < k else 0.0 for r in ranks])
    return {"hit": hit, "ndcg": ndcg}


def group_distribution(item_ids, item_group, n_groups=N_ITEM_GROUPS) -> np.ndarray:
    """Share of each group among `item_ids` (index g-1 holds group g); items without a group skipped."""
    counts = np.zeros(n_groups)
    for item in item_ids:
        if item in item_group:
            counts[item_group[item] - 1] += 1
    total = counts.sum()
    return counts / total if total else counts


def group_unfairness(ranked, histories, item_group, k, n_groups=N_ITEM_GROUPS) -> tuple[float, float]:
    """(MGU@k, DGU@k): the gap between the groups' share of top-k recommendations and of histories."""
    gp = group_distribution([item for items in ranked for item in items[:k]], item_group, n_groups)
    gh = group_distribution([item for history in histories for item in history], item_group, n_groups)
    gap = gp - gh
    return float(np.abs(gap).mean()), float(gap.max() - gap.min())


def evaluate(ranked, targets, histories, item_group=None, titles=None, ks=(5, 10),
             n_groups=N_ITEM_GROUPS) -> dict:
    """Flat dict {"NDCG@5", "HR@5", ..., "MGU@5", "DGU@5", ...}; MGU/DGU only with `item_group`."""
    out = {}
    for k in ks:
        m = per_user_metrics(ranked, targets, k, titles)
        out[f"NDCG@{k}"] = float(m["ndcg"].mean()) if len(targets) else 0.0
        out[f"HR@{k}"] = float(m["hit"].mean()) if len(targets) else 0.0
    if item_group is not None:
        for k in ks:
            out[f"MGU@{k}"], out[f"DGU@{k}"] = group_unfairness(ranked, histories, item_group, k, n_groups)
    return out
