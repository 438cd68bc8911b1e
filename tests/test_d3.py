"""D3 decoding (nanogdrt/baselines/d3.py) against CBS, brute force and a hand computation.

- Ghost threshold above 1 and alpha 0: exactly CBS (same lists, same float scores).
- A tiny model over a 30-title catalogue, beams >= catalogue size: D3's ranking equals D3's score
  computed title by title from full forward passes and the assistant's item probabilities
  (tolerance 1e-4 on scores, as tests/test_beam.py).
- The assistant's token probabilities on a hand-made trie equal a hand computation (1e-6).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import recommend as recommend_cli
from nanogdrt.baselines import d3
from nanogdrt.beam import beam_search
from nanogdrt.baselines.d3 import Scoring
from nanogdrt.trie import Trie
from tests.test_beam import EOS, TOL, assert_same_ranking, tiny, tiny_catalogue  # noqa: F401 (fixtures)

PROMPTS = [[1, 9, 12, 30, 7], [1, 9, 12, 5, 6, 7, 8, 20, 21, 22], [1, 3]]


@pytest.fixture(scope="module")
def peaked():
    """A tiny model that puts most of its mass on the title tokens (EOS, 3..8): ghost tokens occur."""
    from nanogdrt.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Llama(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[9:] = 0.0
        model.lm_head.weight[:9] *= 4.0
    return model


@pytest.fixture(scope="module")
def catalogue():
    """32 items, 30 distinct titles of 1 to 5 tokens over 6 tokens (many shared prefixes)."""
    g = torch.Generator().manual_seed(5)
    items, seen = {}, set()
    while len(seen) < 30:
        ids = torch.randint(3, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            items[10 + len(items)] = ids + [EOS]
    items[50], items[51] = items[10], items[17]  # two titles carried by two ids each
    return items


def item_table(catalogue, users, seed=0):
    """(users, max id + 1) probabilities over the catalogue's item ids (0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(users, max(catalogue) + 1)
    ids = torch.tensor(sorted(catalogue))
    table[:, ids] = (3 * torch.randn(users, len(ids), generator=g)).softmax(-1)
    return table


def brute_force_d3(model, prompt, items, probs, alpha, threshold, length_penalty):
    """Every distinct title's D3 score, from one forward pass and the items' probabilities:
    [(score, ids, item ids, ghost tokens)], best first."""
    by_title = {}
    for item, ids in items.items():
        by_title.setdefault(tuple(ids), []).append(item)

    def mass(prefix):  # assistant probability of the items whose title starts with `prefix`
        return sum(float(probs[i]) for i, ids in items.items() if tuple(ids[:len(prefix)]) == prefix)

    ranked = []
    for ids, its in by_title.items():
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([prompt + list(ids)]))[0, len(prompt) - 1:-1].float(), -1)
        total, ghosts = 0.0, 0
        for j, t in enumerate(ids):
            lp = logp[j, t].item()
            ghosts += lp > math.log(threshold)
            if alpha:
                children = {c[j] for c in by_title if c[:j] == ids[:j]}
                norm = sum(mass(ids[:j] + (c,)) + d3.ASSISTANT_EPS for c in children)
                lp = (1 - alpha) * lp + alpha * math.log((mass(ids[:j + 1]) + d3.ASSISTANT_EPS) / norm)
            total += lp
        ranked.append((total / max(len(ids) - ghosts, 1) ** length_penalty, list(ids), sorted(its), ghosts))
    return sorted(ranked, key=lambda r: -r[0])


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_threshold_above_one_and_no_assistant_is_cbs(tiny, tiny_catalogue, length_penalty):
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    g = torch.Generator().manual_seed(4)
    prompts = PROMPTS + [[1] + torch.randint(3, 40, (int(L),), generator=g).tolist() for L in [3, 9, 14, 6]]
    cbs = beam_search(tiny, prompts, trie, beams=4, top_k=4, length_penalty=length_penalty, batch_size=3)
    d = beam_search(tiny, prompts, trie, beams=4, top_k=4, length_penalty=length_penalty, batch_size=3,
                    scoring=Scoring(ghost_threshold=1.5))
    for a, b in zip(cbs, d):
        assert a.item_ids == b.item_ids and a.scores == b.scores and a.token_ids == b.token_ids
        assert a.ghost_tokens is None and b.ghost_tokens == [0] * len(b.item_ids)


@pytest.mark.parametrize("alpha,threshold,length_penalty", [
    (0.3, 0.3, 0.0),    # D3's code: no length normalisation, assistant on
    (0.3, 0.3, 1.0),    # the paper's description: ghost tokens left out of the length
    (0.0, 0.3, 1.0),    # ghost-aware length alone
    (0.7, 2.0, 1.0),    # assistant with CBS's length
])
def test_wide_beam_equals_exhaustive_d3_score(peaked, catalogue, alpha, threshold, length_penalty):
    trie = Trie.from_token_ids(catalogue, EOS)
    n = len(trie)
    table = item_table(catalogue, len(PROMPTS))
    scoring = Scoring(threshold, alpha, (lambda users: table[users]) if alpha else None)
    recs = beam_search(peaked, PROMPTS, trie, beams=n, top_k=n, length_penalty=length_penalty, batch_size=2,
                       scoring=scoring)
    seen_ghosts = 0
    for u, (prompt, rec) in enumerate(zip(PROMPTS, recs)):
        ref = brute_force_d3(peaked, prompt, catalogue, table[u], alpha, threshold, length_penalty)
        assert_same_ranking(rec.item_ids, rec.scores, [r[2][0] for r in ref], [r[0] for r in ref])
        ghosts = {r[2][0]: r[3] for r in ref}
        assert rec.ghost_tokens == [ghosts[i] for i in rec.item_ids]
        seen_ghosts += sum(rec.ghost_tokens)
    assert (seen_ghosts > 0) == (threshold < 1)   # the test exercises ghost tokens


def test_assistant_mapping_on_a_hand_made_trie():
    #   root -5-> a -6-> b -EOS-> (items 1, 4)      p: 1 .1, 2 .2, 3 .3, 4 .4
    #          |     -7-> c -EOS-> (item 2)
    #          -8-> d -EOS-> (item 3)
    trie = Trie.from_token_ids({1: [5, 6, EOS], 2: [5, 7, EOS], 3: [8, EOS], 4: [5, 6, EOS]}, EOS)
    probs = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]])
    mass = trie.subtree_sums(probs)                                    # (1, n_nodes)
    a, d = trie.walk([5]), trie.walk([8])
    b, c = trie.walk([5, 6]), trie.walk([5, 7])
    expected = {0: 1.0, a: 0.7, d: 0.3, b: 0.5, c: 0.2, trie.walk([5, 6, EOS]): 0.5,
                trie.walk([5, 7, EOS]): 0.2, trie.walk([8, EOS]): 0.3}
    assert {n: round(mass[0, n].item(), 6) for n in expected} == expected
    allowed = trie.allowed(torch.tensor([0, a, d, b]), active=torch.tensor([True, True, True, False]))
    logp = d3.assistant_log_probs(mass, allowed)                       # one slot, 4 "beams"
    hand = torch.tensor([[math.log(0.7), math.log(0.3)],               # root: tokens 5, 8
                         [math.log(0.5 / 0.7), math.log(0.2 / 0.7)],   # a: tokens 6, 7
                         [0.0, -math.inf],                             # d: EOS only (padding -inf)
                         [-math.inf, -math.inf]])                      # a dead beam: nothing allowed
    assert torch.allclose(logp, hand, atol=1e-6)


def test_scoring_options_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        Scoring(alpha=1.0, assistant=lambda u: None)
    with pytest.raises(ValueError, match="assistant"):
        Scoring(alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        d3.scoring("cbs", alpha=0.5)
    with pytest.raises(ValueError, match="assistant"):
        d3.scoring("d3", alpha=0.5)
    with pytest.raises(ValueError, match="normaliser"):
        Scoring(normaliser="trie")
    assert d3.scoring("cbs") == Scoring() and d3.scoring("d3").ghost_threshold == d3.GHOST_THRESHOLD
    assert d3.scoring("cbs", normaliser="allowed").normaliser == d3.scoring("d3", normaliser="allowed").normaliser == "allowed"
    assert d3.ghost_share([{"ghost_tokens": [1, 0], "title_tokens": [4, 4]}, {"ghost_tokens": [2],
                           "title_tokens": [2]}]) == 0.3
    assert d3.ghost_share([{"topk_item_ids": [1]}]) is None


def test_sasrec_assistant_places_a_softmax_at_the_item_ids():
    from nanogdrt.baselines.sasrec import SASRec, SASRecConfig
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=4), [3, 7, 8, 11]).eval()
    histories = [[3, 7], [11], [8, 8, 3]]
    fn = d3.sasrec_assistant(model, histories, [3, 7, 8, 11])
    out = fn([2, 0])
    assert out.shape == (2, 12)
    expected = model.score_items([histories[2], histories[0]]).softmax(-1)
    assert torch.allclose(out[:, [3, 7, 8, 11]], expected) and out[:, [0, 1, 2, 4, 5, 6, 9, 10]].abs().sum() == 0
    with pytest.raises(ValueError, match="does not score"):
        d3.sasrec_assistant(model, histories, [3, 7, 99])


def test_recommend_cli_with_d3_and_a_sasrec_assistant(tiny_model_dir, tmp_path, capsys):
    from nanogdrt.baselines import sasrec
    from nanogdrt.data import load_dataset
    ds = load_dataset("synthetic")
    torch.manual_seed(0)
    sasrec.save(sasrec.SASRec(sasrec.SASRecConfig(len(ds.titles)), list(ds.titles)), tmp_path / "sasrec")
    out = tmp_path / "recs.jsonl"
    recommend_cli.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "valid",
                    "--rows", "0:3", "--beams", "4", "--no-fairness", "--decoding", "d3",
                    "--assistant", str(tmp_path / "sasrec"), "--alpha", "0.5", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["ghost_tokens"]) == len(r["title_tokens"]) == len(r["topk_item_ids"]) == 4 for r in lines)
    assert "ghost_share" in capsys.readouterr().out
