"""Checks for the exercises of notebook 04 (Group DRO, derived; Lemma 1, Eq. 5-13).

Each check calls the learner's function on fixed inputs and compares it with a computation of its
own (scipy's softmax and entropy, not the solution file).
"""
import numpy as np
from scipy.special import softmax
from scipy.stats import entropy

from exercises import attempt


_L = np.array([0.3, 0.6, 0.9, 1.4, 2.1])


def check_closed_form_q(fn) -> bool:
    cases = [(_L, 0.5), (_L, 5.0), (np.array([1000.0, 1001.0, 999.0]), 0.1), (np.array([2.0, 2.0]), 1.0)]
    for L, tau in cases:
        got = attempt("closed_form_q", fn, L, tau)
        if got is None:
            return False
        got = np.asarray(got, dtype=np.float64)
        assert got.shape == L.shape and np.all(np.isfinite(got)), \
            f"closed_form_q: expected {L.shape} finite weights for L={L}, tau={tau} (subtract max(L) before exp?)"
        assert np.allclose(got, softmax(L / tau), atol=1e-9), \
            f"closed_form_q: wrong Q for L={L}, tau={tau}: expected softmax(L / tau)"
    print("closed_form_q: correct")
    return True


def check_kl_uniform(fn) -> bool:
    cases = [np.full(4, 0.25), np.array([0.7, 0.2, 0.1]), np.array([1.0, 0.0, 0.0, 0.0, 0.0]),
             np.random.default_rng(0).dirichlet(np.ones(6))]
    for Q in cases:
        got = attempt("kl_uniform", fn, Q)
        if got is None:
            return False
        expected = entropy(Q, np.full(len(Q), 1 / len(Q)))            # sum Q log(Q / U), natural log
        assert np.isfinite(got) and abs(float(got) - expected) < 1e-9, \
            f"kl_uniform: got {got} for Q={Q.round(3)}, expected {expected:.6f} (0 log 0 = 0; U = 1/G)"
    print("kl_uniform: correct")
    return True


def check_tau_for_eta(fn) -> bool:
    for L, eta in [(_L, 0.05), (_L, 0.5), (_L, 1.5), (np.array([0.2, 0.25, 3.0]), 0.9)]:
        got = attempt("tau_for_eta", fn, L, eta)
        if got is None:
            return False
        assert got > 0, f"tau_for_eta: tau must be positive, got {got}"
        kl = entropy(softmax(L / got), np.full(len(L), 1 / len(L)))
        assert abs(kl - eta) < 1e-6, \
            f"tau_for_eta: KL(softmax(L / {got:.4g}) || U) = {kl:.6f}, not eta = {eta} (KL falls as tau grows)"
    print("tau_for_eta: correct")
    return True
