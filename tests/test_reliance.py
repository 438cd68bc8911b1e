"""History reliance: the swap / "N/A" measures equal a direct computation on a tiny random model."""

import pytest

from nanogdrt.analysis.reliance import compare_topk, derangement, history_reliance, swapped
from nanogdrt.beam import beam_search
from nanogdrt.controlled import ControlledConfig
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import Decoding, recommend
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


def test_compare_topk_by_hand():
    a = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2]]
    b = [[1, 9, 2, 10], [6, 5, 7, 8], [1, 2, 3, 4]]
    r = compare_topk(a, b, k=4)
    assert r.per_user_top1 == [False, True, False] and r.top1_changed == pytest.approx(1 / 3)
    # |A ∩ B| / K with K the longer list's length (4 in each row)
    assert r.per_user_overlap == [2 / 4, 4 / 4, 2 / 4] and r.overlap == pytest.approx(2 / 3)
    assert compare_topk(a, a, k=4)[:2] == (0.0, 1.0)
    assert compare_topk(a, b, k=1).per_user_overlap == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        compare_topk(a, b[:2], k=4)


def test_derangement_is_seeded_and_leaves_nobody_in_place():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=3)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
        assert perm == derangement(n, seed=3)
    assert derangement(50, seed=0) != derangement(50, seed=1)
    with pytest.raises(ValueError):
        derangement(1)


def test_reliance_equals_a_direct_computation(tiny_model_dir):
    model, tokenizer = Llama.from_pretrained(tiny_model_dir), Tokenizer(tiny_model_dir)
    ds = load_dataset("controlled", controlled=ControlledConfig(n_users=30, n_brands=2, lines_per_brand=2,
                                                                items_per_line=3, shortcut=0.3))
    builder, users = PromptBuilder(tokenizer, "controlled"), ds.test[:5]
    trie = Trie.from_titles(ds.titles, builder)
    decoding = Decoding(beams=4, top_k=4, batch_size=8)
    got = history_reliance(model, builder, trie, users, ds.titles, decoding, seed=7)

    def decode(histories, **kw):
        prompts = [builder.build([ds.titles[i] for i in h], **kw).ids for h in histories]
        return [r.item_ids for r in beam_search(model, prompts, trie, beams=4, top_k=4)]

    true = decode([x.history for x in users])
    assert true == [r["topk_item_ids"] for r in recommend(model, builder, trie, users, ds.titles, decoding)]
    perm = derangement(len(users), seed=7)
    assert [x.history for x in swapped(users, seed=7)] == [users[j].history for j in perm]
    swap = decode([users[j].history for j in perm])
    na = decode([[] for _ in users], mask_history=True)      # "N/A" decoded per user, not once
    for name, other in (("swap", swap), ("na", na)):
        top1 = [t[0] != o[0] for t, o in zip(true, other)]
        overlap = [len(set(t) & set(o)) / 4 for t, o in zip(true, other)]
        assert got[name].per_user_top1 == top1 and got[name].top1_changed == sum(top1) / len(top1)
        assert got[name].per_user_overlap == pytest.approx(overlap)
    # the test's own lists can be passed in: nothing changes
    again = history_reliance(model, builder, trie, users, ds.titles, decoding, seed=7, true_topk=true)
    assert again == got
