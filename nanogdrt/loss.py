"""Losses on per-token NLL: SFT (Eq. 1) and GDRT's group-DRO objective (Eq. 4; Lemma 1 = Eq. 5).

The data path is three visible steps, each a pure function of tensors (no models here):

    token_nll      hidden states -> NLL of each target token, logits only where they are needed
    group totals   NLL + group id per token -> per-group sums and counts  (all-reduce here for DDP)
    gdrt / sft     L(g) = sums / counts -> Q = softmax(L / tau), loss = sum_g Q(g) L(g)  (Eq. 5)
                   or the token mean (Eq. 1)

train.py trains with `sft_loss` and `gdrt_loss` themselves, and so does every `--method`
(nanogdrt/baselines/methods.py): MSL's per-token losses go into the same two functions. A batch
split into micro-batches and data-parallel ranks passes each part its `scope`, the totals of
the whole batch, and the parts' losses add up to the whole batch's loss and gradient.

The baselines' losses (MSL's masked softmax, IFairLRS's reweighting) live in
`nanogdrt.baselines.msl` and `nanogdrt.baselines.reweight` and share `target_logits`' token order.

Group ids are 1..G as `nanogdrt.grouping` returns them (group 1 = the tokens most relevant to
the auxiliary tokens, i.e. the most context-biased ones).
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class TokenNLL(NamedTuple):
    nll: torch.Tensor    # (N,) float32 NLL of every target token, in row-major (b, t) order
    rows: torch.Tensor   # (N,) batch index b of each target token
    cols: torch.Tensor   # (N,) position t of each target token in input_ids


class TargetLogits(NamedTuple):
    logits: torch.Tensor   # (N, V) float32 logits predicting each target token
    targets: torch.Tensor  # (N,) the target token ids
    rows: torch.Tensor     # (N,) batch index b of each target token
    cols: torch.Tensor     # (N,) position t of each target token in input_ids


def target_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  input_ids: torch.Tensor, target_mask: torch.Tensor) -> TargetLogits:
    """The logits that predict each target token, in `target_mask.nonzero()` (row-major) order.

    The token at t is predicted by the hidden state at t - 1, so we gather those N hidden states
    and run the LM head on them only: (N, V) logits instead of (B, T, V). Every per-token loss
    (SFT's NLL, MSL's masked softmax) starts from here, so they all share one token order.
    """
    B, T, C = hidden.shape
    target_mask = target_mask.bool()
    if target_mask.shape != input_ids.shape or input_ids.shape != (B, T):
        raise ValueError(f"shapes differ: hidden {tuple(hidden.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}, target_mask {tuple(target_mask.shape)}")
    if bool(target_mask[:, 0].any()):
        raise ValueError("target_mask[:, 0] is set: the first token has no hidden state before it")
    rows, cols = target_mask.nonzero(as_tuple=True)             # (N,), (N,) row-major
    h = hidden[rows, cols - 1]                                  # (N, C): the state before each target
    logits = logits_fn(h).float()                               # (N, V), float32 for the softmax
    return TargetLogits(logits, input_ids[rows, cols], rows, cols)


def token_nll(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
              input_ids: torch.Tensor, target_mask: torch.Tensor) -> TokenNLL:
    """-log P(y_t | x, y_<t) for every target token (the summand of Eq. 1).

    logits_fn:   hidden (N, C) -> logits (N, V); pass `model.logits`.
    hidden:      (B, T, C) hidden states of `input_ids`.
    input_ids:   (B, T) prompt + target ids (padding anywhere outside the target).
    target_mask: (B, T) bool, True where input_ids[b, t] is a target token to be predicted.

    The order of the returned tokens is that of `target_mask.nonzero()`, so any (B, T)
    per-token tensor (e.g. group ids) lines up with `nll` as `tensor[target_mask]` or
    `tensor[rows, cols]`.
    """
    out = target_logits(logits_fn, hidden, input_ids, target_mask)
    nll = F.cross_entropy(out.logits, out.targets, reduction="none")  # (N,)
    return TokenNLL(nll, out.rows, out.cols)


def sft_loss(nll: torch.Tensor, scope_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Eq. 1: the mean NLL over the target tokens of a batch (BIGRec's objective).

    `scope_count`, if given, is the number of target tokens of the whole batch this loss is a
    part of (its *scope*: e.g. every micro-batch of an optimizer step on every data-parallel
    rank). The part then contributes sum(nll) / N_scope, and the parts of a scope sum to the
    scope's token mean: no rank or micro-batch with fewer tokens is over-weighted (a mean of
    per-part means would be). An empty batch gives 0 (it still backpropagates, as DDP needs)."""
    n = nll.numel() if scope_count is None else scope_count
    n = torch.as_tensor(n, dtype=torch.float32, device=nll.device)
    return nll.float().sum() / n.clamp(min=1)                   # Eq. 1


class GroupTotals(NamedTuple):
    """Per-group sums of the token losses and token counts over some tokens, (G,) float32 each.

    The totals of a batch are what Eq. 5 needs of it: L(g) = sums / counts. They add up over the
    parts of a batch (micro-batches, data-parallel ranks: `+`, `reduce`), which is how a batch
    split across micro-batches and ranks gets the L(g) and Q(g) of the whole."""
    sums: torch.Tensor
    counts: torch.Tensor

    def __add__(self, other):
        return GroupTotals(self.sums + other.sums, self.counts + other.counts)

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None):
        """All-reduced across data-parallel ranks (reduce_fn a SUM), or as is when None."""
        return self if reduce_fn is None else GroupTotals(reduce_fn(self.sums), reduce_fn(self.counts))

    def mean(self) -> torch.Tensor:
        """(G,) L(g): the mean loss of each group's tokens; 0 for a group without tokens."""
        return self.sums / self.counts.clamp(min=1)


class GDRTLoss(NamedTuple):
    loss: torch.Tensor        # () sum_g Q(g) L(g) (this part's share of it), Q constant in the backward (Eq. 5)
    group_loss: torch.Tensor  # (G,) L(g): mean NLL of the scope's tokens in group g (0 if absent)
    q: torch.Tensor           # (G,) Q(g) = softmax over present groups of L(g) / tau; 0 if absent
    counts: torch.Tensor      # (G,) number of tokens of each group in the scope


def group_sums_and_counts(nll: torch.Tensor, groups: torch.Tensor, n_groups: int) -> GroupTotals:
    """Per-group sum of NLL and token count, both float32 of shape (G,): the totals of these tokens.

    The sums keep the gradient of `nll` (detach it for a scope's constants). This is where data
    parallelism plugs in: all-reduce (SUM) the totals of each rank's tokens (`GroupTotals.reduce`)
    and every rank has the L(g) and Q(g) of the global batch.
    """
    groups = groups.long()
    if groups.shape != nll.shape:
        raise ValueError(f"groups {tuple(groups.shape)} and nll {tuple(nll.shape)} differ in shape")
    if groups.numel() and (int(groups.min()) < 1 or int(groups.max()) > n_groups):
        raise ValueError(f"group ids must lie in 1..{n_groups}, got {int(groups.min())}.."
                         f"{int(groups.max())}")
    idx = groups - 1                                            # 0-based for indexing
    sums = torch.zeros(n_groups, dtype=torch.float32, device=nll.device).index_add(0, idx, nll.float())
    counts = torch.zeros(n_groups, dtype=torch.float32, device=nll.device).index_add(
        0, idx, torch.ones_like(nll, dtype=torch.float32))
    return GroupTotals(sums, counts)


def group_weights(totals: GroupTotals, tau: float) -> torch.Tensor:
    """Q(g) = softmax over the present groups of L(g) / tau (Eq. 5), from a batch's totals. (G,)

    GDRT minimises the worst case over group weightings Q near uniform U (Eq. 4):

        max_Q  sum_g Q(g) L(g)   s.t.  KL(Q || U) <= eta.

    Lemma 1 (Eq. 5; its proof is Eq. 6-13) solves the inner max in closed form. Its dual, for the
    multiplier tau, is (up to terms free of the model parameters theta)

        F(theta) = tau * log sum_g exp(L(g) / tau)          (a smooth max over groups)

    whose gradient is

        dF/dtheta = sum_g [exp(L(g)/tau) / sum_h exp(L(h)/tau)] dL(g)/dtheta
                  = sum_g Q(g) dL(g)/dtheta,   Q = softmax(L / tau)   (Eq. 5).

    So the loss sum_g stopgrad(Q(g)) L(g) has exactly the gradient of F (the envelope theorem),
    and its value is the worst-case expected group loss that we log: Q is computed here from
    detached losses. tau -> inf gives Q -> U over the present groups (the mean of the group
    losses; tau = inf is exactly that); tau -> 0 puts all weight on the worst group. Groups
    absent from the batch have no L(g): they get Q(g) = 0 and take no part in the softmax (no
    NaN, even for an empty batch).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    present = totals.counts > 0
    scores = (totals.mean().detach().float() / tau).masked_fill(~present, float("-inf"))
    q = torch.softmax(scores, dim=0)                            # Eq. 5, float32
    return torch.where(present, q, torch.zeros_like(q))         # all-absent batch: NaN -> 0


def gdrt_loss(nll: torch.Tensor, groups: torch.Tensor, n_groups: int, tau: float,
              scope: GroupTotals | None = None) -> GDRTLoss:
    """Eq. 5 on the given tokens: sum_g Q(g) L(g), Q = softmax(L / tau) held constant.

    nll:    (N,) per-token loss with gradient (`token_nll(...).nll`, or MSL's per-token loss).
    groups: (N,) group 1..G of each token.
    scope:  the detached totals of the whole batch the weights come from, these tokens included
            (e.g. an optimizer step's micro-batches on every data-parallel rank); None: these
            tokens are the whole batch.

    With L(g) = S(g) / N(g), the loss is sum_g Q(g) S(g) / N(g) = sum_t c_t nll_t with the token
    weights c_t = Q(g_t) / N(g_t), constants from the scope. A part of the scope thus contributes
    its share, sum_{t in part} c_t nll_t, and the shares of the parts add up to the scope's loss
    and gradient: micro-batches and ranks train exactly like one big batch (tests/test_loss.py).
    """
    part = group_sums_and_counts(nll.detach(), groups, n_groups)   # also checks the group ids
    scope = part if scope is None else scope
    q = group_weights(scope, tau)                                   # (G,) constant
    c = (q / scope.counts.clamp(min=1))[groups.long() - 1]          # (N,) Q(g_t) / N(g_t)
    loss = (c * nll.float()).sum()                                  # Eq. 5
    return GDRTLoss(loss, scope.mean(), q, scope.counts)
