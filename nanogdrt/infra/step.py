"""One optimizer step: forward and backward over its micro-batches, for every `--method`.

train.py's loop calls `train_step` once per optimizer step, then clips and steps the optimizer.
What happens inside depends on the method (nanogdrt/baselines/methods.py: which per-token loss, how the
tokens are weighted) and on the loss scope, the batch whose totals the weights come from:

    step        the whole optimizer step, every micro-batch of every rank (default): batch 4 x
                accum 32 on one GPU and 4 x 4 x 8 ranks give the same Q(g) and update
    micro       each micro-batch across the ranks, averaged over the accumulation
    rank-micro  each rank's own micro-batch, as HF-Trainer implementations of Group DRO do

Under data parallelism (torchrun) every rank runs this with the same global micro-batches and
takes its own slice (`micro_batch`); sums and counts are all-reduced, so every rank logs the same
numbers and DDP averages the LoRA gradients once, at the step's last micro-batch.
"""

import contextlib
from typing import NamedTuple

import torch

from nanogdrt.infra import distributed
from nanogdrt.batches import collate
from nanogdrt.baselines.methods import GROUP_WEIGHTINGS, METHODS, Totals, group_weights, method_loss, totals


class StepData(NamedTuple):
    """What a training step reads per example, besides the token groups (which --regroup changes)."""
    examples: list                      # PromptIds of every training window
    nodes: list | None                  # MSL: trie node before each target token, per example
    example_weight: torch.Tensor | None  # Reweight: (n,) IFairLRS weight of each example
    pad_id: int


def micro_batch(data, token_groups, global_indices, device, dist):
    """This rank's slice of a global micro-batch: ids, target mask, token groups, trie nodes and
    example weights. A rank left without rows (a last batch shorter than the world) still runs a
    forward and backward with no target tokens: DDP and the all-reduces need every rank."""
    indices = dist.split_batch(global_indices)
    rows = indices or global_indices[:1]
    ids, mask, groups = collate(data.examples, token_groups, rows, data.pad_id, device)
    nodes = collate(data.examples, data.nodes, rows, data.pad_id, device)[2] if data.nodes else None
    if not indices:
        mask[:] = False
    weight = data.example_weight[rows] if data.example_weight is not None else None
    return ids, mask, groups, nodes, weight


def train_step(net, micro_batches, data: StepData, token_groups, method: str, n_groups: int, tau: float,
               loss_scope: str = "step", device="cpu", dist=distributed.Dist()) -> dict:
    """One optimizer step's worth of forward/backward over the micro-batches (grad accumulation).

    `net` is a TargetLoss, DDP-wrapped under data parallelism. Each micro-batch holds indices of
    the *global* batch; this rank takes its slice of it. The method's loss (nanogdrt.baselines.methods)
    weights each token by constants from the totals of its `loss_scope` (train.py --loss-scope):
      step        totals over every micro-batch of every rank: the loss (and GDRT's Q) of the
                  whole step's batch. GDRT needs L(g) before any backward, so with more than one
                  micro-batch a no-grad pass sums them first (LoRA dropout draws its own masks
                  there: equal to one big batch only with dropout 0); one micro-batch uses the
                  detached sums of its own forward. Token counts need no forward.
      micro       totals over the micro-batch on all ranks; the step averages the micro-batches.
      rank-micro  totals over this rank's micro-batch only (HF-Trainer-style); DDP averages ranks.
    Returns what is logged, the same on every rank: the loss, L(g) over all the step's tokens (0
    for a group without tokens), Q(g) (step: the step's; otherwise the mean over micro-batches
    and ranks; 0 for methods without group weights)."""
    ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
    module = ddp.module if ddp is not None else net
    method, G, K, W = METHODS[method], n_groups, len(micro_batches), dist.world
    reduce_fn = dist.all_reduce_sum if dist.enabled else None
    parts = [micro_batch(data, token_groups, b, device, dist) for b in micro_batches]
    step_totals = None                                      # scope "step" with one micro-batch: from its forward
    if loss_scope == "step" and K > 1:
        zero = torch.zeros(G, device=device)
        if method.weighting == "groups":
            with torch.no_grad():                           # the pass for L(g): sums and counts of the step
                step_totals = sum((totals(module(ids, mask, nodes).nll, groups[mask], G)
                                   for ids, mask, groups, nodes, _ in parts), Totals(zero, zero))
        else:                                               # a token mean needs the counts only
            step_totals = sum((totals(torch.zeros(int(mask.sum()), device=device), groups[mask], G)
                               for _, mask, groups, _, _ in parts), Totals(zero, zero))
        step_totals = step_totals.reduce(reduce_fn)
    # The backward value of each rank: DDP averages the ranks' gradients, so a loss that is a sum
    # over ranks (scopes step and micro) is scaled by W; micro-batches are averaged except in step.
    scale = {"step": W, "micro": W / K, "rank-micro": 1 / K}[loss_scope]
    loss_sum, q_sum = torch.zeros((), device=device), torch.zeros(G, device=device)
    pooled = Totals(torch.zeros(G, device=device), torch.zeros(G, device=device))
    for k, (ids, mask, groups, nodes, weight) in enumerate(parts):
        # Gradients are all-reduced once per optimizer step, at the last micro-batch.
        with (ddp.no_sync() if ddp is not None and k < K - 1 else contextlib.nullcontext()):
            out = net(ids, mask, nodes)                                 # (N,) this rank's target tokens
            token_group = groups[mask]                                  # (N,) 1..G
            mine = totals(out.nll, token_group, G)
            if step_totals is not None:
                scope = step_totals
            else:
                scope = mine if loss_scope == "rank-micro" else mine.reduce(reduce_fn)
            loss = method_loss(method.weighting, out.nll, token_group, out.rows, weight, scope, tau)
            if not torch.isfinite(loss):   # stop before a NaN reaches the LoRA weights
                raise FloatingPointError(f"loss is {loss.item()}")
            (loss * scale).backward()
        loss_sum += loss.detach() * scale
        if method.weighting in GROUP_WEIGHTINGS:
            q_sum += group_weights(scope, tau, method.weighting) / K
        pooled = pooled + mine                  # per-group losses are logged for every method (Fig. 6)
    pooled = pooled.reduce(reduce_fn)
    loss_sum = loss_sum if reduce_fn is None else reduce_fn(loss_sum)
    if loss_scope == "rank-micro" and reduce_fn is not None:
        q_sum = reduce_fn(q_sum) / W                        # each rank had its own Q: log their mean
    return {"loss": loss_sum.item() / W, "q": q_sum.cpu(),
            "group_loss": (pooled.sums / pooled.counts.clamp(min=1)).cpu()}
