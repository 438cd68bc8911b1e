"""Attribution vs Captum's FeatureAblation through LLMAttribution (captum.attr), to 1e-4.

The bridge to Captum (tests/references.py, shared with bench/bench_attribution.py):
- `HFLikeModel` gives a nanogdrt Llama the Hugging Face call Captum makes:
  `model.forward(input_ids=..., attention_mask=...).logits`.
- `SegmentTokenizer` tokenizes text segment by segment, segments joined by a private-use
  character SEP. The segments are the texts of our spans (head, each item, tail), decoded
  from the prompt's ids: prompt.py cuts the joint tokenization of the whole text at token
  boundaries that are also pre-token boundaries (e.g. '",' | ' "' between items), so each
  segment tokenized on its own gives back exactly its span's ids (asserted below). A
  TextTemplateInput whose template joins its values by SEP therefore yields exactly
  PromptBuilder's ids, and replacing a value by "" removes exactly that span's ids, which is
  what our text-mode ablation does.
- Captum is run with `forward_in_tokens=False`: one teacher-forced forward over prompt + target,
  log-softmax at the target positions, "original minus ablated" per target token (token_attr)
  and summed (seq_attr): the definition in nanogdrt.attribution.
- Captum cannot ablate the target itself, so a prefix feature j is checked with a second run
  whose prompt ends with target tokens 0..j (token j the only feature) and whose target is
  tokens j+1.. : the same quantity as our prefix{j} column for t > j.
- Token mode: TextTokenInput makes each token a feature; a feature_mask groups the tokens of a
  segment into one feature (all its tokens take the baseline id at once).
- The paper's "segment" definition (`segment_attribution`) against `captum_segment_attr`: a
  TextTemplateInput with the auxiliary text (head + tail grouped by the template's mask) or the
  instruction sentence, and the whole interaction list; the first generated token appended as a
  third value for the prefix ratio. On real Toy data the target is the top-1 title of our
  constrained beam search.
"""

import pytest
import torch

from nanogdrt.attribution import (
    Attribution, Feature, SegmentTerms, ablated_rows, attribute, context_ratios, features_of, instruction_span,
    ratio_terms, segment_attribution, segment_features, segment_ratios, segment_terms)
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.prompt import PromptBuilder
from tests.references import SEP, SegmentTokenizer, captum_attr, captum_segment_attr, segments_of

TOL = 1e-4


def check_against_captum(model, seg_tok, builder, history, title, baseline, all_prefixes):
    """Ours vs Captum: every prompt feature, and every prefix feature that we computed."""
    p = builder.build(history, title)
    ours = attribute(model, p, builder.tokenizer, baseline, all_prefixes=all_prefixes)
    prefixes = [int(f.name[len("prefix"):]) for f in ours.features if f.kind == "prefix"]
    names = [f.name for f in ours.features]
    segments = segments_of(builder, history)
    target = p.ids[p.target[0]:p.target[1]]
    decoded = [seg_tok.hf.decode([i]) for i in target]
    assert seg_tok.encode(SEP.join(segments + decoded)) == p.ids, "bridge must see our ids"

    seq, tok = captum_attr(model, seg_tok, segments, list(range(len(segments))), target, baseline)
    cols = [names.index(n) for n in ["head", *[f"item{i}" for i in range(len(history))], "tail"]]
    torch.testing.assert_close(ours.token_attr[:, cols], tok.float(), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.seq_attr[cols], seq.float(), atol=TOL, rtol=0)
    for j in prefixes:
        seq, tok = captum_attr(model, seg_tok, segments + decoded[:j + 1], [len(segments) + j],
                               target[j + 1:], baseline)
        col = names.index(f"prefix{j}")
        torch.testing.assert_close(ours.token_attr[j + 1:, col], tok[:, 0].float(), atol=TOL, rtol=0)
        torch.testing.assert_close(ours.token_attr[:j + 1, col], torch.zeros(j + 1))
    return ours


# ----------------------------------------------------------------------------- fixtures

TITLES = ["Hive Pocket", 'Melissa & Doug {Deluxe} Puzzle, 24 pcs', "Carcassonne", "AEG Love Letter"]
TARGET = "Ticket To Ride: Nordic Countries"


@pytest.fixture(scope="module")
def seg_tok(smollm_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("captum")
    return SegmentTokenizer(transformers.AutoTokenizer.from_pretrained(smollm_dir))


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, "toy")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg).eval()


# ----------------------------------------------------------------------------- tests

def test_features_and_ablated_rows(builder, tokenizer):
    p = builder.build(TITLES, TARGET)
    feats = features_of(p, tokenizer)
    t0, t1 = p.target
    assert [f.name for f in feats[:6]] == ["head", "item0", "item1", "item2", "item3", "tail"]
    assert [f.span for f in feats[1:5]] == p.items and feats[5].span == p.task[1]
    assert [f.span for f in feats[6:]] == [(t0 + j, t0 + j + 1) for j in range(t1 - t0 - 1)]

    target = p.ids[t0:t1]
    for baseline in ["", " N/A", 0]:
        rows = ablated_rows(p, feats, baseline, tokenizer)
        full = [p.ids[:r.start] + r.ids for r in rows]
        for ids, r in zip(full, rows):
            assert [ids[q] for _, q in r.scored] == target[r.scored[0][0]:]  # positions hold y_t
        if baseline == 0:
            assert {len(ids) for ids in full} == {len(p.ids)}              # token mode keeps lengths
    # Text mode "" removes item 1's span and nothing else.
    rows = ablated_rows(p, feats, "", tokenizer)
    expected = p.ids[:p.items[1][0]] + p.ids[p.items[1][1]:]
    assert p.ids[:rows[1 + 2].start] + rows[1 + 2].ids == expected
    assert rows[1 + 2].start == p.items[1][0]  # the row shares the prompt before the item
    assert rows[1].ids == p.ids[p.task[0][1]:]  # head -> "" (SmolLM2 has no BOS to keep)
    # The scored prefix rows: only target tokens after the ablated one.
    assert [t for t, _ in rows[1 + 6 + 2].scored] == list(range(3, t1 - t0))


@pytest.mark.parametrize("baseline", ["", " N/A", 0])
def test_matches_captum_tiny_model(tiny, seg_tok, builder, baseline):
    """Every feature, prefix ones included, on a tiny random model: text and token modes."""
    ours = check_against_captum(tiny, seg_tok, builder, TITLES, TARGET, baseline, all_prefixes=True)
    assert len(ours.features) == 6 + len(builder.target_ids(TARGET)) - 1


def test_matches_captum_smollm_toy(smollm, seg_tok, builder, toy_dir):
    """The embedded SmolLM2 on a short real Toy example: prompt features + first title token.

    Text mode only, to keep it short: token mode differs only in the ids of the ablated rows,
    which the tiny-model test checks against TextTokenInput.
    """
    import ast
    import csv
    import json

    names = json.loads((toy_dir / "id2name.json").read_text())
    with open(toy_dir / "test.csv", newline="") as f:
        rows = [ast.literal_eval(r["item_ids"]) for r in csv.DictReader(f)]
    ids = next(r for r in rows if len(r) == 5)  # the shortest histories: 4 items
    history, title = [names[str(i)] for i in ids[:-1]], names[str(ids[-1])]
    ours = check_against_captum(smollm, seg_tok, builder, history, title, "", all_prefixes=False)
    assert ours.first_title_token == 1  # '"' then the title's first token
    assert [f.name for f in ours.features if f.kind == "prefix"] == ["prefix1"]


def test_ratios_by_hand():
    # head 3 tokens, two items of 2 and 4 tokens, tail 1 token; target of 4 tokens.
    feats = [Feature("head", "task", (0, 3)), Feature("item0", "history", (3, 5)),
             Feature("item1", "history", (5, 9)), Feature("tail", "task", (9, 10)),
             *[Feature(f"prefix{j}", "prefix", (10 + j, 11 + j)) for j in range(3)]]
    attr = torch.tensor([[1.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0],
                         [2.0, 0.3, 0.0, 1.0, 0.5, 0.0, 0.0],
                         [0.0, 0.0, 0.6, 1.0, 0.7, 2.0, 0.0],
                         [1.0, 0.6, 0.0, 0.0, 0.1, 0.3, 4.0]])
    a = Attribution(feats, attr, torch.zeros(4), first_title_token=1)
    t = ratio_terms(a)
    assert t.task == pytest.approx((4.0 + 2.0) / 4)            # (A_head + A_tail) / (3 + 1)
    assert t.interaction == pytest.approx((1.0 + 0.8) / 6)     # sum over items / (2 + 4)
    assert t.prefix == pytest.approx(2.0 + 0.3)                # prefix1 on target tokens 2, 3
    assert t.interaction_after == pytest.approx((0.6 + 0.6) / 6)
    b = Attribution(feats, 2 * attr, torch.zeros(4), first_title_token=1)
    b.token_attr[:, 1:3] *= 3                                  # interaction x6, task x2
    r = context_ratios([a, b])
    tb = ratio_terms(b)
    assert r.task_ratio == pytest.approx((t.task + tb.task) / (t.interaction + tb.interaction))
    assert r.prefix_ratio == pytest.approx((t.prefix + tb.prefix) / (t.interaction_after + tb.interaction_after))
    assert r.per_example == [t, tb]


# ----------------------------------------------------------------------------- segment (paper) definition

def check_segment_against_captum(model, seg_tok, builder, history, title):
    """Every column of segment_attribution vs Captum's TextTemplateInput runs."""
    ours = segment_attribution(model, builder, history, title)
    col = {f.name: i for i, f in enumerate(ours.features)}
    target = builder.target_ids(title)
    for task, name in (("auxiliary", "auxiliary"), ("instruction", "instruction")):
        seq, tok = captum_segment_attr(model, seg_tok, builder, history, target, task)
        torch.testing.assert_close(ours.token_attr[:, [col[name], col["interactions"]]], tok.float(), atol=TOL, rtol=0)
        torch.testing.assert_close(ours.seq_attr[[col[name], col["interactions"]]], seq.float(), atol=TOL, rtol=0)
    seq, tok = captum_segment_attr(model, seg_tok, builder, history, target, "auxiliary", with_prefix=True)
    cols = [col["auxiliary"], col["interactions"], col["prefix0"]]
    torch.testing.assert_close(ours.token_attr[1:, cols], tok.float(), atol=TOL, rtol=0)
    assert torch.equal(ours.token_attr[0, col["prefix0"]], torch.tensor(0.0))
    t = segment_terms(ours)
    assert t.prefix == pytest.approx(float(seq[2]), abs=TOL)
    assert t.interaction_after == pytest.approx(float(seq[1]), abs=TOL)
    return ours


def test_segment_features(builder, tokenizer):
    p = builder.build(TITLES, TARGET)
    aux, instr, hist, prefix = segment_features(p, builder)
    assert aux.spans == ((p.bos[1], p.task[0][1]), p.task[1]) and aux.kind == "task"
    assert hist.span == p.history == (p.items[0][0], p.items[-1][1])
    assert prefix.span == (p.target[0], p.target[0] + 1) and tokenizer.decode([p.ids[p.target[0]]]) == '"'
    assert tokenizer.decode(p.ids[slice(*instr.span)]) == (
        "Given a list of toys the user has played before, please recommend a new toy that the user likes to the user.")
    assert instr.span == instruction_span(p, builder)
    # A feature of two spans: both become the baseline in one row, the tokens between are kept.
    row = ablated_rows(p, [aux], "", tokenizer)[1]
    assert p.ids[:row.start] + row.ids == p.ids[:p.bos[1]] + p.ids[p.history[0]:p.history[1]] + p.ids[p.target[0]:]
    assert [row.ids[q - row.start] for _, q in row.scored] == p.ids[p.target[0]:p.target[1]]
    assert aux.n_tokens == p.task[0][1] - p.bos[1] + p.task[1][1] - p.task[1][0]


def test_segment_matches_captum_tiny_model(tiny, seg_tok, builder):
    """CI, no data: the paper's definition on a tiny random model vs Captum."""
    check_segment_against_captum(tiny, seg_tok, builder, TITLES, TARGET)


def test_segment_matches_captum_smollm_toy(smollm, seg_tok, builder, toy_dir):
    """Real Toy examples, the embedded SmolLM2, the target its top-1 constrained beam search title."""
    from nanogdrt.data import load_dataset
    from nanogdrt.recommend import Decoding, recommend
    from nanogdrt.trie import Trie

    ds = load_dataset("toy", data_dir=toy_dir)
    chosen = sorted(ds.test, key=lambda x: len(x.history))[:2]      # the shortest histories
    trie = Trie.from_titles(ds.titles, builder)
    records = recommend(smollm, builder, trie, chosen, ds.titles, Decoding(beams=4, top_k=1))
    attrs = []
    for x, r in zip(chosen, records):
        history = [ds.titles[i] for i in x.history]
        attrs.append(check_segment_against_captum(smollm, seg_tok, builder, history,
                                                  ds.titles[r["topk_item_ids"][0]]))
    assert len(segment_ratios(attrs).per_example) == 2


def test_segment_ratios_by_hand():
    feats = [Feature("auxiliary", "task", (0, 3), more=((9, 10),)), Feature("instruction", "instruction", (1, 2)),
             Feature("interactions", "history", (3, 9)), Feature("prefix0", "prefix", (10, 11))]
    attr = torch.tensor([[1.0, 0.5, 0.1, 0.0],
                         [2.0, 0.1, 0.3, 0.5],
                         [0.0, 0.2, 0.6, 2.0]])
    a = Attribution(feats, attr, torch.zeros(3), first_title_token=1)
    t = segment_terms(a)
    assert t == pytest.approx(SegmentTerms(3.0, 0.8, 1.0, 2.5, 0.9))   # sums, no division by length
    b = Attribution(feats, attr * torch.tensor([1.0, 1.0, 4.0, 1.0]), torch.zeros(3), first_title_token=1)
    r = segment_ratios([a, b])                                          # b: interaction x4
    assert r.task_ratio == pytest.approx(6.0 / 5.0)                     # ratio of means
    assert r.task_ratio_mean == pytest.approx((3.0 + 0.75) / 2)         # mean of ratios
    assert r.instruction_ratio == pytest.approx(1.6 / 5.0)
    assert r.prefix_ratio == pytest.approx(5.0 / 4.5)
    assert r.prefix_ratio_mean == pytest.approx((2.5 / 0.9 + 2.5 / 3.6) / 2)
    zero = Attribution(feats, attr * torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.zeros(3), first_title_token=1)
    r = segment_ratios([a, zero])                                       # undefined ratios are left out of the mean
    assert r.task_ratio_mean == pytest.approx(3.0) and r.task_ratio == pytest.approx(6.0 / 1.0)
