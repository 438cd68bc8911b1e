"""Trie-constrained beam search: the catalogue titles a model ranks highest after a prompt.

This is the evaluation of the paper's lineage (BIGRec, MSL, GDRT): transformers'
`generate(num_beams=B, num_return_sequences=K, prefix_allowed_tokens_fn=<trie>)`, reproduced
step for step (see "What transformers does" below) but organised for speed:

- The prompt is prefilled once per user, not once per beam; the part common to every prompt
  (the task description) is prefilled once for the whole run.
- A user's B beams share one cache (`nanogdrt.tree_cache.BeamTreeCache`): its prompt, then the
  tree of tokens the beams have fed, each beam attending to the prompt and its own ancestors
  through a mask. When beams are reordered only the masks move, never keys; pruned branches
  are squeezed out now and then (`COMPACT_WHEN_DEAD`).
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

D3 (Bao et al. 2024, "Decoding Matters"; nanogdrt/baselines/d3.py says what its code does) is an option
of the same search, `scoring`: ghost tokens (p_LM > a threshold) are counted per hypothesis and
left out of its length, and an assistant's token log-probabilities enter every step's scores
with weight alpha. With `Scoring()` (the default) none of this runs: the search is the CBS above.
`Scoring(normaliser="allowed")` is a diagnostic, not the lineage's rule: every step's softmax
runs over the trie's allowed tokens only, the distribution MSL's loss trains (at tau 1).

The loop (`_search`) is a row of small steps over one state object (`Slots`): `_candidates`
(2. above), `_finalise` (3.), `_continue` (4.), `_stop_finished` (5.), `_shrink`, `_feed` (run
the model on the chosen tokens), `_refill`. Scores are normalised in one function, `_score`.
The search talks to its cache only through the cache's methods; the cache knows no scores.
"""

import math
from collections import deque
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from tqdm import tqdm

from nanogdrt.kv_cache import KVCache
from nanogdrt.scoring import Scoring, assistant_log_probs
from nanogdrt.soft_tokens import first_soft_position, soft_embeddings
from nanogdrt.tree_cache import BeamTreeCache
from nanogdrt.trie import Trie

FIRST_CACHE_STEPS = 32   # decoding steps the tree cache has room for at first; it grows when needed
COMPACT_WHEN_DEAD = 0.2  # squeeze the tree cache once this share of its width is pruned branches
PREFILL_USERS = 8        # prompts prefilled together: few enough that padding to the longest is small

NEG_INF = float("-inf")  # the score of dead beams and empty slots


@dataclass
class Recommendation:
    """One user's ranked titles, best first."""
    item_ids: list[int]                  # one id per title: the smallest id carrying that title
    scores: list[float]                  # sequence scores (see the module docstring)
    token_ids: list[list[int]]           # the generated ids of each title (quoted title + EOS)
    all_item_ids: list[tuple[int, ...]]  # every id carrying that title (more than one for 57 Toy titles)
    ghost_tokens: list[int] | None = None  # D3: tokens of each title with p_LM > the ghost threshold


@torch.no_grad()
def beam_search(model, prompts: list[list[int]], trie: Trie, beams: int = 10, top_k: int = 10,
                length_penalty: float = 1.0, batch_size: int = 32, progress: bool = False,
                scoring: Scoring = Scoring(), soft_tokens=None) -> list[Recommendation]:
    """Top-`top_k` catalogue titles for each prompt (token ids, e.g. `PromptBuilder.build().ids`).

    `batch_size` users are searched at once. Moves `trie` to the model's device. The results
    come back in the order of `prompts`. `scoring`: CBS (default) or D3 (see the module docstring).
    `soft_tokens`: one `SoftTokens` (or None) per prompt, input vectors at given positions (soft_tokens.py).
    """
    if not 1 <= top_k <= beams:
        raise ValueError(f"top_k ({top_k}) must be between 1 and the number of beams ({beams})")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("beam_search needs at least one non-empty prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if soft_tokens is not None and len(soft_tokens) != len(prompts):
        raise ValueError(f"{len(soft_tokens)} soft-token entries for {len(prompts)} prompts")
    trie.to(model.lm_head.weight.device)
    results: list[Recommendation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="beam search", unit="user", disable=not progress)

    def done(user: int, scores: list[float], nodes: list[int], ghosts: list[int] | None):
        results[user] = _recommendation(trie, scores[:top_k], nodes[:top_k], ghosts and ghosts[:top_k])
        bar.update(1)

    # Users of similar prompt length share the batch at the same time: less attention padding.
    queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    _search(model, prompts, queue, trie, beams, length_penalty, min(batch_size, len(prompts)), done, scoring, soft_tokens)
    bar.close()
    return results


def _recommendation(trie: Trie, scores: list[float], nodes: list[int], ghosts=None) -> Recommendation:
    items = [trie.leaf_items[n] for n in nodes]
    return Recommendation([i[0] for i in items], scores, [trie.tokens_of(n) for n in nodes], items, ghosts)


def _prefill_common_prefix(model, prompts: list[list[int]], limit: int | None = None) -> KVCache | None:
    """KV cache (batch 1) of the longest prefix all prompts share before `limit`, leaving each one token."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    n = n if limit is None else min(n, limit)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    if n == 0:
        return None
    cache = model.new_cache(1, n)
    device = model.lm_head.weight.device
    model.hidden_states(torch.tensor([first[:n]], device=device), context=cache)
    return cache


def _prefill(model, prompts: list[list[int]], head: KVCache | None, soft=None):
    """Right-padded prefill of N prompts after the shared head (with `soft`: their soft tokens).

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
    if head is not None:  # every row starts with the same head
        cache.start_with(head)
    ids, mask = ids.to(device), mask.to(device)
    embeds = None if soft is None else soft_embeddings(model.model.embed_tokens, ids, soft, offset=h)
    hidden = model.hidden_states(ids, mask, context=cache, inputs_embeds=embeds)  # (N, T, C)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return cache, hidden[torch.arange(N, device=device), lengths - h - 1], lengths


def _allowed_log_probs(model, hidden, allowed, alive, normaliser="vocab"):
    """hidden (M, C) -> log-probabilities of the allowed tokens (M, K), -inf on padding.

    normaliser "vocab": the softmax over the full vocabulary (transformers'); "allowed": the
    softmax over the row's allowed tokens only (a diagnostic, see `Scoring.normaliser`).
    Only the `alive` rows (M,) go through the LM head: dead beams and empty slots cost nothing.
    """
    rows = alive.nonzero().flatten()
    logits = model.logits(hidden[rows]).float()                       # (m, V)
    picked = logits.gather(1, allowed.tokens[rows])                   # (m, K)
    if normaliser == "vocab":
        norm = logits.logsumexp(-1, keepdim=True)
    else:   # every live beam has at least one allowed token (EOS at a leaf)
        norm = picked.masked_fill(~allowed.mask[rows], float("-inf")).logsumexp(-1, keepdim=True)
    logp = torch.full(allowed.tokens.shape, float("-inf"), device=hidden.device)
    logp[rows] = picked - norm
    return logp.masked_fill(~allowed.mask, float("-inf"))


def _search(model, prompts, queue: list[int], trie: Trie, B: int, length_penalty: float,
            n_slots: int, done, scoring: Scoring = Scoring(), soft_tokens=None):
    """Beam search of every user in `queue`, `n_slots` at a time; calls done(user, scores, nodes,
    ghosts) with each user's finished hypotheses (normalised scores, leaf nodes, ghost-token counts
    or None), best first."""
    device, config = model.lm_head.weight.device, model.config
    dtype = model.lm_head.weight.dtype
    head = _prefill_common_prefix(model, [prompts[u] for u in queue], first_soft_position(soft_tokens))
    queue = deque(queue)
    cache = BeamTreeCache(config.num_hidden_layers, n_slots, B, config.num_key_value_heads,
                          max(len(p) for p in prompts) + B * FIRST_CACHE_STEPS, config.head_dim,
                          dtype=dtype, device=device)
    state = Slots.empty(n_slots, B, config.hidden_size, dtype, device,
                        trie.n_nodes if scoring.uses_assistant else 0)
    _refill(model, prompts, queue, head, cache, state, trie, scoring, soft_tokens)
    while True:
        cand = _candidates(model, trie, state, scoring)
        _finalise(state, cand, length_penalty)
        _continue(state, cand)
        _stop_finished(state, cache, trie.depth, length_penalty, done, scoring.ghost_threshold is not None)
        if not queue and not _shrink(state, cache):
            return
        _feed(model, cache, state)
        _refill(model, prompts, queue, head, cache, state, trie, scoring, soft_tokens)
        if cache.dead_columns() > COMPACT_WHEN_DEAD:
            cache.compact()


# ----------------------------------------------------------------------------- the steps of _search

@dataclass
class Slots:
    """The search's state: one row per slot (the user it holds) and beam.

    Running beams carry a trie node and their accumulated log-prob; dead beams and empty slots
    score -inf. `parent` and `token` are the step's choice, fed to the model at its end.
    """
    user: list[int | None]    # the user in each slot; None: empty
    live: torch.Tensor        # (S,) the slot holds a user still searching
    length: torch.Tensor      # (S,) tokens of a title that ends at this step, EOS included
    nodes: torch.Tensor       # (S, B) trie node of each running beam
    scores: torch.Tensor      # (S, B) accumulated log-prob of each running beam
    fin_scores: torch.Tensor  # (S, B) the B best finished hypotheses, normalised, best first
    fin_nodes: torch.Tensor   # (S, B) their trie leaves
    hidden: torch.Tensor      # (S, B, C) hidden state of the token each beam was last fed
    parent: torch.Tensor      # (S, B) the beam each beam extends
    token: torch.Tensor       # (S, B) the token it is fed next
    ghosts: torch.Tensor      # (S, B) D3: ghost tokens of each running beam (else unused zeros)
    fin_ghosts: torch.Tensor  # (S, B) D3: ghost tokens of each finished hypothesis
    mass: torch.Tensor        # (S, N) D3: the assistant's probability mass below each trie node; N = 0 without

    @classmethod
    def empty(cls, S: int, B: int, C: int, dtype, device, n_nodes: int = 0) -> "Slots":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls([None] * S, zeros(S, dtype=torch.bool), zeros(S), zeros(S, B),
                   torch.full((S, B), NEG_INF, device=device), torch.full((S, B), NEG_INF, device=device),
                   zeros(S, B), zeros(S, B, C, dtype=dtype), zeros(S, B), zeros(S, B), zeros(S, B), zeros(S, B),
                   zeros(S, n_nodes, dtype=torch.float32))

    def keep(self, idx: torch.Tensor):
        """Keep only slots `idx` (indices), in that order."""
        for f in fields(self):
            if f.name != "user":
                setattr(self, f.name, getattr(self, f.name)[idx])
        self.user = [self.user[i] for i in idx.tolist()]


class Candidates(NamedTuple):
    """Each slot's 2B best (beam, token) extensions by accumulated log-prob, best first."""
    logp: torch.Tensor    # (S, 2B) accumulated log-prob, -inf for impossible ones
    token: torch.Tensor   # (S, 2B) the token
    node: torch.Tensor    # (S, 2B) the trie node it leads to
    parent: torch.Tensor  # (S, 2B) the beam it extends
    ends: torch.Tensor    # (S, 2B) the token is EOS: the title is complete
    ghosts: torch.Tensor | None = None  # (S, 2B) D3: ghost tokens of the extended hypothesis


def _score(logp: torch.Tensor, length: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """A hypothesis' score: summed log-prob / (tokens, EOS included) ** length_penalty.

    The one place where scores are normalised: for finished titles and for the stopping rule."""
    return logp / length.float() ** length_penalty


def _refill(model, prompts, queue: deque, head: KVCache | None, cache: BeamTreeCache, s: Slots,
            trie: Trie, scoring: Scoring, soft_tokens=None):
    """Start the next users in the empty slots: prefill their prompts (and soft tokens), one live
    beam each (D3: and map the assistant's item probabilities onto the trie, once per user)."""
    free = [i for i, u in enumerate(s.user) if u is None]
    take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
    if not take:
        return
    slots = torch.tensor(free[:len(take)], device=s.scores.device)
    for i in range(0, len(take), PREFILL_USERS):  # the queue is sorted by prompt length
        part, users = slots[i:i + PREFILL_USERS], take[i:i + PREFILL_USERS]
        soft = [soft_tokens[u] for u in users] if soft_tokens is not None else None
        prompt_cache, last, lengths = _prefill(model, [prompts[u] for u in users], head, soft)
        cache.load_prompts(part, prompt_cache, lengths)
        s.hidden[part, 0] = last
    # One live beam at the root (transformers starts the other B - 1 at -1e9, which only ever
    # yields worse copies of beam 0).
    s.nodes[slots], s.scores[slots], s.fin_scores[slots] = 0, NEG_INF, NEG_INF
    s.scores[slots, 0] = 0.0
    s.live[slots], s.length[slots] = True, 1
    s.ghosts[slots] = 0
    if scoring.uses_assistant:
        s.mass[slots] = trie.subtree_sums(scoring.assistant(take).to(s.mass.device, torch.float32))
    for slot, u in zip(free, take):
        s.user[slot] = u


def _candidates(model, trie: Trie, s: Slots, scoring: Scoring = Scoring()) -> Candidates:
    """Score every allowed next token of every running beam; keep the 2B best per slot."""
    S, B = s.scores.shape
    alive = s.scores > NEG_INF                                                   # (S, B)
    allowed = trie.allowed(s.nodes.flatten(), active=alive.flatten())            # (S*B, K)
    K = allowed.tokens.shape[1]
    logp = _allowed_log_probs(model, s.hidden.view(S * B, -1), allowed, alive.flatten(),
                              scoring.normaliser)
    step = logp
    if scoring.uses_assistant:   # D3's (1 - alpha) log p_LM + alpha log p_assistant
        step = (1 - scoring.alpha) * logp + scoring.alpha * assistant_log_probs(s.mass, allowed)
    cand = (s.scores[:, :, None] + step.view(S, B, K)).view(S, B * K)
    if B * K < 2 * B:  # fewer candidates than transformers keeps: pad with impossible ones
        cand = torch.cat([cand, cand.new_full((S, 2 * B - B * K), NEG_INF)], dim=1)
    top, idx = cand.topk(2 * B)                                                  # (S, 2B), sorted
    idx = idx.clamp(max=B * K - 1)
    token = allowed.tokens.view(S, B * K).gather(1, idx)
    node = allowed.nodes.view(S, B * K).gather(1, idx)
    ghosts = None
    if scoring.ghost_threshold is not None:   # D3: p_LM > threshold, on the LM's own probability
        ghost = (logp > math.log(scoring.ghost_threshold)).view(S, B, K)
        ghosts = (s.ghosts[:, :, None] + ghost).view(S, B * K).gather(1, idx)
    return Candidates(top, token, node, idx // K, (token == trie.eos_id) & (top > NEG_INF), ghosts)


def _finalise(s: Slots, c: Candidates, length_penalty: float):
    """EOS candidates among the best B of the 2B (transformers' top_num_beam_mask) join the B
    best finished hypotheses, with their normalised score."""
    B = s.scores.shape[1]
    finishing = c.ends.clone()
    finishing[:, B:] = False
    length = s.length[:, None] if c.ghosts is None else _without_ghosts(s.length[:, None], c.ghosts)
    normalised = _score(c.logp, length, length_penalty)
    merged = torch.cat([s.fin_scores, normalised.masked_fill(~finishing, NEG_INF)], dim=1)
    s.fin_scores, pick = merged.topk(B)
    s.fin_nodes = torch.cat([s.fin_nodes, c.node], dim=1).gather(1, pick)
    if c.ghosts is not None:
        s.fin_ghosts = torch.cat([s.fin_ghosts, c.ghosts], dim=1).gather(1, pick)


def _without_ghosts(length: torch.Tensor, ghosts: torch.Tensor) -> torch.Tensor:
    """D3's length: the tokens that are not ghost tokens, at least 1 (a title of ghosts only)."""
    return (length - ghosts).clamp(min=1)


def _continue(s: Slots, c: Candidates):
    """The B best candidates that did not end become the running beams."""
    s.scores, pick = c.logp.masked_fill(c.ends, NEG_INF).topk(s.scores.shape[1])
    s.nodes, s.parent, s.token = c.node.gather(1, pick), c.parent.gather(1, pick), c.token.gather(1, pick)
    if c.ghosts is not None:
        s.ghosts = c.ghosts.gather(1, pick)


def _stop_finished(s: Slots, cache: BeamTreeCache, depth: int, length_penalty: float, done, ghosts=False):
    """Hand over the users that stop now and free their slots.

    transformers' early-stop heuristic (early_stopping=False): a user stops for good once its B
    finished slots are full and its best running beam, normalised by the current length, is no
    better than its worst finished hypothesis; also when no beam runs or no title is longer."""
    full = (s.fin_scores > NEG_INF).all(-1)
    length = _without_ghosts(s.length, s.ghosts[:, 0]) if ghosts else s.length
    best_possible = _score(s.scores[:, 0], length, length_penalty)
    is_open = ((~full | (best_possible > s.fin_scores[:, -1])) & (s.scores[:, 0] > NEG_INF)
               & (s.length < depth))
    stopped = (s.live & ~is_open).nonzero().flatten()
    if len(stopped):  # one sync per step
        fin_ghosts = s.fin_ghosts[stopped].tolist() if ghosts else [None] * len(stopped)
        for slot, fs, fn, fg in zip(stopped.tolist(), s.fin_scores[stopped].tolist(),
                                    s.fin_nodes[stopped].tolist(), fin_ghosts):
            kept = [i for i, x in enumerate(fs) if x > NEG_INF]
            done(s.user[slot], [fs[i] for i in kept], [fn[i] for i in kept], fg and [fg[i] for i in kept])
            s.user[slot] = None
        s.live[stopped] = False
        s.scores[stopped] = NEG_INF
        cache.release(stopped)


def _shrink(s: Slots, cache: BeamTreeCache) -> bool:
    """Once nobody waits: halve the batch when half of it is empty. False when all are done."""
    n_busy = int(s.live.sum())
    if n_busy == 0:
        return False
    if n_busy <= len(s.user) // 2:
        keep = s.live.nonzero().flatten()
        cache.keep(keep)
        s.keep(keep)
    return True


def _feed(model, cache: BeamTreeCache, s: Slots):
    """Feed the chosen tokens to the running beams (dead ones cost nothing): each beam first
    takes over the view of the beam it extends."""
    fed = s.scores > NEG_INF                                                     # (S, B)
    cache.select(s.parent, fed=fed)
    if fed.any():
        packed = model.hidden_states(cache.pack(s.token)[None], context=cache)[0]   # (M, C)
        cache.unpack(packed, out=s.hidden)                                          # (S, B, C)
    s.length += s.live
