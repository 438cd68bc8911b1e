"""Checks for notebook 01's exercises: the causal mask, RMSNorm, RoPE in the interleaved layout.

Each `check_<name>(fn)` calls `fn` on fixed inputs and compares it with its own computation:
True if right, False if `fn` still raises NotImplementedError, AssertionError with a hint if wrong.
"""

import torch
import torch.nn.functional as F

from exercises import attempt


def _tensor(name, got, shape):
    assert isinstance(got, torch.Tensor), f"{name}: return a torch.Tensor, got {type(got).__name__}"
    assert tuple(got.shape) == shape, f"{name}: expected shape {shape}, got {tuple(got.shape)}"
    return got


def check_causal_mask(fn) -> bool:
    """fn(T) -> (T, T) bool, True where query i may attend to key j."""
    for T in (1, 6):
        got = attempt("causal_mask", fn, T)
        if got is None:
            return False
        _tensor("causal_mask", got, (T, T))
        assert got.dtype == torch.bool, f"causal_mask: expected dtype torch.bool, got {got.dtype}"
        expected = torch.tensor([[j <= i for j in range(T)] for i in range(T)])
        assert torch.equal(got, expected), \
            "causal_mask: row i must be True exactly at columns j <= i (itself and earlier tokens)"
    print("causal_mask: correct")
    return True


def check_rms_norm(fn) -> bool:
    """fn(x, weight, eps) -> x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g) * 3
    weight = torch.rand(8, generator=g) + 0.5
    eps = 1e-5
    got = attempt("rms_norm", fn, x.clone(), weight.clone(), eps)
    if got is None:
        return False
    _tensor("rms_norm", got, (2, 3, 8))
    rows = x.reshape(-1, 8)
    expected = torch.stack([r / (sum(float(v) ** 2 for v in r) / 8 + eps) ** 0.5 for r in rows])
    expected = (expected * weight).reshape(2, 3, 8)
    layer_norm = F.layer_norm(x, (8,), weight, None, eps)
    assert not torch.allclose(got, layer_norm, atol=1e-4), \
        "rms_norm: RMSNorm does not subtract the mean (that is LayerNorm)"
    assert torch.allclose(got, expected, atol=1e-4), \
        "rms_norm: divide by sqrt(mean of squares over the last dimension + eps), then multiply by weight"
    print("rms_norm: correct")
    return True


def check_rope_interleaved(fn) -> bool:
    """fn(x, positions, base) -> x (T, D) rotated pairwise: dims (2i, 2i+1) by angle pos * base^(-2i/D)."""
    T, D, base = 5, 8, 10000.0
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 1, 2, 7, 30])
    got = attempt("rope_interleaved", fn, x.clone(), positions.clone(), base)
    if got is None:
        return False
    _tensor("rope_interleaved", got, (T, D))
    # Independent route: pair (2i, 2i+1) as the complex number x_2i + 1j x_2i+1, times e^(1j angle).
    z = torch.complex(x[:, 0::2].double(), x[:, 1::2].double())              # (T, D/2)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)          # (D/2,)
    z = z * torch.polar(torch.ones(T, D // 2, dtype=torch.float64), positions[:, None].double() * theta)
    expected = torch.stack((z.real, z.imag), dim=-1).reshape(T, D).float()
    assert torch.allclose(got[0], x[0], atol=1e-5), "rope_interleaved: position 0 must leave x unchanged"
    assert torch.allclose(got, expected, atol=1e-4), (
        "rope_interleaved: pair dims (2i, 2i+1), not (i, i + D/2); rotate each pair by "
        "pos * base^(-2i/D): (a, b) -> (a cos - b sin, a sin + b cos)")
    print("rope_interleaved: correct")
    return True
