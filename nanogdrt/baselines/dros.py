"""DROS [75] (Yang et al., SIGIR 2023, "A Generic Learning Framework for Sequential Recommendation
with Distribution Shifts"), a baseline of Table 2: a distributionally robust term added to a
sequential recommender's own loss. Here the recommender is our SASRec (`sasrec.py --loss dros`).

Reference: YangZhengyi98/DROS, `SASRec_bce.py` (commit d928acd; line numbers of that file):

    w_j = ((c_j + 1) / sum_k (c_k + 1)) ** 0.05        c_j = times item j is a training target (L330-342)
    R(u) = log sum_{j in catalogue} exp(w_j (s_uj - y_uj)^2 / beta)                      (L428-440)
    loss = base + alpha * mean_u R(u)                  alpha = 0 skips R altogether      (L441-444)

s_uj is the raw score (logit) of item j after u's history, no sigmoid; y_uj = 1 for u's next item
and 0 for every other item of the catalogue (history items are not masked; padding is not a
column). The code writes the sum as sum_j exp(w_j s_uj^2 / beta) - exp(w_t s_ut^2 / beta) +
exp(w_t (s_ut - 1)^2 / beta) for the target t, which is the same sum; it adds 1e-24 inside the log
(a no-op: every term is >= 1). Its defaults are alpha = 0 (L48: the term is off), beta = 1.0 (L50);
`base` is BCEWithLogits over one positive and one uniform negative per sequence (L416-425).

R has the form of the dual of a KL-constrained worst case, log E_P0[exp(loss / beta)], with the
nominal P0 uniform over the catalogue (a sum instead of a mean: a constant log N) and the loss
w_j (s_uj - y_uj)^2: the worst case tilts towards the items with the largest weighted errors. A
larger beta (a smaller robust radius) is closer to the plain mean error, a smaller one to the
max. w scales each item's error, not its probability: power 0.05 makes it nearly flat (for
N = 2,000 items with uniform counts, w = 2000 ** -0.05 = 0.68; a 100 times more frequent item
gets 100 ** 0.05 = 1.26 times that), so popular items' errors count slightly more.

Where we depart from the code (docs/baselines.md has the full table):
* The backbone and base loss are our SASRec's (`--loss bce`: pmixer's network, tied item
  embeddings as the output layer, negatives outside the window), so DROS differs from the SASRec
  row by R alone. The base is pmixer's mean over positives + mean over negatives, twice the code's
  BCEWithLogits mean over the 2B scores: our alpha a weighs R as the code's alpha a / 2 does.
* R is averaged over every (window, position) that has a next item, as our base loss is (every
  prefix of a window is trained); the code feeds each (prefix, next) pair as its own row.
* logsumexp in float32 instead of log(sum(exp)) in float64 (the code's `ps` is a float64 array,
  which promotes the products): equal up to rounding wherever the code does not overflow.
* Counts come from the targets of the training windows that are loaded (`--train-file`).
The KL dual in its textbook form is beta * log E_P0[exp(loss / beta)] (+ beta * radius); the
code leaves out the factor beta (alpha absorbs it). We could not read the paper's own equations
here, so we follow the code and compare with the paper only through this textbook form.
"""

from collections import Counter
from typing import NamedTuple, Sequence

import torch

ALPHA = 0.1      # the code's default is 0 (DROS off); ours, see docs/baselines.md
BETA = 1.0       # the code's default (L50)
POWER = 0.05     # the exponent of SASRec_bce.py's weights (L340); A_SASRec_final_bce.py uses 0.5


class Robust(NamedTuple):
    """DROS's term as the training loop uses it: loss = base + alpha * robust_term(...)."""
    weights: torch.Tensor   # (N,) w_j per catalogue column
    alpha: float            # the term's weight; 0 = the base loss exactly
    beta: float             # temperature (the code's "robust radius")


def item_weights(targets: Sequence[int], item_ids: Sequence[int], power: float = POWER) -> torch.Tensor:
    """w_j = ((c_j + 1) / sum_k (c_k + 1)) ** power, (N,) float32 in the order of `item_ids`
    (the model's columns). c_j counts the training targets equal to item_ids[j]; +1 keeps unseen
    items in the catalogue with the smallest weight. A target outside `item_ids` is an error."""
    ids = [int(i) for i in item_ids]
    counts = Counter(int(t) for t in targets)
    unknown = set(counts) - set(ids)
    if unknown:
        raise ValueError(f"{len(unknown)} training target(s) outside the catalogue, e.g. {min(unknown)}")
    c = torch.tensor([counts.get(i, 0) for i in ids], dtype=torch.float64) + 1
    return ((c / c.sum()) ** power).float()


def robust(targets: Sequence[int], item_ids: Sequence[int], alpha: float = ALPHA, beta: float = BETA,
           power: float = POWER) -> Robust:
    """The term's settings with the weights counted from the training targets (L375-378: once,
    before training)."""
    if alpha < 0 or beta <= 0:
        raise ValueError(f"DROS needs alpha >= 0 and beta > 0, got alpha={alpha}, beta={beta}")
    weights = item_weights(targets, item_ids, power)
    if isinstance(item_ids, torch.Tensor):
        weights = weights.to(item_ids.device)
    return Robust(weights, float(alpha), float(beta))


def robust_term(scores: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """mean_u log sum_j exp(w_j (s_uj - y_uj)^2 / beta): DROS's R, averaged over the M rows.

    scores: (M, N) raw logits over the whole catalogue; targets: (M,) the column of each row's
    next item (y_uj = 1 there, 0 elsewhere); weights: (N,) w_j; beta > 0."""
    s = scores.float()
    y = torch.zeros_like(s).scatter_(1, targets[:, None], 1.0)       # (M, N) one-hot labels
    error = weights.to(s) * (s - y) ** 2 / beta                       # (M, N) weighted squared errors
    return torch.logsumexp(error, dim=-1).mean()                      # R(u) (L433-440), then mean_u
