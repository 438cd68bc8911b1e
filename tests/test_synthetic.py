"""The embedded synthetic dataset: deterministic, shaped like the real data, and learnable."""

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from nanogdrt.data import MAX_HISTORY, MIN_HISTORY, load_dataset
from nanogdrt.metrics import evaluate
from nanogdrt.synthetic import SMALL, SyntheticConfig, generate


def synthetic_dataset(**config):
    return load_dataset("synthetic", synthetic=SyntheticConfig(**config))


def test_deterministic_for_a_seed():
    a, b, c = synthetic_dataset(seed=0), synthetic_dataset(seed=0), synthetic_dataset(seed=1)
    assert a == b and a == load_dataset("synthetic")  # the default config is the embedded dataset
    assert a.titles != c.titles and a.test != c.test
    assert a.source == "synthetic(seed=0)" and c.source == "synthetic(seed=1)"


def test_generator_gives_titles_and_sequences_only():
    titles, sequences = generate(SMALL)
    assert len(titles) == 6 * 2 * 10 and len(sequences) == 200  # brands x lines x items, users
    for seq in sequences.values():
        times = [t for _, t in seq]
        assert times == sorted(times) and len({i for i, _ in seq}) == len(seq) and len(seq) >= 5
    ds = load_dataset("synthetic", synthetic=SMALL)
    assert ds.titles == titles
    assert len(ds.train) + len(ds.valid) + len(ds.test) == sum(len(s) - MIN_HISTORY for s in sequences.values())


def test_synthetic_config_only_for_synthetic(tmp_path):
    with pytest.raises(ValueError, match="synthetic"):
        load_dataset("toy", data_dir=tmp_path, synthetic=SMALL)


def test_synthetic_does_not_import_the_loader():
    code = "import sys, nanogdrt.synthetic; assert 'nanogdrt.data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_shape_like_the_real_data():
    ds = synthetic_dataset()
    assert 1_500 <= len(ds.titles) <= 3_000 and sorted(ds.titles) == list(range(1, len(ds.titles) + 1))
    assert len(set(ds.titles.values())) == len(ds.titles)
    assert all(3 <= len(t.split()) <= 6 for t in ds.titles.values())
    assert 1_000 <= len(ds.train) <= 2_000 and 150 <= len(ds.valid) <= 500 and 150 <= len(ds.test) <= 500
    for split in (ds.train, ds.valid, ds.test):
        assert [x.row for x in split] == list(range(len(split)))
        for x in split:
            assert MIN_HISTORY <= len(x.history) <= MAX_HISTORY
            assert x.target not in x.history and set(x.history) <= ds.titles.keys()
    # brand/product-line prefixes are shared: many titles start with the same two words
    prefixes = Counter(" ".join(t.split()[:2]) for t in ds.titles.values())
    assert max(prefixes.values()) >= 20


def test_load_dataset_synthetic_subsamples_in_order():
    full = load_dataset("synthetic")
    small = load_dataset("synthetic", train_samples=100, test_samples=50, seed=3)
    assert len(small.train) == 100 and len(small.test) == 50 and len(small.valid) == len(full.valid)
    rows = [x.row for x in small.train]
    assert rows == sorted(rows) and all(full.train[r] == x for r, x in zip(rows, small.train))
    assert small.train == load_dataset("synthetic", train_samples=100, seed=3).train
    assert small.train != load_dataset("synthetic", train_samples=100, seed=4).train


def _top_k(scores, exclude, fallback, k=10):
    ranked = sorted((item for item in scores if item not in exclude), key=lambda i: -scores[i])[:k]
    return ranked + [i for i in fallback if i not in exclude and i not in ranked][:k - len(ranked)]


def test_history_matters_cooccurrence_beats_most_popular():
    ds = synthetic_dataset()
    popularity = Counter(x.target for x in ds.train)
    most_popular = [item for item, _ in popularity.most_common()]
    # item-to-item: how often b followed a (a in the history of a window whose target is b)
    follows = defaultdict(Counter)
    for x in ds.train:
        for a in x.history:
            follows[a][x.target] += 1
    pop_lists, cooc_lists = [], []
    for x in ds.test:
        scores = Counter()
        for age, a in enumerate(reversed(x.history)):  # recent items weigh more
            for b, n in follows[a].items():
                scores[b] += n / (age + 1)
        cooc_lists.append(_top_k(scores, set(x.history), most_popular))
        pop_lists.append(_top_k({}, set(x.history), most_popular))
    targets, histories = [x.target for x in ds.test], [x.history for x in ds.test]
    pop = evaluate(pop_lists, targets, histories)
    cooc = evaluate(cooc_lists, targets, histories)
    assert cooc["HR@10"] >= 2 * pop["HR@10"] and cooc["HR@10"] >= 0.1, (pop, cooc)
    assert cooc["NDCG@10"] > pop["NDCG@10"]
