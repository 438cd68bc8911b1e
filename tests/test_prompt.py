"""PromptBuilder: text and ids equal MSL's (tests/msl_reference.py, tokenized whole by
transformers), spans partition the ids, history masking, target ids shared by every prompt."""

import ast
import csv
import json

import pytest

from msl_reference import msl_ids, msl_text
from nanogdrt.prompt import TEMPLATES, PromptBuilder

HISTORY = ["Lego Classic Bricks", 'Uno "Flip" Card Game', "Crayola &amp; Friends Set"]
TARGET = "Jenga Classic Game"

# Made-up rows for the datasets that are not shared here: quotes, entities, digits, trailing
# punctuation, accents, CJK, emoji, double spaces, a comma inside a title.
MADE_UP = {
    "book": [(["The Hobbit", "Harry Potter and the Sorcerer's Stone (Book 1)", "1984"], "Dune!"),
             (['"Salem\'s Lot', "Cien años de soledad", "三体"], "The Name of the Wind, Part 1"),
             (["A  Tale of Two Cities"], "Catch-22")],
    "clothing": [(["Levi's Men's 501 Original-Fit Jeans", "Hanes T-Shirt, 6-Pack"], "Crocs Unisex Clog"),
                 (["Carhartt Beanie 🧢", "Dickies 874 Work Pant?"], '"Ray-Ban" Aviator'),
                 (["Fruit of the Loom &amp; Co."], "Nike Air Max 90")],
}


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, "toy")


@pytest.fixture(scope="module")
def hf(smollm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_dir)


def check_against_msl(tokenizer, hf, dataset, history, target):
    """Text and ids of the training, generation and "N/A" prompts vs MSL's, tokenized whole."""
    b = PromptBuilder(tokenizer, dataset)
    full, user = msl_text(dataset, history, target), msl_text(dataset, history)
    assert b.text(history, target) == full and b.text(history) == user
    p = b.build(history, target)
    assert p.ids == msl_ids(hf, full, add_eos=True)
    g = b.build(history)
    assert g.ids == msl_ids(hf, user, add_eos=False)           # MSL's user prompt: its label start
    assert g.ids == p.ids[:p.prompt_len] and p.target == (len(g.ids), len(p.ids))
    m = b.build(history, target, mask_history=True)
    na = msl_text(dataset, history, target, na=True)
    assert b.text(history, target, mask_history=True) == na and m.ids == msl_ids(hf, na, add_eos=True)
    assert p.ids[slice(*p.target)] == m.ids[slice(*m.target)] == b.target_ids(target)
    assert p.bos == (0, 0)                                      # SmolLM2: transformers adds no BOS
    return p


@pytest.mark.parametrize("dataset", ["book", "clothing"])
def test_made_up_rows_equal_msl(tokenizer, hf, dataset):
    for history, target in MADE_UP[dataset]:
        check_against_msl(tokenizer, hf, dataset, history, target)


def test_real_toy_rows_equal_msl(tokenizer, hf, toy_dir):
    titles = {int(k): v for k, v in json.loads((toy_dir / "id2name.json").read_text()).items()}
    with open(toy_dir / "test.csv", newline="") as f:
        rows = [ast.literal_eval(r["item_ids"]) for _, r in zip(range(100), csv.DictReader(f))]
    for items in rows:
        names = [titles[i] for i in items if i in titles]   # MSL drops ids without a title
        check_against_msl(tokenizer, hf, "toy", names[:-1], names[-1])
    check_against_msl(tokenizer, hf, "toy", HISTORY, TARGET)


def test_spans_partition_the_ids(builder, tokenizer):
    p = builder.build(HISTORY, TARGET)
    (head_start, head_end), (tail_start, tail_end) = p.task
    # head | history | tail | target, back to back, covering every id
    assert head_start == 0 and head_end == p.history[0] and p.history[1] == tail_start
    assert tail_end == p.target[0] and p.target[1] == len(p.ids) and p.prompt_len == p.target[0]
    # items lie inside the history, in order, and tile it
    assert p.items[0][0] == p.history[0] and p.items[-1][1] == p.history[1]
    assert all(a[1] == b[0] for a, b in zip(p.items, p.items[1:]))
    # A token belongs to the span of its first character: '",' (quote + comma) is one SmolLM2
    # token, so the comma between two items goes with the earlier one.
    spans = [tokenizer.decode(p.ids[s:e]) for s, e in p.items]
    assert spans == [' "Lego Classic Bricks",', ' "Uno "Flip" Card Game",', ' "Crayola &amp; Friends Set"']
    assert tokenizer.decode(p.ids[slice(*p.task[0])]).endswith("The user has played the following toys before:")
    assert tokenizer.decode(p.ids[slice(*p.task[1])]) == "\n \n\n### Response:\n"
    assert tokenizer.decode(p.ids) == builder.text(HISTORY, TARGET)


def test_mask_history_is_the_na_prompt(builder, tokenizer):
    p = builder.build(HISTORY, TARGET)
    m = builder.build(HISTORY, TARGET, mask_history=True)
    assert m.items == [] and tokenizer.decode(m.ids[slice(*m.history)]) == " N/A"
    assert "toys before: N/A\n \n\n### Response:\n" in tokenizer.decode(m.ids)
    assert m.ids[:m.history[0]] == p.ids[:p.history[0]]  # same head, same tail, same target
    assert m.ids[slice(*m.task[1])] == p.ids[slice(*p.task[1])]
    assert m.ids[slice(*m.target)] == p.ids[slice(*p.target)]
    # The Eq. 3 prompt does not depend on the history it replaces.
    assert builder.build([], TARGET, mask_history=True).ids == m.ids


def test_target_ids_are_the_same_in_every_prompt(builder, tokenizer):
    expected = builder.target_ids(TARGET)
    assert expected[-1] == tokenizer.eos_id
    assert tokenizer.decode(expected[:-1]) == f'"{TARGET}"'
    for history in (HISTORY, HISTORY[:1], ["Chess"] * 5, [TARGET], []):
        p = builder.build(history, TARGET)
        assert p.ids[slice(*p.target)] == expected
    # the target of another dataset's template is tokenized the same way too
    other = PromptBuilder(tokenizer, "book").build(HISTORY, TARGET)
    assert other.ids[slice(*other.target)] == expected


@pytest.mark.parametrize("dataset", ["toy", "book", "clothing", "synthetic"])
def test_every_dataset_has_a_template(tokenizer, dataset):
    p = PromptBuilder(tokenizer, dataset).build(HISTORY, TARGET)
    text = tokenizer.decode(p.ids)
    assert TEMPLATES[dataset].instruction in text and TEMPLATES[dataset].history + '"' in text
    assert text.endswith(f'### Response:\n"{TARGET}"')  # EOS is a special token: not decoded
    assert "clothing items" not in text                  # MSL's wording: "a list of clothing"


def test_unknown_dataset_raises(tokenizer):
    with pytest.raises(ValueError, match="no prompt template"):
        PromptBuilder(tokenizer, "movies")
