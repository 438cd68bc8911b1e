"""nanogdrt.batches: prompts of training windows, right-padded micro-batches, length-grouped order."""

import torch

from nanogdrt.batches import collate, epoch_batches, make_examples
from nanogdrt.data import Interaction
from nanogdrt.prompt import PromptBuilder


def test_examples_and_collate_mark_the_target_tokens_with_their_groups(tokenizer):
    builder = PromptBuilder(tokenizer, "toy")
    titles = {1: "Uno Card Game", 2: "Play-Doh", 3: "LEGO City Fire Station"}
    windows = [Interaction([1, 2], 3, 0), Interaction([3], 1, 1)]
    examples = make_examples(builder, windows, titles)
    assert examples[0].ids == builder.build(["Uno Card Game", "Play-Doh"], "LEGO City Fire Station").ids
    groups = [torch.arange(1, e.target[1] - e.target[0] + 1) for e in examples]
    ids, mask, grp = collate(examples, groups, [1, 0], pad_id=tokenizer.pad_id, device="cpu")
    assert ids.shape == (2, max(len(e.ids) for e in examples))
    for row, i in enumerate([1, 0]):
        e, (s, t) = examples[i], examples[i].target
        assert ids[row, :len(e.ids)].tolist() == e.ids and (ids[row, len(e.ids):] == tokenizer.pad_id).all()
        assert mask[row].nonzero()[:, 0].tolist() == list(range(s, t))
        assert grp[row, s:t].tolist() == groups[i].tolist() and grp[row][~mask[row]].eq(0).all()


def test_length_grouped_batches_cover_every_example_once_and_cut_padding():
    lengths = [int(x) for x in torch.randint(20, 400, (403,), generator=torch.Generator().manual_seed(1))]
    plain = epoch_batches(len(lengths), 8, seed=0, epoch=0)
    grouped = epoch_batches(len(lengths), 8, seed=0, epoch=0, lengths=lengths)
    assert grouped == epoch_batches(len(lengths), 8, seed=0, epoch=0, lengths=lengths)   # resumable
    assert grouped != epoch_batches(len(lengths), 8, seed=0, epoch=1, lengths=lengths)
    assert sorted(sum(grouped, [])) == list(range(len(lengths)))
    assert max(map(len, grouped)) == 8 and sum(len(b) < 8 for b in grouped) == 1
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
