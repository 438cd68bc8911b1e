"""Top-K recommendations for every user of a split, and their metrics (the paper's §4.1.4).

For each user, trie-constrained beam search (beam 10) over all catalogue titles gives a ranked
list of items; NDCG@K and HR@K measure accuracy, MGU@K and DGU@K how far the recommended item
groups stray from the users' histories, with the N_ITEM_GROUPS = 5 item groups formed by item
relevance (Eq. 2) under the *base* model.

`Decoding` holds every knob of the search, its scoring hook included (`scoring.Scoring`: plain CBS
by default; D3 fills it, `nanogdrt.baselines.d3.decoding`), and its soft-token hook (none by
default; LLaRA's item slots, `nanogdrt.baselines.llara`). The command line is `recommend.py`
at the repository root.
"""

from dataclasses import dataclass, field
from typing import Callable, Sequence

from nanogdrt import metrics
from nanogdrt.beam import beam_search
from nanogdrt.scoring import Scoring
from nanogdrt.soft_tokens import SoftTokens


def cbs_scoring(histories: Sequence[Sequence[int]]) -> Scoring:
    """Plain constrained beam search: nothing but the LM's log-probabilities."""
    return Scoring()


@dataclass(frozen=True)
class Decoding:
    """How `recommend` decodes. `scoring(histories)` builds the search's Scoring for the users
    decoded (D3's assistant needs their histories), so data-parallel shards build their own."""
    beams: int = 10                 # the paper's beam width
    top_k: int = 10                 # items kept per user (at most `beams`)
    batch_size: int = 32            # users decoded at once (slots refilled as users finish)
    length_penalty: float = 1.0     # score = sum log p / len^lp: transformers' default, the lineage's
    scoring: Callable[[Sequence[Sequence[int]]], Scoring] = field(default=cbs_scoring)
    # soft_tokens(prompts, histories): each prompt's soft tokens (nanogdrt/soft_tokens.py); None: ids only
    soft_tokens: Callable[[list[list[int]], Sequence[Sequence[int]]], list[SoftTokens | None]] | None = None


def recommend(model, builder, trie, interactions, titles, decoding: Decoding = Decoding(),
              progress: bool = False, dist=None) -> list[dict]:
    """One record per interaction: prompt ids, target, ranked top-K item ids with scores (and,
    when the scoring counts ghost tokens, each title's ghost and total token counts).

    `dist` (a `nanogdrt.infra.distributed.Dist`): each data-parallel rank decodes its share of
    the users and every rank gets all records back, in the order of `interactions`."""
    if dist is not None and dist.enabled:
        mine = dist.shard(interactions)
        records = recommend(model, builder, trie, mine, titles, decoding, progress and dist.main) if mine else []
        return dist.gather(records, len(interactions))
    prompts = [builder.for_interaction(x, titles, with_target=False).ids for x in interactions]
    histories = [x.history for x in interactions]
    soft = decoding.soft_tokens(prompts, histories) if decoding.soft_tokens is not None else None
    results = beam_search(model, prompts, trie, beams=decoding.beams, top_k=min(decoding.top_k, decoding.beams),
                          batch_size=decoding.batch_size, length_penalty=decoding.length_penalty,
                          progress=progress, scoring=decoding.scoring(histories), soft_tokens=soft)
    records = [{"row": x.row, "prompt_ids": p, "target_item_id": x.target,
                "topk_item_ids": r.item_ids, "scores": r.scores}
               for x, p, r in zip(interactions, prompts, results)]
    for rec, r in zip(records, results):
        if r.ghost_tokens is not None:
            rec["ghost_tokens"], rec["title_tokens"] = r.ghost_tokens, [len(t) for t in r.token_ids]
    return records


def ghost_share(records: list[dict]) -> float | None:
    """Share of ghost tokens among the tokens of all recommended titles (records of a scoring
    that counts them, e.g. D3's), else None."""
    ghosts = sum(sum(r.get("ghost_tokens") or []) for r in records)
    tokens = sum(sum(r.get("title_tokens") or []) for r in records)
    return ghosts / tokens if tokens and any("ghost_tokens" in r for r in records) else None


def score(records, interactions, titles, item_group=None, ks=(5, 10), popularity=None, n_items=None) -> dict:
    """Metrics dict (NDCG/HR@K at each of `ks`, and MGU/DGU@K when item groups are given; the
    beyond-accuracy metrics with `n_items` / `popularity`, as `metrics.evaluate`; ghost_share,
    the share of ghost tokens among the recommended titles' tokens, when they were counted)."""
    result = metrics.evaluate([r["topk_item_ids"] for r in records], [x.target for x in interactions],
                              [x.history for x in interactions], item_group=item_group, titles=titles,
                              ks=tuple(ks), popularity=popularity, n_items=n_items)
    share = ghost_share(records)
    if share is not None:
        result["ghost_share"] = share
    return result
