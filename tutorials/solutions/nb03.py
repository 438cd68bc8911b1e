"""Reference solutions of notebook 03's exercises."""
import numpy as np
import torch


def item_relevance(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: (n, T) per-token Eq. 3 scores and (n, T) title-token mask -> (n,) mean over the title."""
    m = mask.float()
    return (logprobs * m).sum(1) / m.sum(1)


def attribution_ratio(full, without_aux, without_inter) -> float:
    """Ratio of means of the ablation drops: sum(full - without_aux) / sum(full - without_inter)."""
    full = np.asarray(full, dtype=float)
    return float((full - without_aux).sum() / (full - without_inter).sum())
