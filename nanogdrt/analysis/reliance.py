"""History reliance, measured directly: does a model's top-K move when the user's history does?

The paper measures context bias by attribution (§2.2 Fig. 2, §4.3 Fig. 7: how much of the
predicted title's log-probability the auxiliary tokens carry against the interactions;
nanogdrt.attribution, both definitions). This is the behavioural counterpart, read off the
recommendations themselves: decode each user's top-K (trie-constrained beam search, as the test)

    true     with the user's own history,
    swap     with another user's history (a seeded derangement: nobody keeps their own),
    na       with the history replaced by "N/A" (Eq. 2/3's masked prompt, the same for everyone),

and compare each with `true`:

    top1_changed   share of users whose top-1 item differs,
    overlap@K      mean over users of |A ∩ B| / K, with K the longer list's length (K unless the
                   trie holds fewer titles).

We take |A ∩ B| / K rather than Jaccard |A ∩ B| / |A ∪ B|: for two lists of K items Jaccard is
o / (2 - o) of it, a monotone transform that ranks models the same, and |A ∩ B| / K reads
directly as "the share of the K recommendations that survive the change" (it is the precision of
one list against the other). A model that ignores the history has overlap 1 and top1_changed 0
under both changes; the swap says whether the history that is there is used, the "N/A" whether
any history is. In the controlled world (nanogdrt.controlled) the same numbers for the oracle's
lists give the reliance the truth calls for.
"""

import random
from typing import NamedTuple

from nanogdrt.beam import beam_search
from nanogdrt.data import Interaction
from nanogdrt.recommend import Decoding, recommend
from nanogdrt.relevance import masked_prompt_ids

CHANGES = ("swap", "na")


class Reliance(NamedTuple):
    """How much the top-K changes between two decodings of the same users."""
    top1_changed: float            # share of users whose top-1 item differs
    overlap: float                 # mean |A ∩ B| / K
    per_user_top1: list[bool]      # per user: did the top-1 change (for intervals over users)
    per_user_overlap: list[float]  # per user: |A ∩ B| / K


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation with no fixed point: user i is shown user perm[i]'s history.
    Sattolo's algorithm: a uniformly random single n-cycle (one shuffle, no rejection)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 users, got {n}")
    rng = random.Random(f"derangement:{seed}")
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)          # j < i (Fisher-Yates would allow j = i): one cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def swapped(interactions: list[Interaction], seed: int = 0) -> list[Interaction]:
    """Each interaction with another's history (`derangement`); target and row are kept."""
    perm = derangement(len(interactions), seed)
    return [Interaction(list(interactions[j].history), x.target, x.row) for x, j in zip(interactions, perm)]


def compare_topk(a: list[list[int]], b: list[list[int]], k: int) -> Reliance:
    """top1_changed and overlap@k of two ranked lists per user (module docstring)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-zero number of lists, got {len(a)} and {len(b)}")
    top1 = [x[:1] != y[:1] for x, y in zip(a, b)]
    overlap = [len(set(x[:k]) & set(y[:k])) / max(len(x[:k]), len(y[:k]), 1) for x, y in zip(a, b)]
    return Reliance(sum(top1) / len(top1), sum(overlap) / len(overlap), top1, overlap)


def masked_topk(model, builder, trie, n_users: int, decoding: Decoding = Decoding()) -> list[list[int]]:
    """The top-K after the "N/A" prompt, once, repeated for n_users (it shows no user anything).
    The scoring hook gets an empty history, as the prompt shows none."""
    [r] = beam_search(model, [masked_prompt_ids(builder)], trie, beams=decoding.beams,
                      top_k=min(decoding.top_k, decoding.beams), batch_size=1,
                      length_penalty=decoding.length_penalty, scoring=decoding.scoring([[]]))
    return [list(r.item_ids) for _ in range(n_users)]


def history_reliance(model, builder, trie, interactions: list[Interaction], titles: dict[int, str],
                     decoding: Decoding = Decoding(), seed: int = 0,
                     true_topk: list[list[int]] | None = None) -> dict[str, Reliance]:
    """{"swap": ..., "na": ...}: each change of history against the user's own (`true_topk`: the
    test's decoded lists, to skip decoding them again; same `decoding` assumed)."""
    if true_topk is None:
        true_topk = [r["topk_item_ids"] for r in recommend(model, builder, trie, interactions, titles, decoding)]
    swap = [r["topk_item_ids"] for r in recommend(model, builder, trie, swapped(interactions, seed), titles, decoding)]
    na = masked_topk(model, builder, trie, len(interactions), decoding)
    k = min(decoding.top_k, decoding.beams)
    return {"swap": compare_topk(true_topk, swap, k), "na": compare_topk(true_topk, na, k)}
