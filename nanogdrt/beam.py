"""Trie-constrained beam search: the catalogue titles a model ranks highest after a prompt.

This is the evaluation of the paper's lineage (BIGRec, MSL, GDRT): transformers'
`generate(num_beams=B, num_return_sequences=K, prefix_allowed_tokens_fn=<trie>)`, reproduced
step for step (see "What transformers does" below) but organised for speed:

- The prompt is prefilled once per user, not once per beam, and its KV cache is shared by the
  user's B beams (`SharedPrefixCache`); the part common to every prompt (the task description)
  is prefilled once for the whole run.
- Several users are decoded as one batch (left-padded prompts, a padding mask in the cache).
- Allowed tokens come from the trie's flat arrays for all beams at once (`Trie.allowed`); beams
  carry trie node ids, so the generated tokens never need to be stored per beam.
- The cache reorder after each step copies the generated tokens only, and a user whose search
  has stopped leaves the batch (its rows are dropped from the caches), so a batch costs the sum
  of its users' steps, not its slowest user's steps times the batch size.
Decoding, not the prompt, dominates what is left: with length_penalty = 1, transformers' stopping
rule (5. below) keeps some users running for 100+ steps of B beams, and matching transformers
means running exactly those steps.

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

from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanogdrt.kv_cache import KVCache, SharedPrefixCache
from nanogdrt.trie import Trie

FIRST_CACHE_STEPS = 32  # generated-token cache slots allocated at first; doubled when needed


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

    Moves `trie` to the model's device. Prompts are batched by length to limit padding; the
    results come back in the order of `prompts`.
    """
    if not 1 <= top_k <= beams:
        raise ValueError(f"top_k ({top_k}) must be between 1 and the number of beams ({beams})")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("beam_search needs at least one non-empty prompt")
    trie.to(model.lm_head.weight.device)
    head = _prefill_common_prefix(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Recommendation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="beam search", unit="user", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        found = _search_batch(model, [prompts[i] for i in chunk], head, trie, beams, length_penalty)
        for i, (scores, nodes) in zip(chunk, found):
            results[i] = _recommendation(trie, scores[:top_k], nodes[:top_k])
        bar.update(len(chunk))
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
    """Left-padded prefill of N prompts after the shared head -> (prompt cache, last hidden (N, C))."""
    device = model.lm_head.weight.device
    h = head.length if head is not None else 0
    rest = [p[h:] for p in prompts]
    N, T = len(rest), max(len(r) for r in rest)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for n, r in enumerate(rest):
        ids[n, T - len(r):] = torch.tensor(r)
        mask[n, T - len(r):] = 1
    cache = model.new_cache(N, h + T)
    if head is not None:  # every row starts with the same head: copy its keys and values
        cache.k[:, :, :, :h] = head.k[:, :, :, :h]
        cache.v[:, :, :, :h] = head.v[:, :, :, :h]
        cache.valid[:, :h] = True
        cache.length = h
    hidden = model.hidden_states(ids.to(device), mask.to(device), cache=cache)  # (N, T, C)
    return cache, hidden[:, -1]


def _grow(cache: SharedPrefixCache, max_len: int):
    """Give the generated-token cache room for `max_len` tokens, keeping what it holds."""
    old = cache.generated
    n_layers, rows, n_kv_heads, _, head_dim = old.k.shape
    new = KVCache(n_layers, rows, n_kv_heads, max_len, head_dim, dtype=old.k.dtype, device=old.k.device)
    L = old.length
    new.k[:, :, :, :L], new.v[:, :, :, :L] = old.k[:, :, :, :L], old.v[:, :, :, :L]
    new.valid[:, :L] = old.valid[:, :L]
    new.length = L
    cache.generated = new


def _allowed_log_probs(model, hidden, allowed):
    """hidden (M, C) -> full-vocabulary log-probabilities of the allowed tokens (M, K), -inf on padding."""
    logits = model.logits(hidden).float()                             # (M, V): the full normaliser
    logp = logits.gather(1, allowed.tokens) - logits.logsumexp(-1, keepdim=True)
    return logp.masked_fill(~allowed.mask, float("-inf"))


def _keep_users(cache: SharedPrefixCache, keep: torch.Tensor):
    """Drop every user but `keep` (indices) from the cache: finished users cost nothing more."""
    rows = (keep[:, None] * cache.beams + torch.arange(cache.beams, device=keep.device)).flatten()
    for c, r in ((cache.prefix, keep), (cache.generated, rows)):
        c.k, c.v, c.valid = c.k[:, r], c.v[:, r], c.valid[r]
    cache.n_users = len(keep)


def _search_batch(model, prompts, head, trie: Trie, B: int, length_penalty: float):
    """Beam search for N users at once -> per user (finished scores, leaf nodes), best first."""
    prefix, hidden = _prefill(model, prompts, head)
    N, device = len(prompts), hidden.device
    cache = SharedPrefixCache(prefix, B, min(trie.depth, FIRST_CACHE_STEPS))
    neg_inf = float("-inf")
    # Running beams: (n, b) trie nodes and accumulated log-probs; b = 1 at step 0 (transformers
    # starts the other B - 1 beams at -1e9, which only ever yields worse copies of beam 0).
    # Rows are the users still searched (n <= N); `users` maps them back to the batch.
    nodes = torch.zeros(N, 1, dtype=torch.long, device=device)
    scores = torch.zeros(N, 1, device=device)
    fin_scores = torch.full((N, B), neg_inf, device=device)           # B best finished, sorted
    fin_nodes = torch.zeros(N, B, dtype=torch.long, device=device)
    users = list(range(N))
    results = [None] * N

    for step in range(trie.depth):
        n, b = nodes.shape
        allowed = trie.allowed(nodes.flatten(), active=scores.flatten() > neg_inf)   # (n*b, K)
        K = allowed.tokens.shape[1]
        logp = _allowed_log_probs(model, hidden, allowed)                            # (n*b, K)
        cand = (scores[:, :, None] + logp.view(n, b, K)).view(n, b * K)
        if b * K < 2 * B:  # fewer candidates than transformers keeps: pad with impossible ones
            cand = torch.cat([cand, cand.new_full((n, 2 * B - b * K), neg_inf)], dim=1)
        top, idx = cand.topk(2 * B)                                                  # (n, 2B), sorted
        idx = idx.clamp(max=b * K - 1)
        token = allowed.tokens.view(n, b * K).gather(1, idx)
        child = allowed.nodes.view(n, b * K).gather(1, idx)
        parent = idx // K                                                            # beam it extends
        ends = (token == trie.eos_id) & (top > neg_inf)

        # Finalise EOS candidates among the best B of the 2B (transformers' top_num_beam_mask).
        n_generated = step + 1                                       # EOS included
        finishing = ends.clone()
        finishing[:, B:] = False
        normalised = top / n_generated ** length_penalty
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
        best_possible = scores[:, 0] / n_generated ** length_penalty
        is_open = (~full | (best_possible > fin_scores[:, -1])) & (scores[:, 0] > neg_inf)
        if step + 1 == trie.depth:
            is_open[:] = False
        if not bool(is_open.all()):  # one sync per step; hand over the users that stopped
            stopped = [users[i] for i in (~is_open).nonzero().flatten().tolist()]
            for u, fs, fn in zip(stopped, fin_scores[~is_open].tolist(), fin_nodes[~is_open].tolist()):
                kept = [i for i, s in enumerate(fs) if s > neg_inf]
                results[u] = ([fs[i] for i in kept], [fn[i] for i in kept])
            keep = is_open.nonzero().flatten()
            if len(keep) == 0:
                break
            users = [users[i] for i in keep.tolist()]
            nodes, scores, parent, token = nodes[keep], scores[keep], parent[keep], token[keep]
            fin_scores, fin_nodes = fin_scores[keep], fin_nodes[keep]
            _keep_users(cache, keep)

        # Feed the chosen tokens: first move each beam's generated cache to the beam it extends.
        if cache.generated.length == cache.generated.max_len:
            _grow(cache, min(2 * cache.generated.max_len, trie.depth))
        first_rows = torch.arange(len(users), device=device)[:, None] * B   # row of each user's beam 0
        cache.reorder((first_rows + parent).flatten())
        hidden = model.hidden_states(token.reshape(-1, 1), cache=cache)[:, -1]       # (n*B, C)
    return results
