"""Statistics of the results, shared by the tutorials and the research harness (experiments/repro,
experiments/gpu): per-user metric terms, the bootstrap over test users, the paired difference of two
rows, the verdict rule, the Welch interval over training seeds, and what GDRT's weights Q did over
a run. docs/results.md's numbers come from here; tutorials 03 and 06 use the same functions.

Definitions:
- Cells: the metric on a row's test users, [bootstrap 95% percentile interval], B resamples of users.
  MGU/DGU (Eq. 2) pool each resample's group counts before the gap, as the metric does on the
  whole set, so a resample is a weighted sum of per-user terms and nothing is re-scored.
- Paired difference A - B: on the users both rows were decoded on; each resample draws users once
  and scores both rows on them.
- Verdict of a claim "A beats B on M" (higher NDCG/HR, lower MGU/DGU): reproduced when the 95%
  interval of A - B lies wholly on the claimed side of 0; not reproduced when it lies wholly on
  the other side; not resolved at this scale when it contains 0.
- Selection: the run with the highest validation NDCG@5, ties broken by NDCG@10, then HR@10.
- Seeds: the Welch t 95% interval of the difference of two rows' seed means.
- Q entropy: per optimizer step, H(Q) = -sum_g Q(g) log Q(g) of the logged GDRT weights (Eq. 5) and the
  effective number of groups exp(H(Q)) (G when uniform, 1 when one group takes all the weight).
- Group composition: for each token group, the share of its target-token occurrences at each
  position of the target '"Title"' + EOS: opening quote (the tokens before the first one with
  title text), first title token, later title tokens, closing quote (the token before EOS when it
  is a bare '"'; one merged with title text counts as title text), EOS (the last).
"""

import json
import math
from collections import Counter

import numpy as np

from nanogdrt import metrics
from nanogdrt.attribution import first_title_token

# The metrics of the report's tables, in their column order; fairness (MGU/DGU) is better lower.
TABLE_KEYS = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]
LOWER_IS_BETTER = {"MGU@5", "DGU@5"}
# Choosing a run on validation (GDRT's (G, tau), MSL's tau; in the reproduction and the GPU protocol
# alike): NDCG@5, the paper's criterion, ties broken by NDCG@10, then HR@10 (ties at 0 are common
# at this scale).
SELECT_KEYS = ("NDCG@5", "NDCG@10", "HR@10")


def choose(valid: dict[str, dict]) -> str:
    """The selection rule, its one owner: {run: validation metrics} -> the run whose metrics are
    highest, compared by SELECT_KEYS in order; on a full tie, the first in `valid`'s order."""
    return max(valid, key=lambda run: tuple(valid[run][k] for k in SELECT_KEYS))


def fmt(c):
    """(point, lo, hi) -> "0.1234 [0.1000, 0.1500]"."""
    return f"{c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]"


class Users:
    """Per-user terms of one row, so that a bootstrap resample is a weighted sum (no re-scoring)."""

    def __init__(self, records, by_row, titles, item_group, k_groups=5):
        inter = [by_row[r["row"]] for r in records]
        ranked = [r["topk_item_ids"] for r in records]
        self.rows = [r["row"] for r in records]
        self.acc = {}
        for k in (5, 10):
            m = metrics.per_user_metrics(ranked, [x.target for x in inter], k, titles)
            self.acc[f"NDCG@{k}"], self.acc[f"HR@{k}"] = m["ndcg"], m["hit"]
        G = 5   # MGU/DGU pool group counts over users: keep each user's counts (n, G)
        self.rec = np.array([np.bincount([item_group[i] - 1 for i in items[:k_groups] if i in item_group],
                                         minlength=G) for items in ranked], dtype=float).reshape(-1, G)
        self.hist = np.array([np.bincount([item_group[i] - 1 for i in x.history if i in item_group],
                                          minlength=G) for x in inter], dtype=float).reshape(-1, G)

    def subset(self, rows):
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = [pos[r] for r in rows]
        out = object.__new__(Users)
        out.rows, out.acc = list(rows), {k: v[idx] for k, v in self.acc.items()}
        out.rec, out.hist = self.rec[idx], self.hist[idx]
        return out

    def table(self, w):
        """w (B, n) resample weights -> {metric: (B,)}."""
        out = {k: w @ v / w.sum(1) for k, v in self.acc.items()}
        gp, gh = w @ self.rec, w @ self.hist
        gap = gp / np.maximum(gp.sum(1, keepdims=True), 1e-12) - gh / np.maximum(gh.sum(1, keepdims=True), 1e-12)
        out["MGU@5"], out["DGU@5"] = np.abs(gap).mean(1), gap.max(1) - gap.min(1)
        return out


def weights(n, B, seed):
    """Row 0: the point estimate (all weights 1); rows 1..B: bootstrap resample counts."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=B)])


def interval(x):
    return float(x[0]), float(np.percentile(x[1:], 2.5)), float(np.percentile(x[1:], 97.5))


def point(users) -> dict:
    """{metric: value} on all of a row's users: the bootstrap's row 0 (every weight 1), alone."""
    t = users.table(np.ones((1, len(users.rows))))
    return {k: float(t[k][0]) for k in TABLE_KEYS}


def bootstrap(rows: dict, ref="SFT", B=1000, seed=0) -> dict:
    """{row: {metric: (point, lo, hi)}}, and {f"{row} - {ref}": ...} on common users."""
    out = {}
    for name, u in rows.items():
        t = u.table(weights(len(u.rows), B, seed))
        out[name] = {k: interval(t[k]) for k in TABLE_KEYS}
    for name, u in rows.items():
        if name != ref and ref in rows:
            out[f"{name} - {ref}"] = paired(u, rows[ref], B, seed)
    return out


def paired(a, b, B, seed):
    common = [r for r in a.rows if r in set(b.rows)]
    w = weights(len(common), B, seed)
    ta, tb = a.subset(common).table(w), b.subset(common).table(w)
    return {k: interval(ta[k] - tb[k]) for k in TABLE_KEYS}


def verdict(point_lo_hi, metric) -> str:
    _, lo, hi = point_lo_hi
    better_lo, better_hi = (-hi, -lo) if metric in LOWER_IS_BETTER else (lo, hi)
    if better_lo > 0:
        return "reproduced"
    if better_hi < 0:
        return "not reproduced"
    return "not resolved at this scale"


def verdict_cell(c, metric) -> str:
    """A Verdicts cell: the verdict, then the difference and its interval, so that a reader (and
    README) can quote the interval the verdict rests on."""
    return f"{verdict(c, metric)} ({c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}])"


def q_entropy(steps) -> list[float]:
    """exp(H(Q)) per logged step: the effective number of groups GDRT trains on."""
    out = []
    for s in steps:
        q = np.asarray(s["q"], dtype=float)
        q = q[q > 0]
        out.append(float(np.exp(-(q * np.log(q)).sum())) if q.size else float("nan"))
    return out


def group_weight(results: dict, g: int) -> float:
    """The mean share of the loss weight that a run put on token group g (1..G) over its logged
    steps: Q(g) for the group-weighted methods (GDRT, the uniform-Q control, MSL+GDRT); for a token
    mean (SFT, Eq. 1: each token weighs 1/N) the group's share of the target tokens, N_g / N."""
    steps = results["steps"]
    if any(any(s["q"]) for s in steps):
        return float(np.mean([s["q"][g - 1] for s in steps]))
    counts = results["token_groups"]["counts"]
    return counts[g - 1] / sum(counts)


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on the ranks; ties take their mean rank)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):                      # ties: the mean of their ranks
            r[v == u] = r[v == u].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def q_summary(steps, tau) -> dict:
    """What GDRT's weights did over a run: mean exp(H(Q)), mean max Q, the share of steps with
    max Q > 0.9, the group that most often took the largest weight, and the spread of the logged
    group losses (max - min over the groups present in the step) against tau. Q(g) is proportional
    to exp(L(g)/tau), so two groups whose losses differ by d nats get weights in the ratio
    exp(d/tau): only d/tau matters, not the losses' level."""
    Q = np.array([s["q"] for s in steps], dtype=float)                     # (S, G)
    L = np.array([s["group_loss"] for s in steps], dtype=float)            # (S, G), 0 when absent
    present = Q > 0
    spread = np.array([(l[p].max() - l[p].min()) if p.sum() > 1 else 0.0 for l, p in zip(L, present)])
    top = np.bincount(Q.argmax(1), minlength=Q.shape[1])
    return {"steps": len(steps), "exp_H_Q": float(np.nanmean(q_entropy(steps))), "max_q": float(Q.max(1).mean()),
            "one_hot_share": float((Q.max(1) > 0.9).mean()), "top_group": int(top.argmax()) + 1,
            "top_group_share": float(top.max() / len(steps)), "loss_spread": float(spread.mean()),
            "spread_over_tau": float(spread.mean() / tau), "group_loss": L.mean(0).round(3).tolist(),
            "q_mean": Q.mean(0).round(3).tolist()}


def group_composition(examples, token_groups, n_groups, tokenizer, top: int = 8) -> list[dict]:
    """Per token group, the share of its target tokens at each position of the target, and its `top`
    most frequent tokens with their share of the group (what "the tokens GDRT weights" look like)."""
    names = ["opening quote", "first title token", "later title tokens", "closing quote", "EOS"]
    counts = np.zeros((n_groups, len(names)))
    tokens = [Counter() for _ in range(n_groups)]
    for p, g in zip(examples, token_groups):
        ids, first = p.ids[p.target[0]:p.target[1]], first_title_token(p, tokenizer)
        for t, gid in enumerate(g.tolist()):
            tokens[gid - 1][ids[t]] += 1
            if t == len(ids) - 1:
                pos = 4
            elif t < first:
                pos = 0
            elif t == first:
                pos = 1
            elif t == len(ids) - 2 and tokenizer.decode([ids[t]]).strip() == '"':
                pos = 3
            else:
                pos = 2   # a closing quote merged with title text counts as title text
            counts[gid - 1, pos] += 1
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return [{"group": g + 1, "tokens": int(counts[g].sum()), **dict(zip(names, shares[g].round(4).tolist())),
             "top_tokens": [[tokenizer.decode([i]) or "<EOS>", round(float(c / max(counts[g].sum(), 1)), 4)]
                            for i, c in tokens[g].most_common(top)]}
            for g in range(n_groups)]


def welch_interval(xs, ys, level=0.95):
    """mean(xs) - mean(ys) and its Welch t interval: training seeds are independent runs, few of
    them, with unequal spreads, so neither a pooled variance nor a normal quantile fits."""
    from scipy import stats
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    vx, vy = xs.var(ddof=1) / len(xs), ys.var(ddof=1) / len(ys)
    d, se = xs.mean() - ys.mean(), math.sqrt(vx + vy)
    if se == 0:
        return d, d, d
    df = (vx + vy) ** 2 / (vx ** 2 / (len(xs) - 1) + vy ** 2 / (len(ys) - 1))   # Welch-Satterthwaite
    h = stats.t.ppf(0.5 + level / 2, df) * se
    return d, d - h, d + h


def effect_word(c, metric) -> str:
    """A grid point's paired difference against SFT in words: the verdict rule, read as an effect."""
    return {"reproduced": "helps", "not reproduced": "hurts"}.get(verdict(c, metric), "no resolved difference")


def token_cell(token: str) -> str:
    """A token as a Markdown table cell shows it: quoted (leading spaces and EOS stay visible), pipes escaped."""
    return json.dumps(token, ensure_ascii=False).replace("|", "\\|")
