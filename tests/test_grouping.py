"""grouping.py against references: full forward passes (Eq. 3), brute force and scikit-learn (k-means)."""

import itertools
import os
import sys

import numpy as np
import pytest
import torch

from nanogdrt import grouping
from nanogdrt.grouping import (group_values, item_relevance, item_token_logprobs, load_or_compute,
                               masked_prompt_ids, model_fingerprint, score_targets, token_groups,
                               token_relevance)
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.prompt import PromptBuilder

TITLES = ["LEGO City Fire Station", "Melissa & Doug Wooden Abacus", "Uno Card Game",
          "Ravensburger 500 Piece Puzzle - Lighthouse", "Uno Card Game", "Play-Doh"]


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg).eval()


@torch.no_grad()
def reference_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """The straightforward way: one full forward, log_softmax at the positions before ids[start:]."""
    logp = model(torch.tensor([ids])).float().log_softmax(-1)[0]          # (T, V)
    pos = torch.arange(start, len(ids))
    return logp[pos - 1, torch.tensor(ids[start:])]


# ----------------------------------------------------------------------------- Eq. 3

def test_score_targets_equals_full_forward_tiny():
    vocab = 101
    model = tiny_model(vocab)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (13,), generator=g).tolist()
    targets = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 5, 3, 9, 2, 5, 7)]
    got = score_targets(model, prompt, targets, batch_size=3)              # several padded batches
    for t, lp in zip(targets, got):
        ref = reference_logprobs(model, prompt + t, len(prompt))
        assert lp.shape == (len(t),)
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)


def test_item_logprobs_equal_masked_prompt_forward(tokenizer):
    """Via PromptBuilder, vs build(history, target, mask_history=True): the history is irrelevant."""
    model = tiny_model(tokenizer.vocab_size)
    builder = PromptBuilder(tokenizer, "toy")
    got = item_token_logprobs(model, builder, TITLES, batch_size=4)
    for title, lp in zip(TITLES, got):
        p = builder.build(["Some Other Toy", "Another One"], title, mask_history=True)
        ref = reference_logprobs(model, p.ids, p.target[0])
        assert lp.shape == (len(builder.target_ids(title)),)
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[2], got[4])                            # same title, same scores


def test_item_logprobs_equal_masked_prompt_forward_smollm(smollm, tokenizer):
    builder = PromptBuilder(tokenizer, "toy")
    titles = TITLES[:3]
    got = item_token_logprobs(smollm, builder, titles, batch_size=2)
    for title, lp in zip(titles, got):
        p = builder.build(["Bath Time Puzzle"], title, mask_history=True)
        ref = reference_logprobs(smollm, p.ids, p.target[0])
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
        assert (lp <= 0).all()


def test_item_and_token_relevance():
    lps = [torch.tensor([-1.0, -3.0]), torch.tensor([-0.5]), torch.tensor([-2.0, -2.0, -5.0])]
    torch.testing.assert_close(item_relevance(lps), torch.tensor([-2.0, -0.5, -3.0]))   # Eq. 2
    rel = token_relevance(lps, [2, 0, 2])
    assert [r.tolist() for r in rel] == [[-2.0, -2.0, -5.0], [-1.0, -3.0], [-2.0, -2.0, -5.0]]
    groups = token_groups(rel, 2, backend="dp")
    assert [g.tolist() for g in groups] == [[1, 1, 2], [1, 1], [1, 1, 2]]   # {-5, -5} vs the rest


# ----------------------------------------------------------------------------- disk cache

def test_cache_roundtrip_and_staleness(tokenizer, tmp_path, monkeypatch):
    model = tiny_model(tokenizer.vocab_size)
    builder = PromptBuilder(tokenizer, "toy")
    first = load_or_compute(model, builder, "toy", TITLES, tmp_path)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors")         # no temporary file left

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although a valid cache entry exists")

    with monkeypatch.context() as m:
        m.setattr(grouping, "score_targets", fail)
        again = load_or_compute(model, builder, "toy", TITLES, tmp_path)
    for a, b in zip(first, again):
        assert torch.equal(a, b)

    # Any change of model weights, titles or dataset is a new key, never the old entry.
    fp = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3          # one element, maybe unsampled
    assert model_fingerprint(model) != fp
    changed = load_or_compute(model, builder, "toy", TITLES, tmp_path)
    assert not torch.equal(changed[0], first[0])
    load_or_compute(model, builder, "toy", TITLES[:-1], tmp_path)
    load_or_compute(model, builder, "book", TITLES, tmp_path)
    assert len(os.listdir(tmp_path)) == 4


def test_masked_prompt_has_no_history(tokenizer):
    builder = PromptBuilder(tokenizer, "toy")
    p = builder.build(["A", "B"], "C", mask_history=True)
    assert masked_prompt_ids(builder) == p.ids[:p.target[0]]


# ----------------------------------------------------------------------------- grouping

def sse(values, groups):
    values, groups = np.asarray(values, float), np.asarray(groups)
    return sum(((values[groups == g] - values[groups == g].mean()) ** 2).sum() for g in np.unique(groups))


def brute_force_sse(values, k):
    """Optimal 1-D k-means clusters are contiguous in sorted order: try every set of cut points."""
    u, counts = np.unique(values, return_counts=True)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(u)), k - 1):
        labels = np.searchsorted(np.array(cuts), np.arange(len(u)), side="right")
        best = min(best, sse(np.repeat(u, counts), np.repeat(labels, counts)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=rng.integers(4, 11)) * 2, 1)       # rounding makes ties
    for k in range(1, min(4, len(np.unique(values))) + 1):
        groups = group_values(values, k, backend="dp")
        assert sse(values, groups) == pytest.approx(brute_force_sse(values, k), abs=1e-9)


@pytest.mark.parametrize("G", [2, 5, 10])
def test_dp_never_worse_than_sklearn(G):
    rng = np.random.default_rng(G)
    # Log-prob-like values: a heavy cluster near 0, a long tail, plenty of exact ties.
    values = np.concatenate([-rng.exponential(0.3, 3000), -rng.exponential(4.0, 1500),
                             np.repeat(-rng.uniform(0, 12, 50), 20)])
    dp = group_values(values, G, backend="dp")
    sk = group_values(values, G, backend="sklearn")
    assert sse(values, dp) <= sse(values, sk) + 1e-7 * max(1.0, sse(values, sk))
    for groups in (dp, sk):
        assert sorted(np.unique(groups)) == list(range(1, G + 1))
        means = [values[groups == g].mean() for g in range(1, G + 1)]
        assert means == sorted(means, reverse=True)                        # group 1 = highest


def test_ties_stay_together_and_groups_are_ordered():
    values = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 5.0, 9.0])
    for kwargs in ({"backend": "dp"}, {"backend": "sklearn"}, {"method": "quantile"}):
        g = group_values(values, 3, **kwargs)
        for v in np.unique(values):
            assert len(np.unique(g[values == v])) == 1
        assert all(np.diff(g[np.argsort(values)]) <= 0)                   # higher value, lower id


def test_edge_cases():
    # G above the number of distinct values: one group per value, ids 1..m.
    assert group_values([3.0, 1.0, 3.0, 2.0], 10).tolist() == [1, 3, 1, 2]
    # Constant input: a single group.
    assert group_values(np.full(7, -2.5), 5, backend="dp").tolist() == [1] * 7
    assert group_values(np.full(7, -2.5), 5, method="quantile").tolist() == [1] * 7
    # Empty input: empty output.
    assert group_values([], 5).shape == (0,)
    assert [g.tolist() for g in token_groups([], 3)] == []
    with pytest.raises(ValueError):
        group_values([1.0, float("nan")], 2)
    with pytest.raises(ValueError):
        group_values([1.0, 2.0], 0)
    with pytest.raises(ValueError):
        group_values([1.0, 2.0], 2, backend="nope")


def test_quantile_equal_sizes():
    values = np.random.default_rng(0).normal(size=1000)
    g = group_values(values, 5, method="quantile")
    assert np.bincount(g)[1:].tolist() == [200] * 5
    assert values[g == 1].min() > values[g == 2].max()


def test_auto_falls_back_to_dp_without_sklearn(monkeypatch):
    values = np.random.default_rng(1).normal(size=300)
    monkeypatch.setitem(sys.modules, "sklearn", None)                      # import now fails
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    assert np.array_equal(group_values(values, 4), group_values(values, 4, backend="dp"))


def test_dp_handles_many_distinct_values():
    values = np.random.default_rng(2).normal(size=100_000)
    g = group_values(values, 10, backend="dp")
    assert sorted(np.unique(g)) == list(range(1, 11))
