"""Soft tokens (nanogdrt/soft_tokens.py) and LLaRA (nanogdrt/baselines/llara.py).

- The soft-token path equals the ids path exactly (the same top-K lists and float scores) when
  no position is replaced and when the vectors are the replaced tokens' own embeddings; a tiny
  random Llama, and then LLaRA's whole decoding with a projector whose output is the
  placeholder's embedding.
- The hybrid prompt: one slot after each title, the text prompt itself without titles or with
  Eq. 2/3's "N/A" (so the cached token groups carry over).
- The projector against its formula, the curriculum probability by hand, the training loss on
  text-only and hybrid steps (which parameters get a gradient), saving and loading.
- train.py --method llara / llara+gdrt end to end on a tiny model, an exact resume, and bad
  flags refused in one line before any model loads.
"""

import json
import random

import pytest
import torch
import torch.nn.functional as F

import recommend as recommend_cli
from nanogdrt import synthetic
from nanogdrt.baselines import llara, sasrec
from nanogdrt.baselines.methods import TargetLoss
from nanogdrt.batches import collate, make_examples
from nanogdrt.beam import beam_search
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import Decoding, recommend
from nanogdrt.soft_tokens import SoftTokens, soft_embeddings
from nanogdrt.trie import Trie
from tests.test_beam import EOS, tiny, tiny_catalogue  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic", synthetic=synthetic.SMALL)


@pytest.fixture(scope="module")
def sasrec_dir(tmp_path_factory, small):
    """A SASRec of random weights over the small synthetic catalogue, saved as the CLI saves one."""
    torch.manual_seed(0)
    model = sasrec.SASRec(sasrec.SASRecConfig(len(small.titles), hidden=8), list(small.titles))
    folder = tmp_path_factory.mktemp("sasrec")
    sasrec.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return Llama.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return llara.HybridPromptBuilder(tokenizer, "synthetic")


def make_llara(tiny_llm, builder, sasrec_dir, small, seed=0) -> llara.LLaRA:
    torch.manual_seed(seed)
    rec = llara.load_sasrec(sasrec_dir, small.titles)
    return llara.LLaRA(rec, tiny_llm.config.hidden_size, builder.placeholder)


def project_onto_placeholder(module: llara.LLaRA, embed: torch.nn.Embedding):
    """W1 = 0, W2 = 0, b2 = E[placeholder]: every item's slot vector is the placeholder's embedding."""
    first, last = module.projector.mlp_proj[0], module.projector.mlp_proj[2]
    with torch.no_grad():
        for p in (first.weight, first.bias, last.weight):
            p.zero_()
        last.bias.copy_(embed.weight[module.placeholder])


def same_results(a, b, tol=None):
    assert [r.item_ids for r in a] == [r.item_ids for r in b]
    if tol is None:
        assert [r.scores for r in a] == [r.scores for r in b]      # float for float, no tolerance
    else:
        assert torch.allclose(torch.tensor([r.scores for r in a]), torch.tensor([r.scores for r in b]), atol=tol)


# ----------------------------------------------------------------------------- 1. the soft-token path

def test_inputs_embeds_are_the_ids_path(tiny):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0                                                   # padding: the masked branch too
    for m in (None, mask):
        assert torch.equal(tiny.hidden_states(ids, m),
                           tiny.hidden_states(None, m, inputs_embeds=tiny.model.embed_tokens(ids)))


def prompts_with_shared_head():
    g = torch.Generator().manual_seed(4)
    return [[1, 9, 12, 5] + torch.randint(3, 40, (int(n),), generator=g).tolist() for n in [6, 2, 9, 4, 7]]


@pytest.mark.parametrize("soft", ["none", "empty", "own-embedding", "own-embedding-in-head"])
def test_search_with_soft_tokens_equals_the_ids_search(tiny, tiny_catalogue, soft):
    """Nothing replaced (None entries or empty SoftTokens), or each replaced position given its own
    token's embedding after the shared head (where LLaRA's slots lie): the same top-K and scores
    as the ids path, exactly. A replaced position inside the head shortens the shared prefill, so
    the head's keys are computed in another batch shape: the same top-K, scores to 1e-5."""
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    prompts = prompts_with_shared_head()
    E = tiny.model.embed_tokens.weight.detach()
    entries = []
    for k, p in enumerate(prompts):
        if soft == "none":
            entries.append(None)
            continue
        positions = {"empty": [], "own-embedding": list(range(5, len(p), 2)),
                     "own-embedding-in-head": [2] + list(range(5, len(p), 3))}[soft]
        pos = torch.tensor(positions, dtype=torch.long)
        entries.append(SoftTokens(pos, E[torch.tensor(p)[pos]] if positions else E[:0]))
    ids_path = beam_search(tiny, prompts, trie, beams=5, top_k=5, batch_size=2)
    soft_path = beam_search(tiny, prompts, trie, beams=5, top_k=5, batch_size=2, soft_tokens=entries)
    same_results(ids_path, soft_path, tol=1e-5 if soft == "own-embedding-in-head" else None)


def test_other_vectors_change_the_search_and_carry_a_gradient(tiny, tiny_catalogue):
    trie = Trie.from_token_ids(tiny_catalogue, EOS)
    prompts = prompts_with_shared_head()
    g = torch.Generator().manual_seed(5)
    entries = [SoftTokens(torch.tensor([5, 6]), 3 * torch.randn(2, 32, generator=g)) for _ in prompts]
    plain = beam_search(tiny, prompts, trie, beams=5, top_k=5, batch_size=2)
    moved = beam_search(tiny, prompts, trie, beams=5, top_k=5, batch_size=2, soft_tokens=entries)
    assert max(abs(a - b) for p, m in zip(plain, moved) for a, b in zip(p.scores, m.scores)) > 1e-3
    v = torch.randn(1, 32, requires_grad=True)
    x = soft_embeddings(tiny.model.embed_tokens, torch.tensor([[1, 9, 12]]), [SoftTokens(torch.tensor([1]), v)])
    assert torch.equal(x[0, 1], v[0]) and torch.equal(x[0, 0], tiny.model.embed_tokens.weight[1])
    tiny.hidden_states(None, inputs_embeds=x).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_soft_tokens_outside_the_prompt_or_of_the_wrong_width_fail(tiny, tiny_catalogue):
    embed, ids = tiny.model.embed_tokens, torch.tensor([[1, 9, 12]])
    with pytest.raises(ValueError, match="outside"):
        soft_embeddings(embed, ids, [SoftTokens(torch.tensor([3]), torch.zeros(1, 32))])
    with pytest.raises(ValueError, match="vectors"):
        soft_embeddings(embed, ids, [SoftTokens(torch.tensor([1]), torch.zeros(1, 31))])
    with pytest.raises(ValueError, match="soft-token entries"):
        beam_search(tiny, [[1, 2]], Trie.from_token_ids(tiny_catalogue, EOS), beams=2, top_k=2, soft_tokens=[])


# ----------------------------------------------------------------------------- 2. LLaRA's pieces

def test_hybrid_prompt_puts_one_slot_after_each_title(tokenizer, builder):
    base = PromptBuilder(tokenizer, "synthetic")
    history, target = ['Lego Set!', 'Doll "Ann"', "Car"], "Train"
    p = builder.build(history, target)
    assert [p.ids[e - 1] for _, e in p.items] == [builder.placeholder] * 3
    assert p.ids.count(builder.placeholder) == 3                      # nowhere else
    pieces = [tokenizer.decode(p.ids[s:e - 1], skip_special_tokens=False) for s, e in p.items]
    assert pieces == [' "Lego Set!"', ', "Doll "Ann""', ', "Car"']   # each segment tokenized alone
    assert p.ids[p.target[0]:] == builder.target_ids(target)
    assert p.ids[:p.items[0][0]] == base.build(history, target).ids[:p.items[0][0]]   # the same head
    for args in ((history, target, True), ([], target, False), (history, None, True)):
        assert builder.build(*args) == base.build(*args)            # no titles or "N/A": the text prompt


def test_training_examples_write_each_slot_as_its_item(builder, small):
    examples = llara.training_examples(builder, small.train[:5], small.titles)
    for x, ex in zip(small.train[:5], examples):
        slots = [i for i in ex.ids if i < 0]
        assert [-i - 1 for i in slots] == list(x.history)
        assert builder.placeholder not in ex.ids


def test_projector_is_linear_gelu_linear_of_the_sasrec_row(tiny_llm, builder, sasrec_dir, small):
    m = make_llara(tiny_llm, builder, sasrec_dir, small)
    first, last = m.projector.mlp_proj[0], m.projector.mlp_proj[2]
    assert (first.in_features, first.out_features, last.out_features) == (8, 64, 64)
    rec = sasrec.load(sasrec_dir)
    items = torch.tensor([3, 1, 120])
    e = rec.item_emb.weight[rec.id_to_index[items]]                   # the raw table rows (cacu_x)
    expected = F.gelu(e @ first.weight.T + first.bias) @ last.weight.T + last.bias
    assert torch.allclose(m.item_vectors(items), expected, atol=1e-6)
    assert not any(b.requires_grad for b in m.buffers()) and len(list(m.parameters())) == 4


def test_curriculum_probability_by_hand():
    assert [llara.curriculum_probability(s, 4) for s in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    for step, total in ((0, 4), (5, 4), (1, 0)):
        with pytest.raises(ValueError):
            llara.curriculum_probability(step, total)
    for step in range(1, 11):                                          # u_s from (seed, step) alone
        u = random.Random(f"llara:7:{step}").random()
        assert llara.hybrid_at(step, 10, seed=7) == (u < step / 10)
    assert llara.hybrid_at(10, 10, seed=7)                            # the last step: always hybrid


def test_sasrec_of_another_catalogue_is_refused(tmp_path, small):
    model = sasrec.SASRec(sasrec.SASRecConfig(10, hidden=8), list(range(1, 11)))
    sasrec.save(model, tmp_path)
    with pytest.raises(ValueError, match="catalogue lacks 110 of the dataset's items"):
        llara.load_sasrec(tmp_path, small.titles)


def test_projector_saves_and_loads(tmp_path, tiny_llm, builder, sasrec_dir, small):
    a, b = make_llara(tiny_llm, builder, sasrec_dir, small, 0), make_llara(tiny_llm, builder, sasrec_dir, small, 1)
    a.save(tmp_path)
    b.load(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="llara_projector"):
        b.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- 3. decoding and training

def test_decoding_with_the_placeholder_projection_is_the_text_path(tiny_llm, builder, sasrec_dir, small):
    """LLaRA's decoding with a projector that returns the placeholder's embedding equals decoding
    the text-only prompt (same ids, ids path): same top-4 and scores; a trained-looking projector
    (random weights) changes them."""
    m = make_llara(tiny_llm, builder, sasrec_dir, small)
    trie, users = Trie.from_titles(small.titles, builder), small.test[:5]
    decode = Decoding(beams=4, top_k=4, batch_size=2)
    text = recommend(tiny_llm, builder, trie, users, small.titles, decode)
    randomly = recommend(tiny_llm, builder, trie, users, small.titles, Decoding(4, 4, 2, soft_tokens=m.soft_tokens))
    project_onto_placeholder(m, tiny_llm.model.embed_tokens)
    hybrid = recommend(tiny_llm, builder, trie, users, small.titles, Decoding(4, 4, 2, soft_tokens=m.soft_tokens))
    assert [r["topk_item_ids"] for r in text] == [r["topk_item_ids"] for r in hybrid]
    assert [r["scores"] for r in text] == [r["scores"] for r in hybrid]
    assert max(abs(a - b) for t, r in zip(text, randomly) for a, b in zip(t["scores"], r["scores"])) > 1e-4


def test_training_loss_on_text_only_and_hybrid_steps(tiny_llm, builder, sasrec_dir, small, tokenizer):
    """Text-only step: the NLL of the placeholder prompt (TargetLoss on its ids), no gradient to the
    projector. Hybrid step: the same NLL when the projection is the placeholder's embedding; with
    other weights a different NLL, and a gradient to the projector but never to the SASRec table."""
    m = make_llara(tiny_llm, builder, sasrec_dir, small)
    rows = small.train[:3]
    examples = llara.training_examples(builder, rows, small.titles)
    groups = [torch.ones(ex.target[1] - ex.target[0], dtype=torch.long) for ex in examples]
    ids, mask, _ = collate(examples, groups, [0, 1, 2], tokenizer.pad_id, "cpu")
    text_ids, _, _ = collate(make_examples(builder, rows, small.titles), groups, [0, 1, 2], tokenizer.pad_id, "cpu")
    reference = TargetLoss(tiny_llm)(text_ids, mask).nll
    net = llara.LLaRALoss(tiny_llm, m)
    m.hybrid = False
    text_only = net(ids, mask).nll
    assert torch.equal(text_only, reference)
    text_only.sum().backward()
    assert all(p.grad is None for p in m.projector.parameters())
    m.hybrid = True
    hybrid = net(ids, mask).nll
    assert (hybrid - reference).abs().max() > 1e-4
    hybrid.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
    project_onto_placeholder(m, tiny_llm.model.embed_tokens)
    assert torch.equal(net(ids, mask).nll, reference)
    tiny_llm.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- 4. train.py

@pytest.fixture
def llara_run(train_py, tiny_model_dir, sasrec_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))

    def run(out, method="llara", *extra):
        train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic-size", "small",
                 "--train-samples", "12", "--valid-users", "3", "--test-users", "3", "--epochs", "2",
                 "--batch-size", "2", "--grad-accum", "2", "--beams", "3", "--eval-batch-size", "3",
                 "--lr", "3e-3", "--method", method, "--sasrec", sasrec_dir, "--out", out, *extra)
        return json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return run


@pytest.mark.parametrize("method", ["llara", "llara+gdrt"])
def test_train_llara_writes_metrics_and_the_projector(llara_run, tmp_path, method, tiny_model_dir, sasrec_dir):
    res = llara_run(tmp_path / "run", method)
    assert {"NDCG@10", "HR@10", "MGU@5", "DGU@5"} <= set(res["test"])
    assert res["config"]["sasrec"] and res["method"]["llara"]["rec_size"] == 8
    steps = res["steps"]
    assert len(steps) == 6 and steps[-1]["hybrid"] is True           # p = 6 / 6 at the last step
    assert [s["hybrid"] for s in steps] == [llara.hybrid_at(k, 6, 0) for k in range(1, 7)]
    q = torch.tensor([s["q"] for s in steps])
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5) if method == "llara+gdrt" else q.eq(0).all()
    assert (tmp_path / "run" / "best_adapter" / llara.PROJECTOR_FILE).is_file()
    if method == "llara":   # recommend.py loads the adapter and its projector: the run's own test lists
        out = tmp_path / "recs.jsonl"
        recommend_cli.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--synthetic-size", "small",
                            "--users", "3", "--beams", "3", "--batch-size", "3", "--no-fairness",
                            "--adapter", str(tmp_path / "run" / "best_adapter"), "--sasrec", str(sasrec_dir),
                            "--out", str(out)])
        run_lists = [json.loads(line)["topk_item_ids"] for line in open(tmp_path / "run" / "test_predictions.jsonl")]
        assert [json.loads(line)["topk_item_ids"] for line in open(out)] == run_lists


def test_interrupted_llara_run_resumes_exactly(llara_run, tmp_path):
    whole = llara_run(tmp_path / "whole")
    llara_run(tmp_path / "part", "llara", "--max-steps", "4")
    resumed = llara_run(tmp_path / "part", "llara", "--resume")
    assert resumed["steps"] == whole["steps"] and resumed["test"] == whole["test"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "llara"], "--method llara: --sasrec DIR goes with --method llara or llara+gdrt"),
    (["--method", "sft", "--sasrec", "SASREC"], "--method sft: --sasrec DIR goes with"),
    (["--method", "llara+gdrt", "--sasrec", "MODEL"], "--sasrec MODEL: not a SASRec run folder"),
    (["--method", "llara", "--sasrec", "NONE"], "--sasrec NONE: no such folder"),
])
def test_bad_llara_flags_are_refused_before_any_model_loads(train_py, tmp_path, tiny_model_dir, sasrec_dir,
                                                            argv, message):
    names = {"SASREC": str(sasrec_dir), "MODEL": str(tiny_model_dir), "NONE": str(tmp_path / "none")}
    argv = [names.get(a, a) for a in argv]
    out = tmp_path / "run"
    expected = message
    for key, value in names.items():
        expected = expected.replace(key, value)
    with pytest.raises(SystemExit, match=expected.replace("+", r"\+")) as e:
        train_py("--model", tmp_path / "no-model-needed", "--out", out, *argv)
    assert "\n" not in str(e.value) and not out.exists()
