"""DPO on catalogue titles (Rafailov et al., NeurIPS 2023, "Direct Preference Optimization"):
the preference step of SPRec [22] (nanogdrt/baselines/sprec.py).

For a prompt x, a chosen title y_w (the user's true next item) and a rejected one y_l (SPRec: a
title the model itself ranks first), a policy pi (the model being trained) and a frozen
reference pi_ref, DPO minimises (the paper's Eq. 7)

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

averaged over the pairs of a batch. The bracket is the *margin*: the implicit reward of y_w,
beta (log pi - log pi_ref)(y_w), minus that of y_l. Its gradient (Eq. 8) is

    dL/dtheta = -beta * sigmoid(-beta * margin) * (d log pi(y_w|x) - d log pi(y_l|x)) / dtheta:

it raises the chosen title and lowers the rejected one, most where the policy still ranks them
wrongly. log pi(y|x) is the *sum* of the token log-probabilities of the title (our target span:
the quoted title + EOS, `PromptBuilder.target_ids`), not their mean, as trl's DPOTrainer computes
it (`get_batch_logps` sums over the completion; only loss_type "ipo" divides by its length).

Reference: RegionCh/SPRec, `train/dpo.py` (commit ad60171; line numbers of that file) runs trl
0.9.2's DPOTrainer (requirements.txt) with beta = 0.1 (L126), trl's default loss "sigmoid" (the
loss above, no label smoothing), the reference model passed explicitly (L93-102): the base model
with the adapter the DPO phase starts from, i.e. `--resume_from_checkpoint`, which
`shell/SPRec.sh` sets to this iteration's SFT adapter (SPRec.sh L67, L81). trl's DPOConfig
disables dropout in the policy and the reference (disable_dropout = True).

The reference is frozen for the whole DPO phase and dropout is off, so its log-probabilities of
the fixed pairs are constants: `reference_log_probs` computes them once, with no gradient, before
the phase's first step, under the same weights the policy starts from (no second model in memory;
trl's `precompute_ref_log_probs` does the same). `dpo_loss` detaches them whatever it is given.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanogdrt.batches import collate
from nanogdrt.loss import TokenNLL

BETA = 0.1    # SPRec's train/dpo.py L126 (trl's default too)


class DPOLoss(NamedTuple):
    loss: torch.Tensor      # () the mean of Eq. 7 over the pairs, with gradient
    margin: torch.Tensor    # (B,) (pi_w - ref_w) - (pi_l - ref_l), detached
    chosen_reward: torch.Tensor    # (B,) beta (pi_w - ref_w), detached (trl's rewards/chosen)
    rejected_reward: torch.Tensor  # (B,) beta (pi_l - ref_l), detached (trl's rewards/rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = BETA) -> DPOLoss:
    """Eq. 7 averaged over B pairs. All four are (B,) summed title log-probabilities; the
    reference's are detached here, so no gradient ever reaches the reference."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected four (B,) tensors of one shape, got {sorted(shapes)}")
    chosen = policy_chosen.float() - ref_chosen.detach().float()          # log pi/pi_ref (y_w)
    rejected = policy_rejected.float() - ref_rejected.detach().float()    # log pi/pi_ref (y_l)
    margin = chosen - rejected
    loss = -F.logsigmoid(beta * margin).mean()                            # Eq. 7
    return DPOLoss(loss, margin.detach(), beta * chosen.detach(), beta * rejected.detach())


def title_log_probs(tokens: TokenNLL, n_rows: int) -> torch.Tensor:
    """(n_rows,) log pi(y|x) of each row: minus the sum of its target tokens' NLL (with gradient)."""
    total = torch.zeros(n_rows, dtype=tokens.nll.dtype, device=tokens.nll.device)
    return -total.index_add(0, tokens.rows, tokens.nll)


def pair_log_probs(net, chosen: list, rejected: list, indices: list[int], pad_id: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed title log-probabilities of pairs `indices` under `net` (a methods.TargetLoss):
    chosen[i] and rejected[i] are PromptIds of one prompt with two titles. Both halves go through
    one forward, chosen rows first (trl's concatenated_forward). Returns two (B,) tensors."""
    n = len(chosen)
    examples, rows = chosen + rejected, list(indices) + [n + i for i in indices]
    ids, mask, _ = collate(examples, [0] * len(examples), rows, pad_id, device)   # (2B, T); no groups
    logp = title_log_probs(net(ids, mask), len(rows))                             # (2B,)
    return logp[:len(indices)], logp[len(indices):]


@torch.no_grad()
def reference_log_probs(net, chosen: list, rejected: list, batch_size: int, pad_id: int,
                        device) -> torch.Tensor:
    """(n, 2) log pi_ref(y_w|x), log pi_ref(y_l|x) of every pair, under `net` as it is now (the
    frozen reference), with no gradient and no dropout (the model is put in eval mode and back)."""
    model = net.model
    was_training = model.training
    model.eval()
    try:
        parts = [torch.stack(pair_log_probs(net, chosen, rejected, list(range(s, min(s + batch_size, len(chosen)))),
                                            pad_id, device), dim=1)
                 for s in range(0, len(chosen), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).float() if parts else torch.zeros(0, 2)
