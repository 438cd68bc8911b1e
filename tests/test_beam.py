"""Constrained beam search against brute force (tiny model) and transformers' generate (SmolLM2).

Tolerances: scores agree to 1e-4 (float32, different but equivalent attention kernels); two
items may swap places only where their scores tie within that tolerance.
"""

import ast
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from nanogdrt.beam import beam_search
from nanogdrt.baselines.d3 import Scoring
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.trie import Trie
from tests.references import hf_constrained_beam_search

TOL = 1e-4
EOS = 2


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Llama(config).eval()
    with torch.no_grad():  # sharper distributions than the default init: fewer near-ties
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny_catalogue():
    """17 items, 15 distinct titles of 1 to 5 tokens from a small alphabet (many shared prefixes)."""
    g = torch.Generator().manual_seed(1)
    items, seen = {}, set()
    while len(seen) < 15:
        ids = torch.randint(3, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            items[100 + len(items)] = ids + [EOS]
    items[200], items[201] = items[100], items[103]  # two titles carried by two ids each
    return items


def brute_force(model, prompt, items, length_penalty, normaliser="vocab"):
    """Every distinct title scored by one full forward pass: [(score, ids, item ids)], best first.

    normaliser "allowed": each position's softmax over the tokens that continue some title with
    the same prefix (found by listing the titles, not through the trie)."""
    by_title = {}
    for item, ids in items.items():
        by_title.setdefault(tuple(ids), []).append(item)
    ranked = []
    for ids, its in by_title.items():
        seq = torch.tensor([prompt + list(ids)])
        with torch.no_grad():
            logits = model(seq)[0, len(prompt) - 1:-1].float()
        if normaliser == "allowed":
            for i in range(len(ids)):
                allowed = sorted({t[i] for t in by_title if len(t) > i and t[:i] == ids[:i]})
                blocked = torch.ones(logits.shape[1], dtype=torch.bool)
                blocked[allowed] = False
                logits[i, blocked] = float("-inf")
        logp = F.log_softmax(logits, dim=-1)
        total = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
        ranked.append((total / len(ids) ** length_penalty, list(ids), sorted(its)))
    return sorted(ranked, key=lambda r: -r[0])


def assert_same_ranking(ids_a, scores_a, ids_b, scores_b, tol=TOL):
    """Equal lists and scores, except that items whose scores tie within `tol` may swap."""
    assert len(ids_a) == len(ids_b)
    assert torch.allclose(torch.tensor(scores_a), torch.tensor(scores_b), atol=tol, rtol=0)
    for i, (a, s) in enumerate(zip(ids_a, scores_a)):
        if a != ids_b[i]:
            j = ids_b.index(a) if a in ids_b else len(ids_b) - 1
            assert abs(s - scores_b[j]) < tol, f"rank {i}: {a} vs {ids_b[i]} (scores {s}, {scores_b[i]})"


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_wide_beam_equals_exhaustive_ranking(tiny, tiny_catalogue, length_penalty):
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    n = len(trie)
    prompts = [[1, 9, 12, 30, 7], [1, 9, 12, 5, 6, 7, 8, 20, 21, 22], [1, 3]]  # different lengths
    recs = beam_search(tiny, prompts, trie, beams=n, top_k=n, length_penalty=length_penalty, batch_size=3)
    for prompt, rec in zip(prompts, recs):
        ref = brute_force(tiny, prompt, tiny_catalogue, length_penalty)
        assert_same_ranking(rec.item_ids, rec.scores, [r[2][0] for r in ref], [r[0] for r in ref])
        for ids, its in zip(rec.token_ids, rec.all_item_ids):
            assert tuple(tiny_catalogue[its[0]]) == tuple(ids) and list(its) == sorted(its)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_allowed_normaliser_equals_exhaustive_ranking(tiny, tiny_catalogue, length_penalty):
    """Scoring(normaliser="allowed"): the softmax over each step's allowed tokens, as brute force."""
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    n = len(trie)
    prompts = [[1, 9, 12, 30, 7], [1, 3]]
    recs = beam_search(tiny, prompts, trie, beams=n, top_k=n, length_penalty=length_penalty, batch_size=2,
                       scoring=Scoring(normaliser="allowed"))
    for prompt, rec in zip(prompts, recs):
        ref = brute_force(tiny, prompt, tiny_catalogue, length_penalty, normaliser="allowed")
        assert_same_ranking(rec.item_ids, rec.scores, [r[2][0] for r in ref], [r[0] for r in ref])
        vocab = brute_force(tiny, prompt, tiny_catalogue, length_penalty)
        by_title = lambda ranked: sorted(ranked, key=lambda r: r[1])   # noqa: E731
        assert max(abs(a[0] - b[0]) for a, b in zip(by_title(ref), by_title(vocab))) > 0.1   # the option matters


def test_batched_equals_one_user_at_a_time(tiny, tiny_catalogue):
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    g = torch.Generator().manual_seed(2)
    prompts = [[1] + torch.randint(3, 40, (int(L),), generator=g).tolist() for L in [3, 9, 1, 14, 6, 6]]
    batched = beam_search(tiny, prompts, trie, beams=4, top_k=3, batch_size=4)
    for prompt, rec in zip(prompts, batched):
        alone = beam_search(tiny, [prompt], trie, beams=4, top_k=3, batch_size=1)[0]
        assert_same_ranking(rec.item_ids, rec.scores, alone.item_ids, alone.scores, tol=1e-5)
        assert len(rec.item_ids) == 3


def test_squeezing_the_tree_cache_changes_nothing(tiny, tiny_catalogue, monkeypatch):
    import nanogdrt.beam as beam
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 40, (int(L),), generator=g).tolist() for L in [5, 2, 11, 7, 4]]
    results = {}
    for when in (0.0, 2.0):  # squeeze whenever a column is dead / only when the cache is full
        monkeypatch.setattr(beam, "COMPACT_WHEN_DEAD", when)
        monkeypatch.setattr(beam, "FIRST_CACHE_STEPS", 1)
        results[when] = beam_search(tiny, prompts, trie, beams=5, top_k=5, batch_size=2)
    for a, b in zip(results[0.0], results[2.0]):
        assert_same_ranking(a.item_ids, a.scores, b.item_ids, b.scores, tol=1e-5)


def test_rejects_top_k_above_beams(tiny, tiny_catalogue):
    with pytest.raises(ValueError, match="top_k"):
        beam_search(tiny, [[1, 2]], Trie.from_token_ids(tiny_catalogue, EOS), beams=2, top_k=3)


def test_equals_transformers_generate_on_toy_users(smollm, hf_smollm, tokenizer, toy_dir):
    """5 real test users, fp32: same top-10 as transformers (~5-10 s per user for transformers).

    Two slots for five users: finished users' slots are refilled, and the batch shrinks at the end.
    """
    from nanogdrt.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, "toy")
    titles = {int(k): v for k, v in json.loads((toy_dir / "id2name.json").read_text()).items()}
    trie = Trie.from_titles(titles, builder)
    with open(toy_dir / "test.csv", newline="") as f:
        rows = [r for _, r in zip(range(5), csv.DictReader(f))]
    prompts = [builder.build([titles[i] for i in ast.literal_eval(r["item_ids"])[:-1]]).ids for r in rows]
    assert len({len(p) for p in prompts}) > 1  # the slots mix prompt lengths
    recs = beam_search(smollm, prompts, trie, beams=10, top_k=10, batch_size=2)
    for prompt, rec in zip(prompts, recs):
        ref_items, ref_scores = hf_constrained_beam_search(hf_smollm, prompt, trie, 10, tokenizer.eos_id)
        assert_same_ranking(rec.item_ids, rec.scores, ref_items, ref_scores)
