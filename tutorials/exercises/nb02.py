"""Checks for notebook 02's exercises: the LoRA forward delta, trainable parameter counts, merging.

Each `check_<name>(fn)` calls `fn` on fixed inputs and compares it with its own computation:
True if right, False if `fn` still raises NotImplementedError, AssertionError with a hint if wrong.
"""

import torch

from exercises import attempt


def _inputs():
    g = torch.Generator().manual_seed(0)
    n_in, n_out, r = 6, 5, 2
    return (torch.randn(4, n_in, generator=g), torch.randn(r, n_in, generator=g),   # x, A
            torch.randn(n_out, r, generator=g), torch.randn(n_out, n_in, generator=g), 8.0, r)  # B, W


def check_lora_delta(fn) -> bool:
    """fn(x, A, B, alpha, r) -> (alpha / r) B A x for each row of x: (N, out)."""
    x, A, B, _, alpha, r = _inputs()
    got = attempt("lora_delta", fn, x.clone(), A.clone(), B.clone(), alpha, r)
    if got is None:
        return False
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (4, 5), \
        f"lora_delta: expected a (N, out) = (4, 5) tensor, got {getattr(got, 'shape', type(got))}"
    # Independent route: one output element at a time, as sums over the rank and the input.
    expected = torch.tensor([[alpha / r * sum(float(B[o, k]) * sum(float(A[k, i] * x[n, i]) for i in range(6))
                                              for k in range(r)) for o in range(5)] for n in range(4)])
    unscaled = (x @ A.T) @ B.T
    assert not torch.allclose(got, unscaled, atol=1e-4), "lora_delta: scale by alpha / r"
    assert torch.allclose(got, expected, atol=1e-4), \
        "lora_delta: x (N, in) goes through A (r, in) first, then B (out, r): x @ A.T @ B.T * alpha / r"
    print("lora_delta: correct")
    return True


def check_count_lora_params(fn) -> bool:
    """fn(shapes, r) -> the number of trainable LoRA numbers for weights of shapes [(out, in), ...]."""
    cases = [([(576, 576), (192, 576)], 8, 8 * (1152 + 768)),       # SmolLM2's q_proj and v_proj
             ([(10, 3)], 1, 13), ([(4, 7), (7, 4), (5, 5)], 3, 3 * (11 + 11 + 10))]
    for shapes, r, expected in cases:
        got = attempt("count_lora_params", fn, list(shapes), r)
        if got is None:
            return False
        full = sum(o * i for o, i in shapes)
        assert got != full, "count_lora_params: count A (r x in) and B (out x r), not the full W"
        assert got == expected, (f"count_lora_params: for shapes {shapes}, r={r} expected {expected}, "
                                 f"got {got} (each layer adds r * (in + out))")
    print("count_lora_params: correct")
    return True


def check_merge_weight(fn) -> bool:
    """fn(W, A, B, alpha, r) -> W' with W' x == W x + (alpha / r) B A x, W itself unchanged."""
    x, A, B, W, alpha, r = _inputs()
    W_in = W.clone()
    got = attempt("merge_weight", fn, W_in, A.clone(), B.clone(), alpha, r)
    if got is None:
        return False
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (5, 6), \
        f"merge_weight: expected a (out, in) = (5, 6) tensor, got {getattr(got, 'shape', type(got))}"
    assert torch.equal(W_in, W), "merge_weight: return a new tensor, do not modify W in place"
    # Independent route: the merged layer must act on inputs as base + LoRA path does.
    expected_out = x @ W.T + (alpha / r) * (x @ A.T) @ B.T
    assert not torch.allclose(x @ got.T, x @ (W + B @ A).T, atol=1e-4), "merge_weight: scale B A by alpha / r"
    assert torch.allclose(x @ got.T, expected_out, atol=1e-4), \
        "merge_weight: W' = W + (alpha / r) * B @ A, shape (out, in)"
    print("merge_weight: correct")
    return True
