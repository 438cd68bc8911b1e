"""Item groupings built without the base model, for judging fairness with groups GDRT never saw.

MGU/DGU (§4.1.4, nanogdrt/metrics.py) judge a model by five item groups cut from the base model's
Eq. 2 relevance, and GDRT's token groups (Eq. 3) come from the same base-model signal, so GDRT
partly optimises the yardstick that judges it. These groupings are built without the base model:

    popularity   IFairLRS's popularity groups (the Reweight baseline's) from training-target counts
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
    Independent of the base model: counts of the training data only."""
    target, history = Counter(x.target for x in train), Counter(i for x in train for i in x.history)
    items = sorted(catalogue)
    scale = max(history.values(), default=0) + 1               # (target, history) as one exact number
    value = np.array([target[i] * scale + history[i] for i in items], dtype=np.float64)
    groups = grouping.quantile_groups(value, n_groups)
    filled = len(set(groups.tolist()))
    if filled < n_groups:
        raise ValueError(f"popularity: the training counts of {len(train)} windows fill only {filled} of "
                         f"{n_groups} groups (ties kept together); give a larger training file")
    return dict(zip(items, groups.tolist()))


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
