"""Reweight [30], a baseline of Table 2.

Reweight (IFairLRS, Jiang et al., WWW 2024; the in-learning part). Each training example is
weighted by the item group g of its target,

    w_g = (share of group g among the history items of all training examples)
        / (share of group g among the training targets),

so groups that are targets more often than users interacted with them weigh less, pulling the
learned group distribution towards the history distribution (what MGU/DGU measure).

The groups are IFairLRS's popularity groups (grouping.popularity_groups, over the dataset's whole
training file; `train.py --reweight-groups popularity`, the default). `--reweight-groups eq2` uses
the Eq. 2 groups of MGU/DGU instead: our earlier variant, kept as a labelled extra; it makes Reweight
nearly SFT on Toy (its weights are close to 1) and judges it with the groups it was weighted by.
"""

from typing import Mapping, Sequence

import torch

from nanogdrt.loss import sft_loss


def _group_counts(item_ids, item_group: Mapping[int, int], n_groups: int) -> torch.Tensor:
    counts = torch.zeros(n_groups, dtype=torch.float64)
    for i in item_ids:
        g = int(item_group[i])
        if not 1 <= g <= n_groups:
            raise ValueError(f"item {i} has group {g}, outside 1..{n_groups}")
        counts[g - 1] += 1
    return counts


def reweight_group_weights(histories: Sequence[Sequence[int]], targets: Sequence[int],
                           item_group: Mapping[int, int], n_groups: int, power: float = 1.0) -> torch.Tensor:
    """IFairLRS's weight of each item group, (G,) float32, from the training examples.

    histories: the history item ids of each training example (windows overlap, so an item is
               counted once per example it appears in, as IFairLRS counts).
    targets:   the target item id of each training example.
    item_group: item id -> group 1..G (popularity groups in IFairLRS; any item grouping works).
    power:     strength, w_g ** power. IFairLRS defines no knob: power = 1 is its weight,
               power = 0 gives uniform weights (plain SFT), values between interpolate.

    A group that no target falls in gets weight 0 (no example uses it). A group that targets
    fall in but no history does also gets 0: those examples drop out, as in IFairLRS. The mean
    weight over the training examples is sum_g H_g / H over the groups with targets, i.e. 1
    when every history group is also a target group: the loss keeps SFT's scale.
    """
    if not targets:
        raise ValueError("no training targets to compute group weights from")
    hist = _group_counts((i for h in histories for i in h), item_group, n_groups)   # (G,)
    targ = _group_counts(targets, item_group, n_groups)                            # (G,)
    if hist.sum() == 0:
        raise ValueError("the training histories are all empty")
    ratio = (hist / hist.sum()) / (targ / targ.sum()).clamp(min=1e-300)            # share_H / share_T
    w = torch.where(targ > 0, ratio ** power, torch.zeros_like(ratio))
    return w.float()


def reweight_example_weights(targets: Sequence[int], item_group: Mapping[int, int],
                             group_weights: torch.Tensor) -> torch.Tensor:
    """(n,) weight of each example = the weight of its target's group (computed once)."""
    groups = torch.tensor([int(item_group[t]) for t in targets], dtype=torch.long)
    return group_weights[groups - 1]


def reweight_loss(nll: torch.Tensor, rows: torch.Tensor, example_weights: torch.Tensor,
                  scope_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """IFairLRS's weighted loss: every target token carries its example's weight, mean over tokens.

    nll:             (N,) per-token NLL (`token_nll(...).nll`).
    rows:            (N,) batch row of each token (`token_nll(...).rows`).
    example_weights: (B,) weight of each example of the batch.
    scope_count:     as in `loss.sft_loss`: the token count of the whole batch this is a part of.

        loss = sum_t w_{b(t)} nll_t / N

    divided by the token count, not by the sum of weights: with all weights 1 this is SFT's
    token mean (`loss.sft_loss`, which computes it) exactly. IFairLRS's code multiplies a
    micro-batch's mean token loss by its examples' weights and averages, i.e. mean(w) * mean(nll)
    over the micro-batch, which is this loss when a micro-batch holds one example; with several
    examples their weights would be averaged before meeting any token, which we do not copy.
    """
    if rows.shape != nll.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and nll {tuple(nll.shape)} differ in shape")
    weighted = example_weights.to(nll.device, torch.float32)[rows] * nll.float()    # (N,)
    return sft_loss(weighted, scope_count)
