"""The training objective of each `--method`: which per-token loss, and how tokens are weighted.

    method      per-token loss                       weight c_t of token t (sum_t c_t l_t)
    sft         NLL (Eq. 1)                          1 / N
    gdrt        NLL                                  Q(g_t) / N_{g_t},  Q = softmax(L(g) / tau)   (Eq. 5)
    msl         MSL's masked softmax at tau_msl      1 / N
    msl+gdrt    MSL's masked softmax                 Q(g_t) / N_{g_t}
    reweight    NLL                                  w_{b(t)} / N  (IFairLRS's weight of the example)
    group-mean  NLL                                  (1 / G') / N_{g_t}  (G' = groups present)

`group-mean` is our control, not the paper's: GDRT's token groups with the worst case taken out,
i.e. Q fixed uniform (the tau -> inf limit of Eq. 5), so every group's mean loss counts equally.
Against SFT's token mean it tests the grouping and equal group weights; against GDRT, the
group-DRO weighting itself.

N, N_g and L(g) = S_g / N_g (S_g the sum of group g's token losses) are totals over the batch
the loss is defined on, its *scope*: the whole optimizer step (every micro-batch of every rank),
one micro-batch across ranks, or one rank's micro-batch (see `train.py --loss-scope`). The
totals are plain numbers in the backward: for GDRT that is Q held constant, whose gradient
sum_g Q(g)/N_g grad S_g is the gradient of the smooth max tau log sum_g exp(L(g)/tau) (the
envelope theorem; `loss.gdrt_from_sums` derives it), so `method_loss` over one batch equals
`loss.gdrt_loss` in value and gradient. Because the totals enter only as constants, a batch
split into micro-batches and ranks gives the same sum as one forward over all of it.

The per-token losses are `loss.token_nll` and `msl.msl_token_loss`; the weights of
Reweight are `reweight.reweight_group_weights` over the item groups of Eq. 2.
"""

from typing import NamedTuple

import torch

from nanogdrt import loss
from nanogdrt.baselines import msl, reweight


class Method(NamedTuple):
    per_token: str   # "nll" | "msl"
    weighting: str   # "mean" | "groups" | "examples"


METHODS = {
    "sft": Method("nll", "mean"),
    "gdrt": Method("nll", "groups"),
    "msl": Method("msl", "mean"),
    "msl+gdrt": Method("msl", "groups"),
    "reweight": Method("nll", "examples"),
    "group-mean": Method("nll", "uniform-groups"),
}
GROUP_WEIGHTINGS = ("groups", "uniform-groups")   # the weightings that weight each group's mean loss


class TargetLoss(torch.nn.Module):
    """The model up to the per-token loss of each target token: the forward that DDP wraps (DDP
    hooks a module's forward to know which backward it must synchronise).

    `trie` and `tau_msl` are needed by MSL only: `nodes` (B, T) then holds, at each target
    position, the trie node before that token (`target_nodes_of`), zeros elsewhere."""

    def __init__(self, model, per_token="nll", trie=None, tau_msl=1.0):
        super().__init__()
        self.model, self.per_token, self.trie, self.tau_msl = model, per_token, trie, tau_msl

    def forward(self, ids, target_mask, nodes=None) -> loss.TokenNLL:
        hidden = self.model.hidden_states(ids)                          # right padding: no mask needed
        if self.per_token == "nll":
            return loss.token_nll(self.model.logits, hidden, ids, target_mask)   # (N,) target tokens only
        node = nodes[target_mask]                                       # (N,)
        if node.numel():
            allowed = self.trie.allowed(node)                           # (N, K) MSL's allowed sets A_t
            tokens, mask = allowed.tokens, allowed.mask
        else:   # a data-parallel rank without rows in this micro-batch: no allowed set to look up
            tokens = torch.zeros(0, 1, dtype=torch.long, device=ids.device)
            mask = tokens.bool()
        return msl.msl_token_loss(self.model.logits, hidden, ids, target_mask, tokens, mask,
                                              self.tau_msl)


class Totals(NamedTuple):
    """Per-group sums of the token losses (detached) and token counts over a scope, (G,) each."""
    sums: torch.Tensor
    counts: torch.Tensor

    def __add__(self, other):
        return Totals(self.sums + other.sums, self.counts + other.counts)

    def reduce(self, reduce_fn):
        """All-reduced across ranks (reduce_fn a SUM), or as is when reduce_fn is None."""
        return self if reduce_fn is None else Totals(reduce_fn(self.sums), reduce_fn(self.counts))


def totals(per_token: torch.Tensor, token_group: torch.Tensor, n_groups: int) -> Totals:
    """(N,) token losses and their groups 1..G -> the Totals of these tokens (no gradient)."""
    sums, counts = loss.group_sums_and_counts(per_token.detach(), token_group, n_groups)
    return Totals(sums, counts)


def group_weights(t: Totals, tau: float, weighting: str = "groups") -> torch.Tensor:
    """Q(g) = softmax over the present groups of L(g) / tau (Eq. 5), or 1 / G' for "uniform-groups"
    (G' groups present); 0 for an absent group. (G,)"""
    if weighting == "uniform-groups":
        present = (t.counts > 0).float()
        return present / present.sum().clamp(min=1)
    return loss.gdrt_from_sums(t.sums, t.counts, tau).q


def method_loss(weighting: str, per_token: torch.Tensor, token_group: torch.Tensor, rows: torch.Tensor,
                example_weight: torch.Tensor | None, scope: Totals, tau: float) -> torch.Tensor:
    """sum_t c_t l_t over the tokens given (a part of the scope), c_t as in the table above.

    per_token:      (N,) loss of each target token, with gradient.
    token_group:    (N,) group 1..G of each token.
    rows:           (N,) batch row of each token (to find its example's weight).
    example_weight: (B,) weight of each example of the micro-batch (reweight only).
    scope:          the Totals over the whole scope (this part included), held constant.
    Summing this over every part of the scope gives the scope's loss: sum_g Q(g) L(g) for the
    group weightings, the (weighted) token mean for the others."""
    n = scope.counts.sum().clamp(min=1)
    if weighting == "mean":
        return per_token.float().sum() / n                                     # Eq. 1
    if weighting == "examples":
        w = example_weight.to(per_token.device, torch.float32)[rows]           # (N,)
        return (w * per_token.float()).sum() / n
    if weighting in GROUP_WEIGHTINGS:
        q = group_weights(scope, tau, weighting)                               # (G,) constant
        c = (q / scope.counts.clamp(min=1))[token_group - 1]                   # (N,) Q(g_t) / N_{g_t}
        return (c * per_token.float()).sum()                                   # Eq. 5
    raise ValueError(f"unknown weighting {weighting!r}")


# ----------------------------------------------------------------------------- set-up, once per run

def target_nodes_of(trie, examples) -> list[torch.Tensor]:
    """For MSL: the trie node before each target token of every example (`trie.prefix_nodes`),
    one (n_targets,) tensor per example, shaped like the token groups so `collate` places them.
    Computed once: a target that is not a catalogue title fails here, before training."""
    out = []
    for k, ex in enumerate(examples):
        s, e = ex.target
        try:
            out.append(torch.tensor(trie.prefix_nodes(ex.ids[s:e]), dtype=torch.long))
        except ValueError as err:
            raise ValueError(f"training example {k}: {err}") from None
    return out


def single_continuation_share(trie, nodes: list[torch.Tensor]) -> float:
    """Share of target positions whose allowed set holds one token (MSL's loss is 0 there)."""
    n = torch.cat(nodes).to(trie.child_ptr.device)
    return float(((trie.child_ptr[n + 1] - trie.child_ptr[n]) == 1).float().mean())


def reweight_example_weights(train, item_group, n_groups, power) -> tuple[torch.Tensor, torch.Tensor]:
    """IFairLRS's (G,) group weights and (n,) example weights over the training windows `train`."""
    w = reweight.reweight_group_weights([x.history for x in train], [x.target for x in train],
                                               item_group, n_groups, power)
    return w, reweight.reweight_example_weights([x.target for x in train], item_group, w)
