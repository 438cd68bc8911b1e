"""nanogdrt.analysis.groupings and regroup: each independent item grouping on a hand-made catalogue (popularity
with ties and never-seen items, the n-gram scores against brute-force counting and a hand-computed
case, length strata), the Fig. 8 distance by hand, MGU/DGU and the paired draw against metrics.py
and stats.py, the CLI on the small synthetic dataset, and its one-line refusals."""

import json
import math
import random

import numpy as np
import pytest

from nanogdrt import grouping, metrics, stats, synthetic
from nanogdrt.analysis import groupings as G
from nanogdrt.analysis import regroup as R
from nanogdrt.data import Interaction, load_dataset


# ----------------------------------------------------------------------------- popularity

def test_popularity_groups_by_hand():
    """(target count, history count) per item, ranked, cut in 5 chunks of 2, ties kept together:
        item     1      3      2      4  5   6      7  10   8  9 (never seen)
        counts   (3,0)  (2,2)  (2,0)  (1,0)  (0,2)  (0,1)  (0,0)
        rank     0      1      2      3  4   5      6  7    8  9
    The (1,0) run starts at rank 3 (chunk 2) and takes item 5 along from chunk 3; group 3 keeps
    item 6 alone. Target counts rank before history counts (item 2 above item 6)."""
    windows = [([3, 6], 1), ([3, 6], 1), ([7], 1), ([10], 2), ([], 2), ([], 3), ([], 3), ([], 4), ([], 5)]
    train = [Interaction(h, t, r) for r, (h, t) in enumerate(windows)]
    catalogue = {i: f"item {i}" for i in range(1, 11)}
    got = grouping.popularity_groups(train, catalogue)
    assert got == {1: 1, 3: 1, 2: 2, 4: 2, 5: 2, 6: 3, 7: 4, 10: 4, 8: 5, 9: 5}


def test_popularity_refuses_too_few_levels():
    """Three windows cannot rank ten items into five groups once ties stay together."""
    train = [Interaction([], t, r) for r, t in enumerate([1, 2, 3])]
    with pytest.raises(ValueError, match="fill only 2 of 5 groups"):
        grouping.popularity_groups(train, {i: "t" for i in range(1, 11)})


# ----------------------------------------------------------------------------- n-gram relevance

def brute_log_prob(others, context, token, vocab_size, order):
    """Witten-Bell's definition on the list of every (context, token) of `others`, counted from scratch."""
    grams = []
    for seq in others:
        p = [G.BOS] * (order - 1) + list(seq)
        grams += [(tuple(p[t - k:t]), p[t]) for t in range(order - 1, len(p)) for k in range(order)]
    prob = 1.0 / vocab_size
    for k in range(len(context) + 1):
        h = context[len(context) - k:]
        follow = [w for c, w in grams if c == h]
        if follow:
            prob = (follow.count(token) + len(set(follow)) * prob) / (len(follow) + len(set(follow)))
    return math.log(prob)


def test_ngram_relevance_by_brute_force():
    """Every item scored by the other items' n-grams only (leave-one-out), title tokens averaged."""
    rng = random.Random(0)
    seqs = {i: [1] + [rng.randint(2, 6) for _ in range(rng.randint(1, 5))] + [9] for i in range(1, 13)}
    seqs[13] = list(seqs[1])                                      # a shared title, as Toy has 57
    masks = {i: [False] + [True] * (len(s) - 2) + [False] for i, s in seqs.items()}   # quote, title, EOS
    for order in (1, 2, 3):
        got = G.ngram_relevance(seqs, masks, vocab_size=20, order=order)
        for i, s in seqs.items():
            others = [x for j, x in seqs.items() if j != i]
            p = [G.BOS] * (order - 1) + s
            want = np.mean([brute_log_prob(others, tuple(p[t:t + order - 1]), s[t], 20, order)
                            for t in range(len(s)) if masks[i][t]])
            assert got[i] == pytest.approx(want, abs=1e-12), (order, i)


def test_ngram_relevance_by_hand():
    """Bigrams, vocabulary 10; item 2 = [5, 7] scored on item 1 = [5, 6] alone:
        unigram P(5) = (1 + 2/10) / (2 + 2) = 0.3     P(5 | BOS) = (1 + 1 * 0.3) / (1 + 1) = 0.65
        unigram P(7) = (0 + 2/10) / (2 + 2) = 0.05    P(7 | 5)   = (0 + 1 * 0.05) / (1 + 1) = 0.025"""
    got = G.ngram_relevance({1: [5, 6], 2: [5, 7]}, {1: [True, True], 2: [True, True]}, vocab_size=10, order=2)
    assert got[2] == pytest.approx((math.log(0.65) + math.log(0.025)) / 2, abs=1e-12)


def test_ngram_groups_put_the_most_predictable_first():
    assert G.ngram_groups({i: -float(i) for i in range(1, 11)}) == {i: (i + 1) // 2 for i in range(1, 11)}


# ----------------------------------------------------------------------------- length strata

def test_length_groups_by_hand():
    """Lengths ranked (longest first) and cut in chunks of 2; equal lengths stay together:
        item     7  4  10  3 8  9  1 2  6  5
        length   9  7  6   5 5  4  3 3  2  1     the 5-run starts in chunk 2 and takes item 8 along."""
    lengths = dict(zip(range(1, 11), [3, 3, 5, 7, 1, 2, 9, 5, 4, 6]))
    assert G.length_groups(lengths) == {7: 1, 4: 1, 10: 2, 3: 2, 8: 2, 9: 3, 1: 4, 2: 4, 6: 5, 5: 5}


# ----------------------------------------------------------------------------- the metrics

def test_total_variation_by_hand():
    """Top-1 shares (1/2, 1/4, 1/4, 0, 0) against targets' (1/4, 1/4, 1/4, 1/4, 0): 1/2 (1/4 + 1/4)."""
    assert R.total_variation([2, 1, 1, 0, 0], [1, 1, 1, 1, 0]) == pytest.approx(0.25)
    assert R.total_variation([1, 0, 0, 0, 0], [0, 0, 0, 0, 3]) == pytest.approx(1.0)


def small_case(seed=0):
    """The small synthetic dataset, two made-up rows on nested users, and an item grouping."""
    ds = load_dataset("synthetic", synthetic=synthetic.SMALL)
    rng = random.Random(seed)
    items = sorted(ds.titles)
    rec = lambda x: {"row": x.row, "target_item_id": x.target, "topk_item_ids": rng.sample(items, 10)}  # noqa: E731
    a = [rec(x) for x in ds.test]
    b = [rec(x) for x in ds.test[: len(ds.test) - 5]]             # a subset: pairs use the common users
    group = {i: 1 + (i * 7) % 5 for i in items}
    return ds, a, b, group


def test_fig8_and_metrics_against_metrics_py():
    """With all weights 1: MGU/DGU@5/@10 are metrics.py's, TV is the hand formula on the top-1 and
    target shares (metrics.group_distribution); A - B is paired on the common users."""
    ds, a, b, group = small_case()
    by_row = {x.row: x for x in ds.test}
    ta, tb = (R.terms(r, by_row, ds.titles, group) for r in (a, b))
    point = {k: v[0] for k, v in ta.table(np.ones((1, len(a)))).items()}
    ev = metrics.evaluate([r["topk_item_ids"] for r in a], [r["target_item_id"] for r in a],
                          [by_row[r["row"]].history for r in a], group)
    for k in ("MGU@5", "DGU@5", "MGU@10", "DGU@10"):
        assert point[k] == pytest.approx(ev[k], abs=1e-12)
    p = metrics.group_distribution([r["topk_item_ids"][0] for r in a], group)
    q = metrics.group_distribution([r["target_item_id"] for r in a], group)
    assert point["TV"] == pytest.approx(0.5 * np.abs(p - q).sum(), abs=1e-12)
    d = R.paired_cells(tb, ta, B=20, seed=3)
    sub = ta.subset(tb.rows).table(np.ones((1, len(b))))
    assert d["TV"][0] == pytest.approx(tb.table(np.ones((1, len(b))))["TV"][0] - sub["TV"][0], abs=1e-12)


def test_paired_draw_is_stats_paired():
    """The paired MGU@5/DGU@5 intervals are stats.paired's to the last digit: the same resamples."""
    ds, a, b, group = small_case(1)
    by_row = {x.row: x for x in ds.test}
    ta, tb = (R.terms(r, by_row, ds.titles, group) for r in (a, b))
    ours = R.paired_cells(tb, ta, B=50, seed=7)
    theirs = stats.paired(tb.users[5], ta.users[5], 50, 7)
    assert ours["MGU@5"] == theirs["MGU@5"] and ours["DGU@5"] == theirs["DGU@5"]


# ----------------------------------------------------------------------------- command line

def write_rows(tmp_path, a, b, group):
    for name, records in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "groups.json").write_text(json.dumps({str(k): v for k, v in group.items()}))
    return [f"A={tmp_path / 'a.jsonl'}", f"B={tmp_path / 'b.jsonl'}", "--dataset", "synthetic",
            "--synthetic-size", "small", "--item-groups", str(tmp_path / "groups.json")]


def test_cli_on_a_tiny_case(tmp_path, capsys):
    ds, a, b, group = small_case(2)
    argv = write_rows(tmp_path, a, b, group) + ["--ref", "A", "--bootstrap", "30",
                                                "--out", str(tmp_path / "o.json"), "--md", str(tmp_path / "o.md")]
    R.main(argv)
    out = json.loads((tmp_path / "o.json").read_text())
    assert list(out["groupings"]) == ["eq2", "popularity", "ngram", "length"]
    assert all(sum(g["sizes"]) == len(ds.titles) for g in out["groupings"].values())
    assert out["groupings"]["eq2"]["spearman_with_eq2"] == pytest.approx(1.0)
    assert set(out["rows"]) == {"A", "B"} and set(out["paired"]) == {"B - A"}
    by_row = {x.row: x for x in ds.test}
    ev = metrics.evaluate([r["topk_item_ids"] for r in a], [r["target_item_id"] for r in a],
                          [by_row[r["row"]].history for r in a], group)
    assert out["rows"]["A"]["eq2"]["DGU@5"][0] == pytest.approx(ev["DGU@5"], abs=1e-12)
    md = (tmp_path / "o.md").read_text()
    assert md.splitlines()[2].startswith("Command: `python -m nanogdrt.analysis.regroup A=")
    assert md == capsys.readouterr().out
    assert "| B - A | popularity |" in md


@pytest.mark.parametrize("change, message", [
    (lambda argv, p: argv[:1] + ["Bnope"] + argv[2:], "not NAME=PATH"),
    (lambda argv, p: argv[:1] + ["A=" + str(p / "b.jsonl")] + argv[2:], "given twice"),
    (lambda argv, p: argv[:1] + ["B=" + str(p / "none.jsonl")] + argv[2:], "none.jsonl: no such predictions file"),
    (lambda argv, p: argv + ["--ref", "C"], "--ref: no row named 'C'"),
    (lambda argv, p: argv + ["--pair", "A", "Z"], "--pair: no row named 'Z'"),
    (lambda argv, p: argv + ["--pair", "A", "A"], "--pair: A minus itself"),
    (lambda argv, p: argv + ["--bootstrap", "0"], "--bootstrap"),
    (lambda argv, p: [x.replace("groups.json", "bad.json") for x in argv], "bad.json: item 1 has group 9"),
    (lambda argv, p: [x.replace("groups.json", "short.json") for x in argv], "short.json: 1 catalogue items have no group"),
])
def test_bad_input_is_one_line(tmp_path, change, message):
    ds, a, b, group = small_case(3)
    argv = write_rows(tmp_path, a, b, group)
    (tmp_path / "bad.json").write_text(json.dumps({str(k): 9 if k == 1 else v for k, v in group.items()}))
    (tmp_path / "short.json").write_text(json.dumps({str(k): v for k, v in group.items() if k != 1}))
    with pytest.raises(SystemExit) as e:
        R.main(change(argv, tmp_path))
    text = str(e.value)
    assert message in text and "\n" not in text


def test_refuses_a_training_split_too_small_for_popularity(tmp_path):
    """The full synthetic store's 1,669 training windows leave most items tied: four groups at most."""
    ds = load_dataset("synthetic")
    a = [{"row": x.row, "target_item_id": x.target, "topk_item_ids": [x.target]} for x in ds.test]
    argv = write_rows(tmp_path, a, a, {i: 1 + i % 5 for i in ds.titles})
    with pytest.raises(SystemExit) as e:
        R.main([x if x != "small" else "full" for x in argv])
    assert str(e.value).startswith("--train-file: popularity: the training counts of 1669 windows fill only 4")
