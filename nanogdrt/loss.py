"""Losses on per-token NLL: SFT (Eq. 1) and GDRT's group-DRO objective (Eq. 4; Lemma 1 = Eq. 5).

The data path is three visible steps, each a pure function of tensors (no models here):

    token_nll      hidden states -> NLL of each target token, logits only where they are needed
    group sums     NLL + group id per token -> per-group sums and counts  (all-reduce here for DDP)
    gdrt / sft     per-group mean losses L(g) -> Q = softmax(L / tau), loss = sum_g Q(g) L(g)

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


def sft_loss(nll: torch.Tensor, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Eq. 1: the mean NLL over all target tokens of the batch (BIGRec's objective).

    With `reduce_fn` (a differentiable all-reduce SUM across data-parallel ranks) the mean is
    over the tokens of the global batch: sum and count are reduced before the division, so a
    rank with fewer target tokens is not over-weighted (a mean of per-rank means would be)."""
    if reduce_fn is None:
        return nll.float().mean()
    total = reduce_fn(nll.float().sum())
    count = reduce_fn(torch.tensor(float(nll.numel()), device=nll.device))
    return total / count.clamp(min=1)


class GDRTLoss(NamedTuple):
    loss: torch.Tensor        # () sum_g Q(g) L(g), Q held constant in the backward (Eq. 5)
    group_loss: torch.Tensor  # (G,) L(g): mean NLL of the batch's tokens in group g (0 if absent)
    q: torch.Tensor           # (G,) Q(g) = softmax over present groups of L(g) / tau; 0 if absent
    counts: torch.Tensor      # (G,) number of tokens of each group in the batch


def group_sums_and_counts(nll: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """Per-group sum of NLL (differentiable) and token count, both float32 of shape (G,).

    This is where data parallelism plugs in: all-reduce (SUM) both results across ranks before
    `gdrt_from_sums`, and every rank gets the L(g) and Q(g) of the global batch. Use the
    autograd-aware `torch.distributed.nn.functional.all_reduce` for the sums: its backward sums
    the (identical) upstream gradients of the W ranks, and DDP's gradient averaging divides by
    W again, so the update equals that of one process on the whole batch. Counts need no grad.
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
    return sums, counts


def gdrt_from_sums(sums: torch.Tensor, counts: torch.Tensor, tau: float) -> GDRTLoss:
    """GDRT loss (Eq. 5) from per-group NLL sums and token counts (local or all-reduced).

    GDRT minimises the worst case over group weightings Q near uniform U (Eq. 4):

        max_Q  sum_g Q(g) L(g)   s.t.  KL(Q || U) <= eta.

    Lemma 1 (Eq. 5; its proof is Eq. 6-13) solves the inner max in closed form. Its dual, for the
    multiplier tau, is (up to terms free of the model parameters theta)

        F(theta) = tau * log sum_g exp(L(g) / tau)          (a smooth max over groups)

    whose gradient is

        dF/dtheta = sum_g [exp(L(g)/tau) / sum_h exp(L(h)/tau)] dL(g)/dtheta
                  = sum_g Q(g) dL(g)/dtheta,   Q = softmax(L / tau)   (Eq. 5).

    So the loss sum_g stopgrad(Q(g)) L(g) has exactly the gradient of F, and its value is the
    worst-case expected group loss that we log. tau -> inf gives Q -> U (mean of the group
    losses); tau -> 0 puts all weight on the worst group. Groups absent from the batch have no
    L(g): they get Q(g) = 0 and take no part in the softmax (no NaN, even for an empty batch).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    present = counts > 0
    group_loss = sums / counts.clamp(min=1)                    # (G,) L(g); 0 where absent
    scores = (group_loss.detach().float() / tau).masked_fill(~present, float("-inf"))
    q = torch.softmax(scores, dim=0)                            # Eq. 5, float32
    q = torch.where(present, q, torch.zeros_like(q))            # all-absent batch: NaN -> 0
    loss = (q * group_loss).sum()                               # Q constant in the backward
    return GDRTLoss(loss, group_loss.detach(), q, counts)


def gdrt_loss(nll: torch.Tensor, groups: torch.Tensor, n_groups: int, tau: float,
              reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GDRTLoss:
    """Eq. 5 on one batch. `reduce_fn`, if given, is applied to the per-group sums and counts
    (e.g. an all-reduce across data-parallel ranks; see `group_sums_and_counts`).

    Data parallel: with the sums and counts all-reduced before the softmax, N ranks that each
    hold a slice of a global batch get the same L(g), the same Q(g) and (after DDP's gradient
    average) the same update as one process on that whole batch; tests/test_distributed.py
    checks Q(g) step by step. Without the reduction each rank would weight its own groups."""
    sums, counts = group_sums_and_counts(nll, groups, n_groups)
    if reduce_fn is not None:
        sums, counts = reduce_fn(sums), reduce_fn(counts)
    return gdrt_from_sums(sums, counts, tau)
