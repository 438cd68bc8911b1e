"""Item groupings built without the base model, for judging fairness with groups GDRT never saw.

MGU/DGU (§4.1.4, nanogdrt/metrics.py) judge a model by five item groups cut from the base model's
Eq. 2 relevance, and GDRT's token groups (Eq. 3) come from the same base-model signal, so GDRT
partly optimises the yardstick that judges it. These groupings are built without the base model:

    popularity   IFairLRS's popularity groups (the Reweight baseline's) from training-target counts
                 (nanogdrt.grouping.popularity_groups: Reweight trains with them too)
    ngram        Eq. 2's notion, "predictable from the title's own prefix", under a count-based
                 n-gram model of the catalogue's titles instead of the LLM
    length       title length in tokens

Each is a dict item id -> group 1..5 over the whole catalogue (every title the trie can produce).
nanogdrt/analysis/regroup.py scores committed predictions under them (MGU/DGU, the Fig. 8 check).
"""


import math
from collections import Counter
from typing import Sequence

import numpy as np

from nanogdrt import grouping, stats
from nanogdrt.grouping import N_ITEM_GROUPS

BOS = -1            # pads an n-gram context before a title's first target id (no token id is negative)
NGRAM_ORDER = 3


# ----------------------------------------------------------------------------- the groupings

def ngrams(ids: Sequence[int], order: int):
    """(context, token) of every order 1..`order` at every position of `ids`: the context is the
    previous order - 1 ids or fewer, BOS-padded before the first."""
    padded = [BOS] * (order - 1) + list(ids)
    for t in range(order - 1, len(padded)):
        for k in range(order):
            yield tuple(padded[t - k:t]), padded[t]


class NgramCounts:
    """Counts of (context, token) over a catalogue's target ids, for Witten-Bell estimates."""

    def __init__(self, sequences: Sequence[Sequence[int]], order: int):
        self.order = order
        self.pair = Counter(g for ids in sequences for g in ngrams(ids, order))
        self.total, self.types = Counter(), Counter()      # c(h) and N1+(h .): tokens and types after h
        for (h, _), c in self.pair.items():
            self.total[h] += c
            self.types[h] += 1

    def own(self, ids: Sequence[int]) -> tuple[Counter, Counter, Counter]:
        """What one sequence adds to (pair, total, types): subtracted, the other titles' counts."""
        pair, total, types = Counter(ngrams(ids, self.order)), Counter(), Counter()
        for (h, w), c in pair.items():
            total[h] += c
            types[h] += self.pair[(h, w)] == c            # the type leaves with its last count
        return pair, total, types

    def log_prob(self, context: tuple, token: int, vocab_size: int, leave_out=None) -> float:
        """log P_WB(token | context), Witten-Bell interpolation from the empty context upwards:
            P(w | h) = (c(h, w) + N1+(h .) P(w | h')) / (c(h) + N1+(h .)),   h' = h less its oldest id,
        P(w | h) = P(w | h') when h was never seen, and below the unigram the uniform 1 / vocab_size.
        `leave_out`: `own(ids)` of a sequence whose counts are left out (leave-one-out)."""
        pair, total, types = leave_out or (Counter(), Counter(), Counter())
        p = 1.0 / vocab_size
        for k in range(len(context) + 1):
            h = context[len(context) - k:]
            c_h = self.total[h] - total[h]
            if c_h > 0:
                n_h = self.types[h] - types[h]
                p = (self.pair[(h, token)] - pair[(h, token)] + n_h * p) / (c_h + n_h)
        return math.log(p)


def ngram_relevance(sequences: dict[int, Sequence[int]], title_masks: dict[int, Sequence[bool]],
                    vocab_size: int, order: int = NGRAM_ORDER) -> dict[int, float]:
    """Eq. 2 with a count-based n-gram model in place of the base model -> {item: score}.

    Each item's target ids ('"title"' + EOS, as Eq. 3 scores them) are scored token by token by an
    order-`order` n-gram model of the catalogue's target ids: log P(y_t | y_{t-order+1..t-1}), the
    token's predictability from the title's own prefix. That is Eq. 3's r(y_t) = log P(y_t | x with
    the history masked, y_<t) without the task text x, which is the same for every item (so it
    shifts every score alike; only y_<t differs between items). The item's score is the mean over
    its title's own tokens (`title_masks`, relevance.title_token_mask), as Eq. 2 averages.

    Smoothing: interpolated Witten-Bell (Witten & Bell 1991; Chen & Goodman 1998 §2.4): no free
    parameter, every order interpolated with the one below, the unigram with the uniform
    distribution over the tokenizer's vocabulary. Leave-one-out: an item is scored by the counts of
    the other titles only, else each title's rare words would look predictable from its own rare
    prefix (a unique 3-gram, counted once, would get probability >= 1/2).
    Independent of the base model: no forward pass, no weight; it shares the tokenizer (the ids)."""
    counts = NgramCounts(list(sequences.values()), order)
    out = {}
    for item, ids in sequences.items():
        own, padded = counts.own(ids), [BOS] * (order - 1) + list(ids)
        scores = [counts.log_prob(tuple(padded[t:t + order - 1]), ids[t], vocab_size, own)
                  for t, title in enumerate(title_masks[item]) if title]
        if not scores:
            raise ValueError(f"item {item}: no title token to average (Eq. 2 is undefined for it)")
        out[item] = float(np.mean(scores))
    return out


def ngram_groups(relevance: dict[int, float], n_groups: int = N_ITEM_GROUPS) -> dict[int, int]:
    """The n-gram scores cut exactly as the Eq. 2 groups (grouping.item_groups): equal sizes, group 1
    = the highest score (the titles most predictable from their own prefix), ties by item id."""
    return grouping.item_groups(relevance, n_groups)


def length_groups(lengths: dict[int, int], n_groups: int = N_ITEM_GROUPS) -> dict[int, int]:
    """Title-length strata: quintiles of each title's own tokens (those Eq. 2 averages over), group 1
    = the longest, as group 1 holds the highest value in the Eq. 2 groups. A length is never split
    between strata (grouping.quantile_groups without keys), so sizes are equal up to ties.
    Independent of the base model: a count of the tokenizer's ids."""
    items = sorted(lengths)
    groups = grouping.quantile_groups([lengths[i] for i in items], n_groups)
    return dict(zip(items, groups.tolist()))


def title_ids(builder, titles: dict[int, str]):
    """{item: target ids}, {item: Eq. 2's title-token mask} of every catalogue title."""
    from nanogdrt.relevance import title_token_mask

    ids = {i: builder.target_ids(t) for i, t in titles.items()}
    return ids, {i: title_token_mask(builder, t).tolist() for i, t in titles.items()}


# ----------------------------------------------------------------------------- building and scoring

DESCRIBE = {
    "eq2": "Eq. 2 relevance under the base model (--item-groups): the metric's own groups, group 1 most relevant",
    "popularity": "IFairLRS popularity from training-target counts (ties: history counts, then kept together), "
                  "group 1 most popular",
    "ngram": "Eq. 2 under a leave-one-out Witten-Bell n-gram model of the catalogue's title tokens, "
             "group 1 most predictable from the title's own prefix",
    "length": "title length in tokens (Eq. 2's title tokens), group 1 longest, a length never split",
}


def build_groupings(ds, builder, eq2: dict[int, int], popularity: dict[int, int],
                    order: int = NGRAM_ORDER) -> dict[str, dict[int, int]]:
    """{name: item -> group}: the Eq. 2 and popularity groups given, the n-gram and length ones built
    from `builder`'s tokenization of ds.titles."""
    ids, masks = title_ids(builder, ds.titles)
    relevance = ngram_relevance(ids, masks, builder.tokenizer.vocab_size, order)
    return {"eq2": eq2, "popularity": popularity,
            "ngram": ngram_groups(relevance), "length": length_groups({i: sum(m) for i, m in masks.items()})}


def describe(groupings: dict, order: int) -> dict:
    """Per grouping: what it is, its group sizes, and Spearman's rho of its labels with Eq. 2's."""
    items = sorted(groupings["eq2"])
    out = {}
    for name, g in groupings.items():
        what = DESCRIBE[name] + (f" (order {order})" if name == "ngram" else "")
        out[name] = {"what": what, "sizes": np.bincount(list(g.values()), minlength=N_ITEM_GROUPS + 1)[1:].tolist(),
                     "spearman_with_eq2": stats.spearman([groupings["eq2"][i] for i in items], [g[i] for i in items])}
    return out
