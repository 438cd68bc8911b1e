"""The controlled world: what it plants (nothing at shortcut 0; the shortcut at its rate above 0),
and its ground truth (the oracle is right by construction).

Sampling tolerances. Two bounds, both at 4 standard deviations:
- martingale: a realized share of N windows against the mean of their true probabilities p_n.
  Given its history, each target is one draw from the true distribution, so the X_n - p_n are
  martingale differences (users independent, each user's windows in time order): uncorrelated,
  Var(sum) = sum p_n (1 - p_n).
- clustered (Popoviciu): a realized share against a fixed rate, where a user's windows are not
  independent of each other (a user continues one line). Users are independent, and the count of
  user u's n_u windows lies in [0, n_u], so its variance is at most n_u^2 / 4.
"""

import math
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from nanogdrt import controlled
from nanogdrt.controlled import ControlledConfig, generate, next_item_distribution, oracle_topk
from nanogdrt.data import MAX_HISTORY, MIN_HISTORY, load_dataset
from nanogdrt.metrics import evaluate
from nanogdrt.prompt import PromptBuilder

Z = 4.0            # standard deviations of every tolerance below
BIG = 3_000        # users of the worlds whose frequencies are tested (~12,000 windows, ~1 s each)


@lru_cache(maxsize=None)
def world(shortcut=0.0, n_users=BIG, seed=0):
    return generate(ControlledConfig(seed=seed, shortcut=shortcut, n_users=n_users))


@lru_cache(maxsize=None)
def windows(shortcut=0.0, n_users=BIG):
    """Every window of the world, train + valid + test (the split does not matter here)."""
    ds = load_dataset("controlled", controlled=ControlledConfig(shortcut=shortcut, n_users=n_users))
    return ds.train + ds.valid + ds.test


def clustered_sd(w):
    """Popoviciu bound on the sd of a share over all windows of w (module docstring)."""
    sizes = [len(seq) - MIN_HISTORY for seq in w.sequences.values()]
    return math.sqrt(sum(n * n for n in sizes) / 4) / sum(sizes)


def martingale_sd(p):
    return math.sqrt(sum(q * (1 - q) for q in p)) / len(p)


# ----------------------------------------------------------------------------- the generator

def test_seeded_deterministic_and_catalogue_independent_of_the_knob():
    a, b = generate(ControlledConfig(seed=0)), generate(ControlledConfig(seed=0))
    assert a == b and a.titles != generate(ControlledConfig(seed=1)).titles
    c = generate(ControlledConfig(seed=0, shortcut=0.3))
    # common random numbers: same titles (one Eq. 3 scoring serves every setting), same users'
    # lengths and times; only the items differ
    assert c.titles == a.titles and c.sequences != a.sequences
    for user, seq in a.sequences.items():
        assert [t for _, t in seq] == [t for _, t in c.sequences[user]]
    assert len(a.titles) == (8 * 3 + 1) * 8 and len(set(a.titles.values())) == len(a.titles)
    assert a.generic == list(range(len(a.titles) - 7, len(a.titles) + 1))
    assert all(a.titles[i].startswith(controlled.GENERIC_LINE) for i in a.generic)
    assert not any(w in t.split() for t in a.titles.values() if not t.startswith("New Toy")
                   for w in ("New", "Toy", "Favorites", "Play", "Game"))


def test_config_is_checked():
    for bad in (dict(shortcut=1.0), dict(shortcut=-0.1), dict(p_continue=1.5), dict(items_per_line=1)):
        with pytest.raises(ValueError):
            ControlledConfig(**bad)


def test_windows_see_the_whole_past_so_the_truth_is_exact(tokenizer):
    assert controlled.MAX_LEN <= MAX_HISTORY + 1 and controlled.MIN_LEN == MIN_HISTORY + 1
    cfg = ControlledConfig(shortcut=0.3)
    w, ds = generate(cfg), load_dataset("controlled", controlled=cfg)
    assert ds.name == "controlled" and ds.titles == w.titles and "shortcut=0.3" in ds.source
    assert 1_000 <= len(ds.train) <= 1_600 and 120 <= len(ds.valid) and 120 <= len(ds.test)
    pasts = {tuple(i for i, _ in seq[:k]) for seq in w.sequences.values() for k in range(len(seq))}
    for x in ds.train + ds.valid + ds.test:
        assert tuple(x.history) in pasts   # the whole past: windows are never cut short
        dist = next_item_distribution(w, x.history)
        assert dist.get(x.target, 0) > 0 and math.isclose(sum(dist.values()), 1.0)
        assert not set(dist) & set(x.history)
    PromptBuilder(tokenizer, "controlled")   # the template exists
    with pytest.raises(ValueError, match="controlled"):
        load_dataset("synthetic", controlled=cfg)


def test_generator_does_not_import_the_loader():
    code = "import sys, nanogdrt.controlled; assert 'nanogdrt.data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ----------------------------------------------------------------------------- what is planted

def test_setting_0_plants_nothing(tokenizer):
    """Generic items are targets at their catalogue share, and for every target token the joint
    frequency of (its prefix, it) equals the catalogue's (each item once): the auxiliary tokens
    (the task text, the same in every prompt, and the prefix) predict nothing beyond chance."""
    w, xs = world(0.0), windows(0.0)
    sd = clustered_sd(w)
    generic = set(w.generic)
    share = sum(x.target in generic for x in xs) / len(xs)
    assert abs(share - len(generic) / len(w.titles)) < Z * sd
    assert next_item_distribution(w, xs[0].history) == controlled.history_distribution(w, xs[0].history)
    builder = PromptBuilder(tokenizer, "controlled")
    pairs = lambda items: Counter(tuple(ids[:t + 1]) for i in items for ids in [builder.target_ids(w.titles[i])]
                                  for t in range(len(ids)))
    seen, chance = pairs(x.target for x in xs), pairs(w.titles)
    worst = max(abs(seen[p] / len(xs) - chance[p] / len(w.titles)) for p in chance)
    assert worst < Z * sd, (worst, sd)
    # the same test has the power to see a shortcut of 0.1
    seen = pairs(x.target for x in windows(0.1))
    assert max(seen[p] / len(windows(0.1)) - chance[p] / len(w.titles) for p in chance) > 2 * Z * sd


def test_shortcut_planted_at_its_rate():
    """With probability s the target is a generic item whatever the history; bought, a generic
    item is continued like any line, so the generic share is s + (1 - s) P_hist(generic)."""
    s = 0.3
    w, xs = world(s), windows(s)
    generic = set(w.generic)
    p = []
    for x in xs:
        mass = sum(q for i, q in next_item_distribution(w, x.history).items() if i in generic)
        hist = sum(q for i, q in controlled.history_distribution(w, x.history).items() if i in generic)
        open_generic = bool(generic - set(x.history))
        assert math.isclose(mass, s + (1 - s) * hist if open_generic else hist)
        p.append(mass)
    share = sum(x.target in generic for x in xs) / len(xs)
    assert abs(share - sum(p) / len(p)) < Z * martingale_sd(p)
    assert sum(p) / len(p) > s
    # far above the generic line's catalogue share, which setting 0 keeps
    assert share - len(generic) / len(w.titles) > s - Z * clustered_sd(w)


# ----------------------------------------------------------------------------- the ground truth

def test_oracle_right_by_construction():
    w = world(0.3, n_users=250)
    xs = windows(0.3, n_users=250)
    ranked = oracle_topk(w, xs, k=10)
    hits = {k: [] for k in (1, 5, 10)}
    for x, items in zip(xs, ranked):
        dist = next_item_distribution(w, x.history)
        assert dist[items[0]] == max(dist.values())                     # top-1 = argmax
        assert [dist[i] for i in items] == sorted(dist.values(), reverse=True)[:10]
        for k in hits:
            hits[k].append(sum(sorted(dist.values(), reverse=True)[:k]))  # summed top-k mass
    for k in (1, 5, 10):
        expected = controlled.expected_accuracy(w, xs, ranked, ks=(k,))[f"HR@{k}"]
        assert math.isclose(expected, sum(hits[k]) / len(xs))
        realized = evaluate(ranked, [x.target for x in xs], [x.history for x in xs], ks=(k,))[f"HR@{k}"]
        assert abs(realized - expected) < Z * martingale_sd(hits[k])
    # no other ranking does better in expectation: the popularity ranking, a shuffled oracle
    popular = [i for i, _ in Counter(x.target for x in xs).most_common(10)]
    other = controlled.expected_accuracy(w, xs, [popular] * len(xs))
    shuffled = controlled.expected_accuracy(w, xs, [items[::-1] for items in ranked])
    best = controlled.expected_accuracy(w, xs, ranked)
    for m in best:
        assert best[m] >= other[m] and best[m] >= shuffled[m] - 1e-12
    assert best["NDCG@10"] > shuffled["NDCG@10"]


def test_world_groups_feed_the_metrics():
    w = world(0.3, n_users=250)
    xs = windows(0.3, n_users=250)
    groups = controlled.world_groups(w)
    assert sorted(i for i, g in groups.items() if g == 1) == w.generic and set(groups) == set(w.titles)
    all_generic = [w.generic[:5]] * len(xs)
    m = evaluate(all_generic, [x.target for x in xs], [x.history for x in xs], item_group=groups, ks=(5,),
                 n_groups=controlled.WORLD_GROUPS)
    gh = sum(i in set(w.generic) for x in xs for i in x.history) / sum(len(x.history) for x in xs)
    assert math.isclose(m["MGU@5"], 1 - gh) and math.isclose(m["DGU@5"], 2 * (1 - gh))


def test_train_py_options_reach_the_world_and_are_refused_elsewhere():
    from nanogdrt.infra.config import parse_args
    from nanogdrt.infra.validate import ArgumentError

    cfg = parse_args(["--dataset", "controlled", "--shortcut", "0.3", "--world-seed", "2"])
    assert (cfg.shortcut, cfg.world_seed, cfg.train_samples, cfg.valid_users) == (0.3, 2, 192, 64)
    with pytest.raises(ArgumentError, match="--dataset controlled"):
        parse_args(["--dataset", "toy", "--shortcut", "0.3"])
    with pytest.raises(ArgumentError, match="--shortcut"):
        parse_args(["--dataset", "controlled", "--shortcut", "1"])
