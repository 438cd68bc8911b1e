"""scripts/repro.py's report arithmetic: bootstrap intervals over users and the paired difference."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import repro  # noqa: E402


def _users(n, hit_rate, seed):
    rng = np.random.default_rng(seed)
    ranked, inter = [], []
    for u in range(n):
        items = [int(x) for x in rng.choice(50, 10, replace=False)]
        target = items[int(rng.integers(0, 10))] if rng.random() < hit_rate else 99
        inter.append(SimpleNamespace(target=target, history=[int(x) for x in rng.choice(50, 4)]))
        ranked.append(items)
    return ranked, inter


def test_bootstrap_point_estimates_intervals_and_paired_difference():
    titles = {i: f"item {i}" for i in range(100)}
    groups = {i: 1 + i % 5 for i in range(100)}
    sft, gdrt = _users(120, 0.3, 0), _users(120, 0.6, 1)
    table = repro.bootstrap({"SFT": sft, "GDRT": gdrt}, titles, groups, n_boot=200, seed=0)
    for name, users in (("SFT", sft), ("GDRT", gdrt)):
        point = repro.table_metrics(*users, titles, groups)
        for k in repro.TABLE_KEYS:
            v, lo, hi = table[name][k]
            assert v == pytest.approx(point[k]) and lo <= v <= hi
    v, lo, hi = table["GDRT - SFT"]["HR@10"]
    assert v == pytest.approx(0.6 - 0.3, abs=0.15) and lo > 0          # a real difference is resolved
    same = repro.bootstrap({"SFT": sft, "GDRT": sft}, titles, groups, n_boot=50, seed=0)
    assert all(same["GDRT - SFT"][k] == (0.0, 0.0, 0.0) for k in repro.TABLE_KEYS)


def test_grid_spec_is_checked():
    assert repro.parse_grid("5:0.5,2:1") == [(5, 0.5), (2, 1.0)]
    with pytest.raises(SystemExit, match="--grid"):
        repro.parse_grid("5-0.5")
