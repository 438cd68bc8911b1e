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

Beyond accuracy (off by default: `evaluate` adds them only when given `n_items` / `popularity`, so
its dict with today's arguments is unchanged). Over the users' top-K lists L_u (the first K items;
fewer when a list is shorter), with phi(i) the number of training windows whose target is item i:
    Coverage@K = |union_u L_u| / n_items       catalogue coverage (Ge, Delgado-Battenberg & Jannach,
                 "Beyond accuracy", RecSys 2010; RecBole's ItemCoverage), n_items = the catalogue
    ARP@K      = mean_u (1/|L_u|) sum_{i in L_u} phi(i)     average recommendation popularity
                 (Abdollahpouri, Burke & Mobasher, "Managing popularity bias in recommender systems
                 with personalized re-ranking", FLAIRS 2019, arXiv:1901.07555, §4; RecBole's
                 AveragePopularity)
    Tail@K     = mean_u |L_u outside the head| / |L_u|    the same paper's APLT, with its split: the
                 head (short head) is the top 20% of items by popularity (its Fig. 1); here the top
                 HEAD_SHARE of the items with phi > 0, ties at the cut kept together, and every other
                 catalogue item (never a training target included) is tail
    Gini@K     = sum_j (2j - n - 1) x_(j) / (n sum_j x_j)   Gini index of item exposure, x_(j) the
                 number of top-K slots item j fills, sorted ascending over all n = n_items catalogue
                 items (never-recommended items are zeros): 0 when every item is shown equally,
                 (n - 1)/n when one item takes every slot (Fleder & Hosanagar, "Blockbuster
                 culture's next rise or fall", Management Science 2009; RecBole's GiniIndex)
ARP@K and Tail@K average over users with a non-empty list. Their "better" direction is a choice of
the study (lower ARP, higher Tail, lower Gini, higher Coverage mean less popularity bias), not a
claim of the paper, which reports only NDCG/HR and MGU/DGU.
"""

import math
from collections import Counter

import numpy as np

from nanogdrt.grouping import N_ITEM_GROUPS

HEAD_SHARE = 0.2     # the short head: the most popular 20% of the items with training targets (arXiv:1901.07555)


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


def exposure(ranked, k) -> Counter:
    """How many top-k slots each recommended item fills, over all users."""
    return Counter(item for items in ranked for item in items[:k])


def coverage(counts, n_items):
    """Coverage@K from exposure counts (last axis: items): the share of the n_items catalogue shown at
    least once. Works on one count vector or on a batch of them (bootstrap resamples)."""
    return (np.asarray(counts, dtype=np.float64) > 0).sum(-1) / n_items


def gini_index(counts, n_items):
    """Gini@K from exposure counts (last axis: the recommended items, any order); the n_items -
    len(counts) catalogue items absent from `counts` are zeros, sorted first, so they add nothing to
    the sum but count in n. 0 when nothing was recommended."""
    x = np.sort(np.asarray(counts, dtype=np.float64), axis=-1)
    m = x.shape[-1]
    if m > n_items:
        raise ValueError(f"{m} recommended items in a catalogue of {n_items}")
    j = np.arange(n_items - m + 1, n_items + 1)          # 1-based positions after the unlisted zeros
    total = x.sum(-1)
    return np.where(total > 0, ((2 * j - n_items - 1) * x).sum(-1) / (n_items * np.maximum(total, 1e-300)), 0.0)


def target_popularity(targets) -> dict[int, int]:
    """phi: {item: how many of `targets` it is}, e.g. the targets of a dataset's training windows
    (`x.target for x in dataset.train`), the popularity of ARP@K and Tail@K. Items never a target
    are absent (phi 0)."""
    return dict(Counter(targets))


def head_items(popularity, share=HEAD_SHARE) -> set:
    """The short head: the top `share` of the items with a positive training count, by count; items
    tied with the last one in are kept together (no tie broken by id). Everything else is tail."""
    seen = sorted((c for c in popularity.values() if c > 0), reverse=True)
    if not seen:
        return set()
    cut = seen[math.ceil(share * len(seen)) - 1]
    return {item for item, c in popularity.items() if c >= cut}


def popularity_terms(ranked, k, popularity, head=None) -> dict[str, np.ndarray]:
    """Per user: "arp", the mean training count phi of the top-k items; "tail", their share outside
    the head; "listed", 1 when the list is non-empty (empty lists are left out of the means)."""
    head = head_items(popularity) if head is None else head
    arp, tail, listed = [], [], []
    for items in ranked:
        top = items[:k]
        listed.append(1.0 if top else 0.0)
        arp.append(sum(popularity.get(i, 0) for i in top) / len(top) if top else 0.0)
        tail.append(sum(i not in head for i in top) / len(top) if top else 0.0)
    return {"arp": np.array(arp, dtype=np.float64), "tail": np.array(tail, dtype=np.float64),
            "listed": np.array(listed, dtype=np.float64)}


def beyond_accuracy(ranked, k, popularity=None, n_items=None) -> dict:
    """{"Coverage@k", "Gini@k"} (with `n_items`) and {"ARP@k", "Tail@k"} (with `popularity`)."""
    out = {}
    if n_items is not None:
        counts = list(exposure(ranked, k).values())
        out[f"Coverage@{k}"] = float(coverage(counts, n_items))
        out[f"Gini@{k}"] = float(gini_index(counts, n_items))
    if popularity is not None:
        t = popularity_terms(ranked, k, popularity)
        n = t["listed"].sum()
        out[f"ARP@{k}"] = float(t["arp"].sum() / n) if n else 0.0
        out[f"Tail@{k}"] = float(t["tail"].sum() / n) if n else 0.0
    return out


def evaluate(ranked, targets, histories, item_group=None, titles=None, ks=(5, 10),
             n_groups=N_ITEM_GROUPS, popularity=None, n_items=None) -> dict:
    """Flat dict {"NDCG@5", "HR@5", ..., "MGU@5", "DGU@5", ...}; MGU/DGU only with `item_group`.
    After them, per cut-off, the beyond-accuracy metrics: Coverage@k and Gini@k with `n_items` (the
    catalogue's size), ARP@k and Tail@k with `popularity` ({item: training-target count})."""
    out = {}
    for k in ks:
        m = per_user_metrics(ranked, targets, k, titles)
        out[f"NDCG@{k}"] = float(m["ndcg"].mean()) if len(targets) else 0.0
        out[f"HR@{k}"] = float(m["hit"].mean()) if len(targets) else 0.0
    if item_group is not None:
        for k in ks:
            out[f"MGU@{k}"], out[f"DGU@{k}"] = group_unfairness(ranked, histories, item_group, k, n_groups)
    for k in ks:
        out.update(beyond_accuracy(ranked, k, popularity, n_items))
    return out
