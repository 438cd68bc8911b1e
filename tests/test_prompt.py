"""PromptBuilder: spans partition the ids, history masking, and target ids shared by every prompt."""

import pytest

from nanogdrt.prompt import TEMPLATES, PromptBuilder

HISTORY = ["Lego Classic Bricks", 'Uno "Flip" Card Game', "Crayola &amp; Friends Set"]
TARGET = "Jenga Classic Game"


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, "toy")


def test_spans_partition_the_ids(builder, tokenizer):
    p = builder.build(HISTORY, TARGET)
    (head_start, head_end), (tail_start, tail_end) = p.task
    # head | history | tail | target, back to back, covering every id
    assert head_start == 0 and head_end == p.history[0] and p.history[1] == tail_start
    assert tail_end == p.target[0] and p.target[1] == len(p.ids) and p.prompt_len == p.target[0]
    # items lie inside the history, in order, and tile it
    assert p.items[0][0] == p.history[0] and p.items[-1][1] == p.history[1]
    assert all(a[1] == b[0] for a, b in zip(p.items, p.items[1:]))
    for i, (title, (s, e)) in enumerate(zip(HISTORY, p.items)):
        assert tokenizer.decode(p.ids[s:e]) == ("" if i == 0 else ",") + f' "{title}"'
    assert tokenizer.decode(p.ids[slice(*p.history)]).strip() == ", ".join(f'"{t}"' for t in HISTORY)
    assert tokenizer.decode(p.ids[slice(*p.task[0])]).endswith("The user has played the following toys before:")
    assert tokenizer.decode(p.ids[slice(*p.task[1])]) == "\n\n### Response:\n"
    generation = builder.build(HISTORY)  # no target: the prompt for beam search
    assert generation.target is None and generation.ids == p.ids[:p.prompt_len]
    assert generation.prompt_len == len(generation.ids)


def test_mask_history_is_the_na_prompt(builder, tokenizer):
    p = builder.build(HISTORY, TARGET)
    m = builder.build(HISTORY, TARGET, mask_history=True)
    assert m.ids == builder.head_ids + tokenizer.encode(" N/A") + builder.tail_ids + builder.target_ids(TARGET)
    assert m.items == [] and tokenizer.decode(m.ids[slice(*m.history)]) == " N/A"
    assert "before: N/A\n\n### Response:" in tokenizer.decode(m.ids)
    assert m.ids[:m.history[0]] == p.ids[:p.history[0]]  # same head, same target
    assert m.ids[slice(*m.target)] == p.ids[slice(*p.target)]


def test_target_ids_are_the_same_in_every_prompt(builder, tokenizer):
    expected = builder.target_ids(TARGET)
    assert expected[-1] == tokenizer.eos_id
    assert tokenizer.decode(expected[:-1]) == f'"{TARGET}"'
    for history in (HISTORY, HISTORY[:1], ["Chess"] * 5, [TARGET]):
        p = builder.build(history, TARGET)
        assert p.ids[slice(*p.target)] == expected
    # the target of another dataset's template is tokenized the same way too
    other = PromptBuilder(tokenizer, "book").build(HISTORY, TARGET)
    assert other.ids[slice(*other.target)] == expected


@pytest.mark.parametrize("dataset", ["toy", "book", "clothing", "synthetic"])
def test_every_dataset_has_a_template(tokenizer, dataset):
    p = PromptBuilder(tokenizer, dataset).build(HISTORY, TARGET)
    text = tokenizer.decode(p.ids)
    assert TEMPLATES[dataset].instruction in text and TEMPLATES[dataset].history + ': "' in text
    assert text.endswith(f'### Response:\n"{TARGET}"')  # EOS is a special token: not decoded


def test_unknown_dataset_raises(tokenizer):
    with pytest.raises(ValueError, match="no prompt template"):
        PromptBuilder(tokenizer, "movies")
