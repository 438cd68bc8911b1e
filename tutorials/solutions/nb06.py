"""Reference solutions of notebook 06's exercises."""
import math

import numpy as np


def ndcg_at_k(ranked: list, target, k: int) -> float:
    """NDCG@K of one ranked list with one relevant item (IDCG = 1)."""
    top = list(ranked[:k])
    return 1 / math.log2(top.index(target) + 2) if target in top else 0.0


def mgu_dgu(rec_counts, hist_counts) -> tuple[float, float]:
    """(MGU, DGU) from per-group counts of recommended and of history items."""
    gp = np.asarray(rec_counts, float) / np.sum(rec_counts)
    gh = np.asarray(hist_counts, float) / np.sum(hist_counts)
    gap = gp - gh
    return float(np.abs(gap).mean()), float(gap.max() - gap.min())
