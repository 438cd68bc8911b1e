"""Soft tokens: a prompt whose input vectors at some positions are given vectors, not token embeddings.

LLM recommenders that feed a collaborative model's item embeddings to the LLM (LLaRA,
nanogdrt/baselines/llara.py) write a placeholder token into the prompt and replace its input
embedding: with E the token-embedding table, the input vector at position t is

    x_t = v_k        at the k-th replaced position (the k-th given vector)
    x_t = E[id_t]    everywhere else (what the ids path computes)

`Llama.hidden_states(inputs_embeds=x)` runs the model on these vectors, and beam search's prefill
takes one `SoftTokens` per prompt (`beam_search(..., soft_tokens=...)`; the generated tokens are
plain tokens). With no replaced position, or with vectors equal to the placeholder's own embedding,
the search gives the ids path's top-K and scores exactly (tests/test_llara.py).
"""

from typing import NamedTuple, Sequence

import torch


class SoftTokens(NamedTuple):
    """The replaced positions of one prompt and their vectors."""
    positions: torch.Tensor   # (n,) long, ascending: prompt positions whose input vector is replaced
    vectors: torch.Tensor     # (n, C) the input vectors put there


def first_soft_position(soft: Sequence[SoftTokens | None] | None) -> int | None:
    """The earliest replaced position over all prompts (None when nothing is replaced): a prefix
    shared by every prompt's ids is shared by their inputs only before it."""
    firsts = [int(s.positions[0]) for s in soft or () if s is not None and len(s.positions)]
    return min(firsts) if firsts else None


def soft_embeddings(embed_tokens: torch.nn.Module, ids: torch.Tensor, soft: Sequence[SoftTokens | None],
                    offset: int = 0) -> torch.Tensor:
    """(B, T) ids -> (B, T, C) their token embeddings, row b's `soft[b].positions - offset` replaced
    by `soft[b].vectors` (cast to the embeddings' dtype; the gradient reaches the vectors).

    offset: prompt positions that precede ids[:, 0] (a prefix already held in a KV cache)."""
    x = embed_tokens(ids)                                                      # (B, T, C)
    rows, cols, vectors = [], [], []
    for b, s in enumerate(soft):
        if s is None or not len(s.positions):
            continue
        col = s.positions.to(ids.device) - offset
        if int(col.min()) < 0 or int(col.max()) >= ids.shape[1]:
            raise ValueError(f"prompt {b}: soft-token positions {s.positions.tolist()} lie outside its "
                             f"positions {offset}..{offset + ids.shape[1] - 1}")
        if s.vectors.shape != (len(col), x.shape[-1]):
            raise ValueError(f"prompt {b}: {len(col)} soft-token positions need ({len(col)}, {x.shape[-1]}) "
                             f"vectors, got {tuple(s.vectors.shape)}")
        rows.append(torch.full_like(col, b))
        cols.append(col)
        vectors.append(s.vectors.to(device=x.device, dtype=x.dtype))
    if not rows:
        return x
    return x.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(vectors))   # out of place: autograd-safe
