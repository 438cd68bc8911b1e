"""Checks for the exercises of notebook 03 (context bias: Eq. 2 relevance, attribution ratios).

Each check calls the learner's function on fixed inputs and compares it with a computation of its
own (explicit loops over items and examples), never with the solution file.
"""
import numpy as np
import torch

from exercises import attempt


def check_item_relevance(fn) -> bool:
    g = torch.Generator().manual_seed(3)
    for n_items, T in [(4, 7), (1, 3), (6, 12)]:
        logprobs = -torch.rand(n_items, T, generator=g) * 5                 # (n, T) Eq. 3 scores
        mask = torch.rand(n_items, T, generator=g) > 0.4                    # (n, T) the titles' own tokens
        mask[:, 1] = True                                                   # every title has a token
        got = attempt("item_relevance", fn, logprobs.clone(), mask.clone())
        if got is None:
            return False
        expected = []
        for row, keep in zip(logprobs.tolist(), mask.tolist()):
            picked = [v for v, k in zip(row, keep) if k]
            expected.append(sum(picked) / len(picked))
        got = torch.as_tensor(got, dtype=torch.float32).reshape(-1)
        assert got.shape == (n_items,) and torch.allclose(got, torch.tensor(expected), atol=1e-5), \
            f"item_relevance: expected {np.round(expected, 4).tolist()}, got {got.numpy().round(4).tolist()} " \
            f"(per item: the mean of its Eq. 3 scores over the masked title tokens only)"
    print("item_relevance: correct")
    return True


def check_attribution_ratio(fn) -> bool:
    rng = np.random.default_rng(7)
    for n in (1, 5, 8):
        full = -rng.uniform(5, 30, n)                                       # log P(title | prompt)
        without_aux = full - rng.uniform(0, 6, n)                           # ... auxiliary text removed
        without_inter = full - rng.uniform(0.5, 4, n)                       # ... interactions removed
        got = attempt("attribution_ratio", fn, full.copy(), without_aux.copy(), without_inter.copy())
        if got is None:
            return False
        drop_aux = sum(f - a for f, a in zip(full, without_aux))
        drop_inter = sum(f - b for f, b in zip(full, without_inter))
        expected = drop_aux / drop_inter
        assert abs(float(got) - expected) < 1e-6 * max(1, abs(expected)), \
            f"attribution_ratio: expected {expected:.4f}, got {float(got):.4f} (each attribution is the " \
            f"drop full - ablated; sum the drops over examples, then divide auxiliary by interactions)"
    print("attribution_ratio: correct")
    return True
