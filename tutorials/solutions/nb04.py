"""Reference solutions to the exercises of notebook 04 (Group DRO, derived; Lemma 1, Eq. 5-13)."""
import numpy as np


def closed_form_q(L, tau):
    """Eq. 5 / 12: Q = softmax(L / tau) over the G group losses L (shape (G,)), float64, stable."""
    z = np.asarray(L, dtype=np.float64) / tau
    z = z - z.max()                      # softmax(z + c) = softmax(z): no overflow for large L / tau
    e = np.exp(z)
    return e / e.sum()


def kl_uniform(Q):
    """KL(Q || U) with U = 1/G, in nats; groups with Q(g) = 0 contribute 0 (0 log 0 = 0)."""
    Q = np.asarray(Q, dtype=np.float64)
    nz = Q > 0
    return float(np.sum(Q[nz] * np.log(Q[nz] * len(Q))))


def tau_for_eta(L, eta):
    """tau > 0 with KL(softmax(L / tau) || U) = eta, by bisection on log tau.

    KL(Q_tau || U) decreases strictly in tau (dKL/dtau = -Var_Q(L) / tau^3), from log G at tau -> 0
    (unique maximiser) to 0 at tau -> infinity, so one root exists for 0 < eta < log G.
    """
    lo, hi = 1e-6, 1e6                   # KL(lo) > eta > KL(hi)
    for _ in range(200):
        mid = np.sqrt(lo * hi)           # bisect in log tau: tau spans many decades
        if kl_uniform(closed_form_q(L, mid)) > eta:
            lo = mid                     # still too peaked: more temperature
        else:
            hi = mid
    return float(np.sqrt(lo * hi))
