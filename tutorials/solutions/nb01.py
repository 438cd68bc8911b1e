"""Reference solutions to notebook 01's exercises (try them yourself first)."""

import torch


def causal_mask(T):
    """(T, T) bool: True where query i may attend to key j, i.e. j <= i."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def rms_norm(x, weight, eps):
    """x (..., C) / sqrt(mean(x^2 over C) + eps) * weight (C,): no mean subtracted, no bias."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_interleaved(x, positions, base):
    """x (T, D) rotated as in Meta's original Llama code: dims (2i, 2i+1) form pair i, turned by
    the angle position * base^(-2i/D). Same angles as the rotate-half layout, other pairing."""
    T, D = x.shape
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)     # (D/2,)
    angle = positions[:, None].float() * inv_freq                           # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    a, b = x[:, 0::2], x[:, 1::2]                                           # (T, D/2) each
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(T, D)
