"""Claims that survive correction: the tests behind a reproduction's verdicts. They sit beside
nanogdrt/stats.py's intervals and reuse its resamples one for one, so that an interval and its p-value
always come from the same draws.

stats.verdict reads one 95% interval per claim. A report with dozens of claims, a few training seeds
per row and a random bootstrap needs four more things:

- p-values. Paired bootstrap over users (paired_draws keeps stats.paired's resamples whole): the
  smallest alpha at which the two-sided percentile interval (Efron & Tibshirani 1993, ch. 13; tests
  from the bootstrap: ch. 16) excludes 0, estimated as
      p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)).
  The "+1" (Davison & Hinkley 1997, ch. 4) counts the observed sample as one more resample. Without
  it a strong effect gets p = 0, which B resamples cannot show, and Holm would pass it in a family of
  any size. What follows from it: p >= 2/(B+1), so a family of m claims can pass Holm only when
  B >= 2m/alpha - 1 (resamples_for_holm: 1199 for 30 claims at 0.05). Also, p <= alpha implies that
  the (1 - alpha) percentile interval excludes 0, so the test is a little stricter than the interval,
  never looser. Resamples exactly at 0 (frequent for HR) count on both sides, which is conservative.
  Training seeds: Student's t on the seed differences, paired by seed (paired_t) when seed k fixes both
  arms' data order and initialisation, and Welch (welch_t) when the arms' seeds are unrelated.
- Multiplicity: Holm's step-down (Holm 1979) over a family of claims bounds the chance of any false
  "reproduced" / "not reproduced" in the family by alpha, whatever the dependence between claims (the
  six metrics of one pair of rows are strongly dependent).
- Equivalence: the two one-sided tests (TOST, Schuirmann 1987) declare |A - B| < margin at alpha when
  the (1 - 2 alpha) interval lies inside (-margin, margin). The margin is in the metric's own units.
- The bootstrap's own randomness: seed_stability runs a test again under other bootstrap seeds.

Labels of a claim "A beats B on M" (label, labels):
  reproduced / not reproduced   resolved by stats.verdict's rule (and, with Holm, adjusted p <= alpha),
                                on the claimed side / the other side;
  smaller than the margin       otherwise, when equivalence holds (with Holm: adjusted TOST p <= alpha);
  underpowered                  otherwise: the data show neither an effect nor its absence.
stats.verdict and stats.verdict_cell are unchanged; these labels stand beside them.
"""

import math
from typing import Callable, NamedTuple

import numpy as np

from nanogdrt.stats import TABLE_KEYS, verdict, weights

NOT_RESOLVED = "not resolved at this scale"     # stats.verdict's third outcome
EQUIVALENT = "smaller than the margin"
UNDERPOWERED = "underpowered"


class Difference(NamedTuple):
    """A - B and its tests. d[:3] is stats' (point, lo, hi) cell: stats.verdict(d[:3], metric) reads it."""
    point: float
    lo: float                 # (1 - alpha) two-sided interval
    hi: float
    p: float                  # two-sided p-value of "A - B = 0"
    eq_lo: float              # (1 - 2 alpha) interval, TOST's
    eq_hi: float
    p_equivalent: float       # TOST p-value of "|A - B| >= margin"; nan without a margin
    margin: float             # nan without a margin
    alpha: float


def _check(alpha, margin):
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha}: need 0 < alpha < 0.5")
    if margin is not None and not margin > 0:
        raise ValueError(f"margin={margin}: need a number > 0 (in the metric's units)")


# --- Student's t distribution, so that the package needs no scipy (tests check it against scipy) ---

def _beta_fraction(a, b, x):
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Numerical Recipes, 3rd ed., section 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),               # even step
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):   # odd step
            d, c = 1.0 + aa * d, 1.0 + aa / c
            d, c = 1.0 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_regularized(a, b, x):
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):                       # where the fraction converges fast
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_sf(t, df) -> float:
    """P(T >= t) for Student's t with df > 0 degrees of freedom (Welch's df need not be whole)."""
    tail = 0.5 * _beta_regularized(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q, df) -> float:
    """The t with P(T <= t) = q, by bisection on the upper tail (accurate for q near 1)."""
    if not 0 < q < 1:
        raise ValueError(f"q={q}: need 0 < q < 1")
    if q < 0.5:
        return -t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - q:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_sf(mid, df) > 1 - q else (lo, mid)
    return (lo + hi) / 2


# --- Paired bootstrap over users ---

def paired_draws(a, b, B=1000, seed=0) -> dict[str, np.ndarray]:
    """{metric: (B+1,) A - B}: stats.paired's resamples kept whole (row 0: all common users once), so
    stats.interval(paired_draws(a, b, B, s)[k]) == stats.paired(a, b, B, s)[k]."""
    in_b = set(b.rows)
    common = [r for r in a.rows if r in in_b]
    w = weights(len(common), B, seed)
    ta, tb = a.subset(common).table(w), b.subset(common).table(w)
    return {k: ta[k] - tb[k] for k in TABLE_KEYS}


def bootstrap_difference(draws, alpha=0.05, margin=None) -> Difference:
    """A Difference from bootstrap draws in stats.weights' layout (row 0 the point estimate, rows 1..B
    resampled): percentile intervals, and the p-values of the module docstring (+1 rule). TOST's p is the
    larger one-sided share, (1 + #{d* <= -margin}) / (B + 1) or (1 + #{d* >= margin}) / (B + 1); when it
    is <= alpha, the (1 - 2 alpha) interval lies inside (-margin, margin).
    Assumes what the percentile interval assumes: some monotone transform of the statistic is
    roughly symmetric around the truth, and the users are independent draws."""
    _check(alpha, margin)
    x = np.asarray(draws, dtype=float)
    if x.ndim != 1 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"draws: need a finite 1-d array of length >= 2, got shape {x.shape}")
    rest, B = x[1:], len(x) - 1
    lo, hi, eq_lo, eq_hi = (float(np.percentile(rest, q)) for q in      # at alpha 0.05: stats.interval's, bit for bit
                            (100 * alpha / 2, 100 * (1 - alpha / 2), 100 * alpha, 100 * (1 - alpha)))
    p = min(1.0, 2 * (1 + min(int((rest <= 0).sum()), int((rest >= 0).sum()))) / (B + 1))
    p_eq = math.nan if margin is None else \
        max(1 + int((rest <= -margin).sum()), 1 + int((rest >= margin).sum())) / (B + 1)
    return Difference(float(x[0]), lo, hi, p, eq_lo, eq_hi, p_eq, math.nan if margin is None else float(margin),
                      alpha)


def paired_differences(a, b, B=1000, seed=0, alpha=0.05, margins=None) -> dict[str, Difference]:
    """{metric: Difference of A - B} on the users both rows hold, every metric from the same resamples
    as stats.paired(a, b, B, seed). margins: {metric: margin}; a metric not in it gets no TOST."""
    draws = paired_draws(a, b, B, seed)
    return {k: bootstrap_difference(draws[k], alpha, (margins or {}).get(k)) for k in TABLE_KEYS}


# --- Training seeds: Student's t ---

def _t_difference(d, se, df, alpha, margin) -> Difference:
    m = math.nan if margin is None else float(margin)
    if se == 0:          # every seed difference equal (or both arms constant): no spread to test against
        return Difference(d, d, d, 1.0 if d == 0 else 0.0, d, d,
                          math.nan if margin is None else float(abs(d) >= margin), m, alpha)
    h, h_eq = t_ppf(1 - alpha / 2, df) * se, t_ppf(1 - alpha, df) * se
    p_eq = math.nan if margin is None else \
        max(t_sf((d + margin) / se, df), t_sf((margin - d) / se, df))   # H0: A-B <= -margin; H0: A-B >= margin
    return Difference(d, d - h, d + h, min(1.0, 2 * t_sf(abs(d) / se, df)), d - h_eq, d + h_eq, p_eq, m, alpha)


def _seed_values(xs, name):
    x = np.asarray(xs, dtype=float)
    if x.ndim != 1 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"{name}: need two finite values at least, one per training seed, got {xs!r}")
    return x


def paired_t(xs, ys, alpha=0.05, margin=None) -> Difference:
    """mean(xs - ys) tested by Student's paired t, xs[k] and ys[k] from training seed k. Right when the
    seed fixes both arms (same data order and initialisation), so that the seed's own effect cancels
    in the difference. Assumes the seed differences are independent and roughly normal: with 3 seeds
    nothing checks that, so read p near alpha as weak. TOST: the two one-sided t tests at alpha."""
    _check(alpha, margin)
    x, y = _seed_values(xs, "xs"), _seed_values(ys, "ys")
    if len(x) != len(y):
        raise ValueError(f"paired_t: {len(x)} values against {len(y)}: pairing needs one per seed on each side")
    diff = x - y
    return _t_difference(float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))), len(diff) - 1, alpha,
                         margin)


def welch_t(xs, ys, alpha=0.05, margin=None) -> Difference:
    """mean(xs) - mean(ys) tested by Welch's t (unequal variances, Welch-Satterthwaite df), for seeds
    that do not pair; its interval is stats.welch_interval's. Assumes independent, roughly normal runs."""
    _check(alpha, margin)
    x, y = _seed_values(xs, "xs"), _seed_values(ys, "ys")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)) if se > 0 else 1.0
    return _t_difference(float(x.mean() - y.mean()), se, df, alpha, margin)


# --- Multiplicity: Holm ---

class Holm(NamedTuple):
    adjusted: dict[str, float]     # Holm-adjusted p-values, in the input's order
    reject: dict[str, bool]        # adjusted p <= alpha


def holm(pvalues: dict[str, float], alpha=0.05) -> Holm:
    """Holm's (1979) step-down correction. Sorted p_(1) <= ... <= p_(m); the adjusted
    p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), monotone in i; reject where it is <= alpha. It bounds
    the family-wise error rate by alpha under any dependence between the p-values."""
    for name, p in pvalues.items():
        if not 0 <= p <= 1:
            raise ValueError(f"holm: the p-value of {name!r} is {p}: need a number in [0, 1]")
    order, m, running, adjusted = sorted(pvalues, key=pvalues.get), len(pvalues), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        adjusted[name] = running
    adjusted = {name: adjusted[name] for name in pvalues}
    return Holm(adjusted, {name: p <= alpha for name, p in adjusted.items()})


def resamples_for_holm(m: int, alpha=0.05) -> int:
    """The fewest bootstrap resamples B with which a family of m claims can pass Holm at all: the
    smallest p is 2/(B+1) (the +1 rule), and Holm compares m times it with alpha."""
    if m < 1:
        raise ValueError(f"m={m}: a family needs one claim at least")
    B = max(1, math.ceil(2 * m / alpha) - 3)            # just below the bound; step up past rounding
    while not holm({str(i): 2 / (B + 1) for i in range(m)}, alpha).reject["0"]:
        B += 1
    return B


# --- Labels ---

def label(d: Difference, metric: str, significant: bool | None = None, equivalent: bool | None = None) -> str:
    """A claim "A beats B on metric" in words (the module docstring's labels). significant and
    equivalent: Holm's reject flags for this claim in its family (labels() passes them); None reads
    the claim alone, by its intervals."""
    resolved = verdict(d[:3], metric)
    if resolved != NOT_RESOLVED and significant is not False:
        return resolved
    if -d.margin < d.eq_lo and d.eq_hi < d.margin and equivalent is not False:   # False for a nan margin
        return EQUIVALENT
    return UNDERPOWERED


class Claim(NamedTuple):
    label: str
    p_holm: float                  # Holm-adjusted p of the difference in its family
    p_equivalent_holm: float       # Holm-adjusted TOST p among the family's claims with a margin; nan without


def labels(family: dict[str, tuple[Difference, str]]) -> dict[str, Claim]:
    """{claim: (Difference, metric)}, one family (e.g. every cell of a Verdicts table) -> {claim: Claim},
    labelled after Holm at the Differences' common alpha. The differences form one family and the
    equivalences (the claims with a margin) another, each corrected on its own."""
    alphas = {d.alpha for d, _ in family.values()}
    if len(alphas) > 1:
        raise ValueError(f"labels: one family, one alpha; got {sorted(alphas)}")
    alpha = alphas.pop() if alphas else 0.05
    diff = holm({k: d.p for k, (d, _) in family.items()}, alpha)
    eq = holm({k: d.p_equivalent for k, (d, _) in family.items() if not math.isnan(d.p_equivalent)}, alpha)
    return {k: Claim(label(d, metric, diff.reject[k], eq.reject.get(k, False)), diff.adjusted[k],
                     eq.adjusted.get(k, math.nan)) for k, (d, metric) in family.items()}


def label_cell(d: Difference, claim: Claim) -> str:
    """A table cell, as stats.verdict_cell writes one, with the p-value and its Holm adjustment."""
    return (f"{claim.label} ({d.point:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}], p {d.p:.3g}, Holm {claim.p_holm:.3g})")


# --- The bootstrap's own randomness ---

class Stability(NamedTuple):
    labels: tuple[str, ...]        # the label under each bootstrap seed
    stable: bool                   # all the same
    resamples: int | None          # recommended B; None when an endpoint sits on its threshold


def seed_stability(draws_for: Callable[[int, int], np.ndarray], metric, B=1000, seeds=5, alpha=0.05, margin=None,
                   z=3.0) -> Stability:
    """One bootstrap test run again under bootstrap seeds 0..seeds-1: its label under each, whether they
    agree, and how many resamples would keep them apart from chance. draws_for(B, seed) -> the (B+1,)
    draws, e.g. lambda B, s: paired_draws(a, b, B, s)["NDCG@10"]. A label changes only when an interval
    endpoint crosses its threshold (0 for (lo, hi); -margin, +margin for TOST's). An endpoint's seed-to-
    seed sd shrinks as 1/sqrt(B), so B' = B (z sd / gap)^2 puts every endpoint z of its sds from its
    threshold, gap being its mean distance to it; the recommendation is the largest B' (at least B,
    rounded up to 100). Reads the claim alone; under Holm, pass the level its p is compared with."""
    _check(alpha, margin)
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: the spread across seeds needs two at least")
    ds = [bootstrap_difference(draws_for(B, s), alpha, margin) for s in range(seeds)]
    found = tuple(label(d, metric) for d in ds)
    edges = [([d.lo for d in ds], 0.0), ([d.hi for d in ds], 0.0)]
    if margin is not None:
        edges += [([d.eq_lo for d in ds], -margin), ([d.eq_hi for d in ds], margin)]
    need = float(B)
    for values, threshold in edges:
        gap, sd = abs(np.mean(values) - threshold), float(np.std(values, ddof=1))
        if sd == 0:              # the endpoint did not move (a discrete statistic): more B does not move it
            continue
        if gap == 0:
            return Stability(found, len(set(found)) == 1, None)
        need = max(need, B * (z * sd / gap) ** 2)
    return Stability(found, len(set(found)) == 1, int(math.ceil(need / 100) * 100))
