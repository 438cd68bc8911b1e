"""Checks for the exercises of notebook 06 (the metrics: NDCG@K, MGU@K and DGU@K).

Each check calls the learner's function on fixed inputs and compares it with a computation of its
own (the definitions written out with loops), never with the solution file.
"""
import math
import random

from exercises import attempt


def check_ndcg_at_k(fn) -> bool:
    ranked = [40, 12, 7, 99, 3, 18, 25, 61, 8, 5]
    for target, k in [(40, 10), (7, 10), (7, 2), (5, 10), (5, 9), (77, 10), (3, 5), (12, 1)]:
        got = attempt("ndcg_at_k", fn, list(ranked), target, k)
        if got is None:
            return False
        expected = 0.0
        for position in range(min(k, len(ranked))):
            if ranked[position] == target:
                expected = 1 / math.log2(position + 2)     # one relevant item: IDCG = 1
        assert abs(float(got) - expected) < 1e-9, \
            f"ndcg_at_k: target {target}, K={k}: expected {expected:.4f}, got {float(got):.4f} " \
            f"(1 / log2(rank + 2) with the 0-based rank, 0 when the target is not in the top K)"
    print("ndcg_at_k: correct")
    return True


def check_mgu_dgu(fn) -> bool:
    rng = random.Random(11)
    for _ in range(4):
        rec = [rng.randint(0, 30) for _ in range(5)]        # top-K recommendations per item group
        hist = [rng.randint(1, 50) for _ in range(5)]       # history items per item group
        got = attempt("mgu_dgu", fn, list(rec), list(hist))
        if got is None:
            return False
        gaps = [r / sum(rec) - h / sum(hist) for r, h in zip(rec, hist)]
        expected = (sum(abs(x) for x in gaps) / len(gaps), max(gaps) - min(gaps))
        mgu, dgu = (float(v) for v in got)
        assert abs(mgu - expected[0]) < 1e-9 and abs(dgu - expected[1]) < 1e-9, \
            f"mgu_dgu: counts {rec} / {hist}: expected ({expected[0]:.4f}, {expected[1]:.4f}), got " \
            f"({mgu:.4f}, {dgu:.4f}) (turn each list of counts into shares first; gap = GP_g - GH_g)"
    print("mgu_dgu: correct")
    return True
