"""Trie-constrained beam search: the catalogue titles a model ranks highest after a prompt.

This is the evaluation of the paper's lineage (BIGRec, MSL, GDRT): transformers'
`generate(num_beams=B, num_return_sequences=K, prefix_allowed_tokens_fn=<trie>)`, reproduced
step for step (see "What transformers does" below) but organised for speed:

- The prompt is prefilled once per user, not once per beam; the part common to every prompt
  (the task description) is prefilled once for the whole run.
- A user's B beams share one cache (`BeamTreeCache`): its prompt, then the tree of tokens the
  beams have fed, each beam attending to the prompt and its own ancestors through a mask. When
  beams are reordered only the masks move, never keys; pruned branches are squeezed out now
  and then (`COMPACT_WHEN_DEAD`).
- Only live beams are decoded. Once fewer than B titles remain reachable, transformers keeps
  the empty places as dead beams (score -1e9) and still runs the model on them; on Toy users
  with length_penalty 1 that is over half of the rows. Here they are left out of the batch.
- Users are decoded `batch_size` at a time in slots (continuous batching): when a user's search
  stops, its slot takes the next user's prompt at once, so every step runs a full batch. Users
  stop at very different steps (with length_penalty = 1, transformers' stopping rule, 5. below,
  keeps some users running for 100+ steps), and a batch that waited for its slowest user would
  decode a few rows at a time at the end, which uses a CPU or GPU poorly.
- Allowed tokens come from the trie's flat arrays for all beams at once (`Trie.allowed`); beams
  carry trie node ids, so the generated tokens never need to be stored per beam.

On the LM head: transformers scores a token by its log-probability under a softmax over the
FULL vocabulary, and only then masks the tokens the trie forbids (`log_softmax`, then the
logits processors). Restricting the LM head to the allowed rows would change the normaliser
and so the scores and the ranking. We therefore keep transformers' scores exactly: one
(beams x vocabulary) matmul per step gives the logsumexp, and the allowed tokens' logits are
gathered from it. That costs about a fifth of a decode step for a 135M model, far less than
the B - 1 extra prompt prefills that it replaces.

Scores. A hypothesis' score is sum_i log p(y_i | prompt, y_<i) over its generated tokens, EOS
included, divided by (number of generated tokens, EOS included) ** length_penalty:
- length_penalty = 1.0 (transformers' default, used by the lineage): the mean log-probability
  per token;
- length_penalty = 0.0: the plain sum, i.e. the sequence log-probability.

What transformers 5 does (generation/utils.py, `_beam_search`), and what we match:
1. Step 0 starts from one live beam per user (the other B - 1 start at -1e9).
2. Each step keeps the 2B best (beam, token) candidates by accumulated (unnormalised) log-prob.
3. A candidate ending in EOS is finalised only if it is among the best B of those 2B; its
   score is then normalised as above and merged into the user's B best finished hypotheses.
4. The B best candidates not ending in EOS continue.
5. Stopping (early_stopping=False, the default): a user stops once its B finished slots are
   full and best_running / (tokens generated so far) ** length_penalty is no better than its
   worst finished score (a heuristic; a running beam could still have improved). After that
   nothing is added for the user.
6. The result is the finished hypotheses, best first; we return the first top_k.
Where transformers would fill slots with dead beams (scores near -1e9, only when fewer than
B titles can be completed) we return fewer hypotheses instead.
"""

from collections import deque
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanogdrt.kv_cache import BeamTreeCache, KVCache
from nanogdrt.trie import Trie

FIRST_CACHE_STEPS = 32   # decoding steps the tree cache has room for at first; it grows when needed
COMPACT_WHEN_DEAD = 0.2  # squeeze the tree cache once this share of its width is pruned branches
PREFILL_USERS = 8        # prompts prefilled together: few enough that padding to the longest is small


@dataclass
class Recommendation:
    """One user's ranked titles, best first."""
    item_ids: list[int]                  # one id per title: the smallest id carrying that title
    scores: list[float]                  # sequence scores (see the module docstring)
    token_ids: list[list[int]]           # the generated ids of each title (quoted title + EOS)
    all_item_ids: list[tuple[int, ...]]  # every id carrying that title (more than one for 57 Toy titles)


@torch.no_grad()
def beam_search(model, prompts: list[list[int]], trie: Trie, beams: int = 10, top_k: int = 10,
                length_penalty: float = 1.0, batch_size: int = 32, progress: bool = False
                ) -> list[Recommendation]:
    """Top-`top_k` catalogue titles for each prompt (token ids, e.g. `PromptBuilder.build().ids`).

    `batch_size` users are searched at once. Moves `trie` to the model's device. The results
    come back in the order of `prompts`.
    """
    if not 1 <= top_k <= beams:
        raise ValueError(f"top_k ({top_k}) must be between 1 and the number of beams ({beams})")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("beam_search needs at least one non-empty prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    trie.to(model.lm_head.weight.device)
    results: list[Recommendation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="beam search", unit="user", disable=not progress)

    def done(user: int, scores: list[float], nodes: list[int]):
        results[user] = _recommendation(trie, scores[:top_k], nodes[:top_k])
        bar.update(1)

    # Users of similar prompt length share the batch at the same time: less attention padding.
    queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    _search(model, prompts, queue, trie, beams, length_penalty, min(batch_size, len(prompts)), done)
    bar.close()
    return results


def _recommendation(trie: Trie, scores: list[float], nodes: list[int]) -> Recommendation:
    items = [trie.leaf_items[n] for n in nodes]
    return Recommendation([i[0] for i in items], scores, [trie.tokens_of(n) for n in nodes], items)


def _prefill_common_prefix(model, prompts: list[list[int]]) -> KVCache | None:
    """KV cache (batch 1) of the longest prefix all prompts share, leaving each at least one token."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    if n == 0:
        return None
    cache = model.new_cache(1, n)
    device = model.lm_head.weight.device
    model.hidden_states(torch.tensor([first[:n]], device=device), cache=cache)
    return cache


def _prefill(model, prompts: list[list[int]], head: KVCache | None):
    """Right-padded prefill of N prompts after the shared head.

    Returns (their cache, the hidden state (N, C) at each prompt's last token, lengths (N,)).
    """
    device = model.lm_head.weight.device
    h = head.length if head is not None else 0
    rest = [p[h:] for p in prompts]
    N, T = len(rest), max(len(r) for r in rest)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for n, r in enumerate(rest):
        ids[n, :len(r)] = torch.tensor(r)
        mask[n, :len(r)] = 1
    cache = model.new_cache(N, h + T)
    if head is not None:  # every row starts with the same head: copy its keys and values
        cache.k[:, :, :, :h] = head.k[:, :, :, :h]
        cache.v[:, :, :, :h] = head.v[:, :, :, :h]
        cache.valid[:, :h] = True
        cache.length = h
    hidden = model.hidden_states(ids.to(device), mask.to(device), cache=cache)  # (N, T, C)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return cache, hidden[torch.arange(N, device=device), lengths - h - 1], lengths


def _allowed_log_probs(model, hidden, allowed, alive):
    """hidden (M, C) -> full-vocabulary log-probabilities of the allowed tokens (M, K), -inf on padding.

    Only the `alive` rows (M,) go through the LM head: dead beams and empty slots cost nothing.
    """
    rows = alive.nonzero().flatten()
    logits = model.logits(hidden[rows]).float()                       # (m, V): the full normaliser
    logp = torch.full(allowed.tokens.shape, float("-inf"), device=hidden.device)
    logp[rows] = logits.gather(1, allowed.tokens[rows]) - logits.logsumexp(-1, keepdim=True)
    return logp.masked_fill(~allowed.mask, float("-inf"))


def _search(model, prompts, queue: list[int], trie: Trie, B: int, length_penalty: float,
            n_slots: int, done):
    """Beam search of every user in `queue`, `n_slots` at a time; calls done(user, scores, nodes)
    with each user's finished hypotheses (normalised scores and leaf nodes), best first."""
    device, config = model.lm_head.weight.device, model.config
    dtype = model.lm_head.weight.dtype
    neg_inf = float("-inf")
    head = _prefill_common_prefix(model, [prompts[u] for u in queue])
    queue = deque(queue)
    cache = BeamTreeCache(config.num_hidden_layers, n_slots, B, config.num_key_value_heads,
                          max(len(p) for p in prompts) + B * FIRST_CACHE_STEPS, config.head_dim,
                          dtype=dtype, device=device)
    # Per slot and beam: trie node and accumulated log-prob of the running beams (dead beams and
    # empty slots score -inf), the B best finished hypotheses (normalised, sorted), and the
    # hidden state of the token each beam was last fed.
    nodes = torch.zeros(n_slots, B, dtype=torch.long, device=device)
    scores = torch.full((n_slots, B), neg_inf, device=device)
    fin_scores = torch.full((n_slots, B), neg_inf, device=device)
    fin_nodes = torch.zeros(n_slots, B, dtype=torch.long, device=device)
    hidden = torch.zeros(n_slots, B, config.hidden_size, dtype=dtype, device=device)
    user: list[int | None] = [None] * n_slots      # the user in each slot

    def refill(free: list[int]):
        """Start the next users in the `free` slots: prefill their prompts, one live beam each."""
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        if not take:
            return
        slots = torch.tensor(free[:len(take)], device=device)
        for i in range(0, len(take), PREFILL_USERS):  # the queue is sorted by prompt length
            part = slots[i:i + PREFILL_USERS]
            prompt_cache, last, lengths = _prefill(model, [prompts[u] for u in take[i:i + PREFILL_USERS]], head)
            cache.load_prompts(part, prompt_cache, lengths)
            hidden[part, 0] = last
        # One live beam at the root (transformers starts the other B - 1 at -1e9, which only
        # ever yields worse copies of beam 0).
        nodes[slots], scores[slots], fin_scores[slots] = 0, neg_inf, neg_inf
        scores[slots, 0] = 0.0
        for s, u in zip(free, take):
            user[s] = u

    refill(list(range(n_slots)))
    while True:
        S = len(user)
        alive = scores > neg_inf                                                     # (S, B)
        allowed = trie.allowed(nodes.flatten(), active=alive.flatten())              # (S*B, K)
        K = allowed.tokens.shape[1]
        logp = _allowed_log_probs(model, hidden.view(S * B, -1), allowed, alive.flatten())
        cand = (scores[:, :, None] + logp.view(S, B, K)).view(S, B * K)
        if B * K < 2 * B:  # fewer candidates than transformers keeps: pad with impossible ones
            cand = torch.cat([cand, cand.new_full((S, 2 * B - B * K), neg_inf)], dim=1)
        top, idx = cand.topk(2 * B)                                                  # (S, 2B), sorted
        idx = idx.clamp(max=B * K - 1)
        token = allowed.tokens.view(S, B * K).gather(1, idx)
        child = allowed.nodes.view(S, B * K).gather(1, idx)
        parent = idx // K                                                            # beam it extends
        ends = (token == trie.eos_id) & (top > neg_inf)

        # Finalise EOS candidates among the best B of the 2B (transformers' top_num_beam_mask).
        n_generated = (cache.n_generated + 1)[:, None]                      # EOS included
        finishing = ends.clone()
        finishing[:, B:] = False
        normalised = top / n_generated.float() ** length_penalty
        merged = torch.cat([fin_scores, normalised.masked_fill(~finishing, neg_inf)], dim=1)
        fin_scores, pick = merged.topk(B)
        fin_nodes = torch.cat([fin_nodes, child], dim=1).gather(1, pick)

        # The B best candidates that did not end continue.
        scores, pick = top.masked_fill(ends, neg_inf).topk(B)
        nodes, parent, token = child.gather(1, pick), parent.gather(1, pick), token.gather(1, pick)

        # transformers' early-stop heuristic (early_stopping=False): a user stops for good once
        # its B finished slots are full and its best running beam, normalised by the current
        # length, is no better than its worst finished hypothesis.
        full = (fin_scores > neg_inf).all(-1)
        best_possible = scores[:, 0] / n_generated[:, 0].float() ** length_penalty
        is_open = ((~full | (best_possible > fin_scores[:, -1])) & (scores[:, 0] > neg_inf)
                   & (n_generated[:, 0] < trie.depth))
        stopped = (cache.live & ~is_open).nonzero().flatten()   # live: the slot holds a user
        if len(stopped):  # one sync per step: hand over the users that stopped
            for s, fs, fn in zip(stopped.tolist(), fin_scores[stopped].tolist(), fin_nodes[stopped].tolist()):
                kept = [i for i, x in enumerate(fs) if x > neg_inf]
                done(user[s], [fs[i] for i in kept], [fn[i] for i in kept])
                user[s] = None
            cache.release(stopped)
            scores[stopped] = neg_inf

        if not queue:  # nobody waits: stop when all are done, halve the batch when half is empty
            n_busy = int(cache.live.sum())
            if n_busy == 0:
                return
            if n_busy <= S // 2:
                keep = cache.live.nonzero().flatten()
                cache.keep(keep)
                nodes, scores, parent, token, hidden = nodes[keep], scores[keep], parent[keep], token[keep], hidden[keep]
                fin_scores, fin_nodes = fin_scores[keep], fin_nodes[keep]
                user = [user[i] for i in keep.tolist()]

        # Feed the chosen tokens to the live beams (dead ones cost nothing): each beam first
        # takes over the view of the beam it extends.
        cache.select(parent, fed=scores > neg_inf)
        if cache.fed.any():
            packed = model.hidden_states(cache.pack(token)[None], cache=cache)[0]   # (M, C)
            cache.unpack(packed, out=hidden)                                          # (S, B, C)
        refill([s for s, u in enumerate(user) if u is None])
        if cache.dead_columns() > COMPACT_WHEN_DEAD:
            cache.compact()
