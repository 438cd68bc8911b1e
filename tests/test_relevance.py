"""relevance.py against references: full forward passes (Eq. 3), the disk cache's keys and staleness."""

import os
from types import SimpleNamespace

import pytest
import torch

from nanogdrt import relevance
from nanogdrt.grouping import token_groups
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.prompt import PromptBuilder
from nanogdrt.relevance import (CatalogueLogprobs, cache_dir, catalogue_logprobs, item_relevance, item_scores,
                                item_token_logprobs, load_or_compute, masked_prompt_ids, model_fingerprint,
                                score_targets, title_token_mask, title_token_masks, token_relevance)

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
    every = [torch.ones(len(lp), dtype=torch.bool) for lp in lps]
    torch.testing.assert_close(item_relevance(lps, every), torch.tensor([-2.0, -0.5, -3.0]))   # Eq. 2
    some = [torch.tensor([False, True]), torch.tensor([True]), torch.tensor([True, True, False])]
    torch.testing.assert_close(item_relevance(lps, some), torch.tensor([-3.0, -0.5, -2.0]))
    assert item_scores({7: lps[0], 3: lps[1]}, {7: some[0], 3: some[1]}) == {7: -3.0, 3: -0.5}
    assert item_scores(CatalogueLogprobs({7: lps[0]}, {7: some[0]})) == {7: -3.0}
    with pytest.raises(TypeError, match="title-token mask"):
        item_scores({7: lps[0]})                                   # no silent mean over every token
    with pytest.raises(ValueError, match="does not fit"):
        item_relevance(lps[:1], [torch.tensor([False, False])])    # no title token
    rel = token_relevance(lps, [2, 0, 2])
    assert [r.tolist() for r in rel] == [[-2.0, -2.0, -5.0], [-1.0, -3.0], [-2.0, -2.0, -5.0]]
    groups = token_groups(rel, 2, backend="dp")
    assert [g.tolist() for g in groups] == [[1, 1, 2], [1, 1], [1, 1, 2]]   # {-5, -5} vs the rest


# ----------------------------------------------------------------------------- Eq. 2's title tokens

def test_title_token_mask_by_hand(tokenizer):
    """SmolLM2 splits '"Go Fish!"' + EOS as '"', 'Go', ' Fish', '!"', EOS: the closing quote is fused
    with "!", so that token holds a title character and counts; the lone opening quote and EOS do
    not. Eq. 2 by hand: mean(-1, -2, -3) = -2 (the old mean over all five tokens: -2.5)."""
    builder = PromptBuilder(tokenizer, "toy")
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in builder.target_ids("Go Fish!")]
    assert pieces[:4] == ['"', "Go", " Fish", '!"'] and len(pieces) == 5
    mask = title_token_mask(builder, "Go Fish!")
    assert mask.tolist() == [False, True, True, True, False]
    lp = torch.tensor([-6.0, -1.0, -2.0, -3.0, -0.5])
    assert item_relevance([lp], [mask]).item() == -2.0
    # A title that starts with a quote: '""' fuses the opening quote with the title's own '"'.
    assert title_token_mask(builder, '"Quoted" Toy').tolist() == [True, True, True, True, True, False, False]
    assert title_token_mask(builder, "é").tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="empty title"):
        title_token_mask(builder, "")


class _FusedTokenizer:
    """Llama 3 style: the opening quote and the first word are one token ('"The')."""
    eos_id = 9

    def encode_with_offsets(self, text):
        assert text == '"The Toy"'
        return [5, 6, 7], [0, 4, 8]                                   # '"The', ' Toy', '"'


class _FusedBuilder:
    tokenizer = _FusedTokenizer()

    def target_ids(self, title):
        return [5, 6, 7, 9]


def test_title_token_mask_fused_opening_quote():
    assert title_token_mask(_FusedBuilder(), "The Toy").tolist() == [True, True, False, False]


def test_catalogue_logprobs_carry_title_masks(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    builder = PromptBuilder(tokenizer, "toy")
    dataset = SimpleNamespace(name="toy", titles={4: TITLES[0], 2: TITLES[3], 9: "Go Fish!"})
    logprobs = catalogue_logprobs(model, builder, dataset, cached=False, progress=False)
    assert list(logprobs) == [2, 4, 9]
    masks = title_token_masks(builder, [TITLES[3], TITLES[0], "Go Fish!"])
    for (item, lp), mask in zip(logprobs.items(), masks):
        assert torch.equal(logprobs.title_mask[item], mask) and mask.shape == lp.shape
        assert not mask[0] and not mask[-1]                           # SmolLM2: lone '"' first, EOS last
    expected = {i: lp[logprobs.title_mask[i]].mean().item() for i, lp in logprobs.items()}
    got = item_scores(logprobs)
    assert got.keys() == expected.keys()
    for i in got:
        assert abs(got[i] - expected[i]) < 1e-6


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
        m.setattr(relevance, "score_targets", fail)
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




def test_cache_dir_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "b"
    monkeypatch.delenv("NANOGDRT_CACHE")
    assert cache_dir() == relevance.DEFAULT_CACHE
