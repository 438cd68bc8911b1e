"""One optimizer step: forward and backward over its micro-batches, for every `--method`.

train.py's loop trains SFT and GDRT on one micro-batch in one process itself (collate -> token
NLL -> `loss.sft_loss` | `loss.gdrt_loss` -> backward). Everything else goes through `train_step`,
once per optimizer step, with the same two loss functions: the baselines (nanogdrt/baselines/
methods.py: which per-token loss, how the tokens are weighted), gradient accumulation,
data parallelism and the loss scope, the batch whose totals the weights come from:

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

from nanogdrt import loss
from nanogdrt.batches import collate
from nanogdrt.baselines.methods import GROUP_WEIGHTINGS, METHODS, method_loss
from nanogdrt.infra import distributed


class StepConfig(NamedTuple):
    """What a step minimises, and where: train.py's --method, --groups, --tau, --loss-scope, --device."""
    method: str                 # a key of METHODS
    n_groups: int               # G
    tau: float                  # Eq. 5's temperature
    loss_scope: str = "step"    # "step" | "micro" | "rank-micro"
    device: str = "cpu"


class StepData(NamedTuple):
    """What a training step reads per example, besides the token groups (which --regroup changes)."""
    examples: list                      # PromptIds of every training window
    nodes: list | None                  # MSL: trie node before each target token, per example
    example_weight: torch.Tensor | None  # Reweight: (n,) IFairLRS weight of each example
    pad_id: int


class MicroBatch(NamedTuple):
    """This rank's rows of a global micro-batch."""
    ids: torch.Tensor              # (B, T) prompt + target ids, right-padded
    mask: torch.Tensor             # (B, T) True at the target tokens
    groups: torch.Tensor           # (B, T) group 1..G of each target token, 0 elsewhere
    nodes: torch.Tensor | None     # (B, T) MSL: trie node before each target token
    weight: torch.Tensor | None    # (B,) Reweight: each example's weight


def micro_batch(data: StepData, token_groups, global_indices, device, dist) -> MicroBatch:
    """This rank's slice of a global micro-batch. A rank left without rows (a last batch shorter
    than the world) still runs a forward and backward with no target tokens: DDP and the
    all-reduces need every rank."""
    indices = dist.split_batch(global_indices)
    rows = indices or global_indices[:1]
    ids, mask, groups = collate(data.examples, token_groups, rows, data.pad_id, device)
    nodes = collate(data.examples, data.nodes, rows, data.pad_id, device)[2] if data.nodes else None
    if not indices:
        mask[:] = False
    weight = data.example_weight[rows] if data.example_weight is not None else None
    return MicroBatch(ids, mask, groups, nodes, weight)


def step_scope(module, parts: list[MicroBatch], cfg: StepConfig, reduce_fn) -> loss.GroupTotals:
    """--loss-scope step with several micro-batches: the totals of the whole step, every rank's
    micro-batches, before any backward. GDRT needs L(g): a no-grad pass sums them (LoRA dropout
    draws its own masks there: equal to one big batch only with dropout 0). A token mean needs
    the counts only, and they need no forward."""
    zero = torch.zeros(cfg.n_groups, device=cfg.device)
    total = loss.GroupTotals(zero, zero)
    for p in parts:
        if METHODS[cfg.method].weighting in GROUP_WEIGHTINGS:
            with torch.no_grad():
                per_token = module(p.ids, p.mask, p.nodes).nll
        else:
            per_token = torch.zeros(int(p.mask.sum()), device=cfg.device)
        total = total + loss.group_sums_and_counts(per_token, p.groups[p.mask], cfg.n_groups)
    return total.reduce(reduce_fn)


def train_step(net, micro_batches, data: StepData, token_groups, cfg: StepConfig,
               dist=distributed.Dist()) -> dict:
    """One optimizer step's worth of forward/backward over the micro-batches (grad accumulation).

    `net` is a TargetLoss, DDP-wrapped under data parallelism. Each micro-batch holds indices of
    the *global* batch; this rank takes its slice of it. The method's loss (`methods.method_loss`:
    `loss.gdrt_loss` or `loss.sft_loss`) weights each token by constants from the totals of its
    `cfg.loss_scope` (train.py --loss-scope):
      step        totals over every micro-batch of every rank (`step_scope`): the loss (and GDRT's
                  Q) of the whole step's batch; one micro-batch uses the totals of its own forward.
      micro       totals over the micro-batch on all ranks; the step averages the micro-batches.
      rank-micro  totals over this rank's micro-batch only (HF-Trainer-style); DDP averages ranks.
    Returns what is logged, the same on every rank: the loss, L(g) over all the step's tokens (0
    for a group without tokens), Q(g) (step: the step's; otherwise the mean over micro-batches
    and ranks; 0 for methods without group weights)."""
    ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
    method, G, K, W = METHODS[cfg.method], cfg.n_groups, len(micro_batches), dist.world
    reduce_fn = dist.all_reduce_sum if dist.enabled else None
    parts = [micro_batch(data, token_groups, b, cfg.device, dist) for b in micro_batches]
    whole = None                          # scope "step" with one micro-batch: from its forward
    if cfg.loss_scope == "step" and K > 1:
        whole = step_scope(ddp.module if ddp is not None else net, parts, cfg, reduce_fn)
    # The backward value of each rank: DDP averages the ranks' gradients, so a loss that is a sum
    # over ranks (scopes step and micro) is scaled by W; micro-batches are averaged except in step.
    scale = {"step": W, "micro": W / K, "rank-micro": 1 / K}[cfg.loss_scope]
    loss_sum, q_sum = torch.zeros((), device=cfg.device), torch.zeros(G, device=cfg.device)
    pooled = loss.GroupTotals(torch.zeros(G, device=cfg.device), torch.zeros(G, device=cfg.device))
    for k, p in enumerate(parts):
        # Gradients are all-reduced once per optimizer step, at the last micro-batch.
        with (ddp.no_sync() if ddp is not None and k < K - 1 else contextlib.nullcontext()):
            tokens = net(p.ids, p.mask, p.nodes)                          # (N,) this rank's target tokens
            token_group = p.groups[p.mask]                                # (N,) 1..G
            mine = loss.group_sums_and_counts(tokens.nll.detach(), token_group, G)
            if whole is not None:
                scope = whole
            else:
                scope = mine if cfg.loss_scope == "rank-micro" else mine.reduce(reduce_fn)
            out = method_loss(method.weighting, tokens, token_group, p.weight, scope, cfg.tau)
            (out.loss * scale).backward()
        loss_sum += out.loss.detach() * scale
        if out.q is not None:
            q_sum += out.q / K
        pooled = pooled + mine                  # per-group losses are logged for every method (Fig. 6)
    pooled = pooled.reduce(reduce_fn)
    loss_sum = loss_sum if reduce_fn is None else reduce_fn(loss_sum)
    if cfg.loss_scope == "rank-micro" and reduce_fn is not None:
        q_sum = reduce_fn(q_sum) / W                        # each rank had its own Q: log their mean
    return {"loss": loss_sum.item() / W, "q": q_sum.cpu(), "group_loss": pooled.mean().cpu()}
