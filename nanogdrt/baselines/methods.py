"""The training objective of each `--method`: which per-token loss, and how tokens are weighted.

    method      per-token loss                       weight c_t of token t (sum_t c_t l_t)
    sft         NLL (Eq. 1)                          1 / N
    gdrt        NLL                                  Q(g_t) / N_{g_t},  Q = softmax(L(g) / tau)   (Eq. 5)
    msl         MSL's masked softmax at tau_msl      1 / N
    msl+gdrt    MSL's masked softmax                 Q(g_t) / N_{g_t}
    reweight    NLL                                  w_{b(t)} / N  (IFairLRS's weight of the example)
    group-mean  NLL                                  (1 / G') / N_{g_t}  (G' = groups present)
    cft         CFT's l_t (two forwards, cft.py)     1 / N  (= CFT's weighted mean: l_t carries w_t / w_bar)
    llara       NLL, LLaRA's hybrid prompt (llara.py)  1 / N
    llara+gdrt  NLL, LLaRA's hybrid prompt             Q(g_t) / N_{g_t}

`group-mean` is our control, not the paper's: GDRT's token groups with the worst case taken out,
i.e. Q fixed uniform (the tau -> inf limit of Eq. 5), so every group's mean loss counts equally.
Against SFT's token mean it tests the grouping and equal group weights; against GDRT, the
group-DRO weighting itself.

N, N_g and L(g) = S_g / N_g (S_g the sum of group g's token losses) are totals over the batch
the loss is defined on, its *scope*: the whole optimizer step (every micro-batch of every rank),
one micro-batch across ranks, or one rank's micro-batch (see `train.py --loss-scope`). The
totals are plain numbers in the backward: for GDRT that is Q held constant, whose gradient
sum_g Q(g)/N_g grad S_g is the gradient of the smooth max tau log sum_g exp(L(g)/tau) (the
envelope theorem; `loss.group_weights` derives it). Because the totals enter only as
constants, a batch split into micro-batches and ranks gives the same sum as one forward over
all of it. Every weighting is computed by `loss.gdrt_loss` or `loss.sft_loss` (`method_loss`):
no method has its own copy of Eq. 1 or Eq. 5.

The per-token losses are `loss.token_nll`, `msl.msl_token_loss` and `cft.cft_token_loss` (its
token mean is CFT's position-weighted mean: cft.py); the weights of Reweight are
`reweight.reweight_group_weights` over item groups: IFairLRS's popularity groups (the default,
`train.py --reweight-groups popularity`) or the Eq. 2 groups of the metrics (our v2 variant).
"""

import math
from typing import NamedTuple

import torch

from nanogdrt import loss
from nanogdrt.baselines import cft, msl, reweight


class Method(NamedTuple):
    per_token: str   # "nll" | "msl" | "cft"
    weighting: str   # "mean" | "groups" | "examples"


METHODS = {
    "sft": Method("nll", "mean"),
    "gdrt": Method("nll", "groups"),
    "msl": Method("msl", "mean"),
    "msl+gdrt": Method("msl", "groups"),
    "reweight": Method("nll", "examples"),
    "group-mean": Method("nll", "uniform-groups"),
    "cft": Method("cft", "mean"),
    "llara": Method("nll", "mean"),          # the input differs (item slots): llara.LLaRALoss, not TargetLoss
    "llara+gdrt": Method("nll", "groups"),
}
GROUP_WEIGHTINGS = ("groups", "uniform-groups")   # the weightings that weight each group's mean loss


class TargetLoss(torch.nn.Module):
    """The model up to the per-token loss of each target token: the forward that DDP wraps (DDP
    hooks a module's forward to know which backward it must synchronise).

    `trie` and `tau_msl` are needed by MSL only: `nodes` (B, T) then holds, at each target
    position, the trie node before that token (`target_nodes_of`), zeros elsewhere.
    `counterfactual_prompt` (P,) is needed by CFT only (`cft.counterfactual_prompt`): both of
    CFT's forwards run inside this one, so that DDP sees one forward per backward."""

    def __init__(self, model, per_token="nll", trie=None, tau_msl=1.0, counterfactual_prompt=None):
        super().__init__()
        self.model, self.per_token, self.trie, self.tau_msl = model, per_token, trie, tau_msl
        self.counterfactual_prompt = counterfactual_prompt

    def forward(self, ids, target_mask, nodes=None) -> loss.TokenNLL:
        if self.per_token == "cft":
            return cft.cft_token_loss(self.model, ids, target_mask, self.counterfactual_prompt)
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


class MethodLoss(NamedTuple):
    loss: torch.Tensor     # () this part's share of its scope's loss, with gradient
    q: torch.Tensor | None  # (G,) Q(g) of the scope for the group weightings; None for the others


def method_loss(weighting: str, tokens: loss.TokenNLL, token_group: torch.Tensor,
                example_weight: torch.Tensor | None, scope: loss.GroupTotals, tau: float) -> MethodLoss:
    """sum_t c_t l_t over the tokens given (a part of the scope), c_t as in the table above:
    always `loss.gdrt_loss` or `loss.sft_loss`, the functions train.py's plain loop calls.

    tokens:         per-token loss (N,) with gradient, and the batch row of each token.
    token_group:    (N,) group 1..G of each token.
    example_weight: (B,) weight of each example of the micro-batch (reweight only).
    scope:          the detached GroupTotals over the whole scope (this part included).
    Summing this over every part of the scope gives the scope's loss: sum_g Q(g) L(g) for the
    group weightings, the (weighted) token mean for the others."""
    if weighting in GROUP_WEIGHTINGS:   # group-mean: Eq. 5 at tau = inf, Q uniform over the present groups
        t = tau if weighting == "groups" else math.inf
        out = loss.gdrt_loss(tokens.nll, token_group, len(scope.counts), t, scope)     # Eq. 5
        return MethodLoss(out.loss, out.q)
    n = scope.counts.sum()
    if weighting == "mean":
        return MethodLoss(loss.sft_loss(tokens.nll, n), None)                          # Eq. 1
    if weighting == "examples":   # IFairLRS: each token carries its example's weight w_b(t)
        return MethodLoss(reweight.reweight_loss(tokens.nll, tokens.rows, example_weight, n), None)
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
