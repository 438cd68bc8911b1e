"""The title trie: structure, vectorized allowed-token lookup, and agreement with PromptBuilder."""

import ast
import json

import pytest
import torch

from nanogdrt.trie import Trie

EOS = 2
ITEMS = {  # item id -> target ids; 11 and 12 share a title, 13 is a prefix of 14 up to EOS
    10: [5, 6, 7, EOS],
    11: [5, 6, 8, EOS],
    12: [5, 6, 8, EOS],
    13: [5, 9, EOS],
    14: [5, 9, 4, EOS],
    15: [3, EOS],
}


def children(trie: Trie, node: int) -> dict[int, int]:
    """Reference lookup: scan the CSR row of one node."""
    lo, hi = trie.child_ptr[node].item(), trie.child_ptr[node + 1].item()
    return dict(zip(trie.child_token[lo:hi].tolist(), trie.child_node[lo:hi].tolist()))


def test_paths_leaves_and_duplicates():
    trie = Trie.from_token_ids(ITEMS, EOS)
    assert len(trie) == 5  # distinct titles
    assert trie.depth == 4
    for item, ids in ITEMS.items():
        leaf = trie.walk(ids)
        assert item in trie.leaf_items[leaf]
        assert trie.tokens_of(leaf) == ids
        assert children(trie, leaf) == {}
    assert trie.leaf_items[trie.walk(ITEMS[11])] == (11, 12)
    assert trie.walk([5, 4]) is None
    assert set(children(trie, 0)) == {3, 5}
    assert set(children(trie, trie.walk([5, 9]))) == {4, EOS}


def test_allowed_matches_per_node_lookup():
    trie = Trie.from_token_ids(ITEMS, EOS)
    nodes = torch.arange(trie.n_nodes).repeat(2)
    active = torch.rand(nodes.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    allowed = trie.allowed(nodes, active)
    assert allowed.tokens.shape == allowed.nodes.shape == allowed.mask.shape
    for row, (n, a) in enumerate(zip(nodes.tolist(), active.tolist())):
        m = allowed.mask[row]
        got = dict(zip(allowed.tokens[row][m].tolist(), allowed.nodes[row][m].tolist()))
        assert got == (children(trie, n) if a else {})


def test_rejects_targets_without_final_eos():
    with pytest.raises(ValueError, match="end with EOS"):
        Trie.from_token_ids({1: [5, 6]}, EOS)
    with pytest.raises(ValueError, match="end with EOS"):
        Trie.from_token_ids({1: [5, EOS, 6, EOS]}, EOS)
    with pytest.raises(ValueError, match="empty"):
        Trie.from_token_ids({}, EOS)


def check_catalogue(titles: dict[int, str], builder, hf):
    """Each title's path in the trie = the ids after the response header in MSL's prompt for
    that target, tokenized whole by transformers (the "N/A" prompt of Eq. 2), + EOS."""
    from msl_reference import msl_ids, msl_text

    trie = Trie.from_titles(titles, builder)
    header = msl_ids(hf, msl_text("toy", [], na=True), add_eos=False)
    full = hf([msl_text("toy", [], t, na=True) for t in titles.values()])["input_ids"]
    for item, ids in zip(titles, full):
        assert ids[:len(header)] == header
        leaf = trie.walk(ids[len(header):] + [hf.eos_token_id])
        assert leaf is not None and item in trie.leaf_items[leaf], titles[item]
    return trie


@pytest.fixture(scope="module")
def hf(smollm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_dir)


def test_synthetic_catalogue_agrees_with_msl_prompts(tokenizer, hf):
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.synthetic import SyntheticConfig, generate

    check_catalogue(generate(SyntheticConfig()).titles, PromptBuilder(tokenizer, "synthetic"), hf)


def test_toy_catalogue_agrees_with_msl_prompts(tokenizer, hf, toy_dir):
    from nanogdrt.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, "toy")
    titles = {int(k): v for k, v in json.loads((toy_dir / "id2name.json").read_text()).items()}
    trie = check_catalogue(titles, builder, hf)
    assert sum(len(ids) for ids in trie.leaf_items.values()) == len(titles) == 11758
    assert sum(len(ids) > 1 for ids in trie.leaf_items.values()) == 57  # shared titles (README)
    # The target of a test row, in its prompt with history, is a path to that item's leaf.
    row = (toy_dir / "test.csv").read_text().splitlines()[1]
    items = ast.literal_eval(row.split('"')[1])
    p = builder.build([titles[i] for i in items[:-1]], titles[items[-1]])
    assert items[-1] in trie.leaf_items[trie.walk(p.ids[slice(*p.target)])]


def test_prefix_nodes_are_the_nodes_before_each_target_token():
    trie = Trie.from_token_ids(ITEMS, EOS)
    for ids in ITEMS.values():
        nodes = trie.prefix_nodes(ids)
        assert nodes == [trie.walk(ids[:j]) for j in range(len(ids))] and nodes[0] == 0
        for n, t in zip(nodes, ids):                       # each target token is allowed there
            assert t in children(trie, n)
    with pytest.raises(ValueError, match="token 1 .* not a catalogue title"):
        trie.prefix_nodes([5, 4, EOS])
    with pytest.raises(ValueError, match="prefix of a catalogue title"):
        trie.prefix_nodes([5, 9])


def test_target_nodes_follow_target_mask_order():
    trie = Trie.from_token_ids(ITEMS, EOS)
    ids = torch.tensor([[1, 1, 5, 9, 4, EOS, 0],           # right padding, targets at any offset
                        [1, 3, EOS, 0, 0, 0, 0],
                        [1, 1, 1, 5, 6, 8, EOS]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:6] = mask[1, 1:3] = mask[2, 3:7] = True
    nodes = trie.target_nodes(ids, mask)
    expected = trie.prefix_nodes(ITEMS[14]) + trie.prefix_nodes(ITEMS[15]) + trie.prefix_nodes(ITEMS[11])
    assert nodes.tolist() == expected
    allowed = trie.allowed(nodes)
    assert ((allowed.tokens == ids[mask][:, None]) & allowed.mask).any(1).all()
    ids[1, 1] = 4                                          # example 1 is no longer a title
    with pytest.raises(ValueError, match="example 1 of the batch"):
        trie.target_nodes(ids, mask)


def test_toy_training_targets_walk_the_trie_in_context(tokenizer, toy_dir):
    """Targets tokenized inside a whole prompt are trie paths, so MSL's allowed sets exist."""
    import csv

    from nanogdrt.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, "toy")
    titles = {int(k): v for k, v in json.loads((toy_dir / "id2name.json").read_text()).items()}
    trie = Trie.from_titles(titles, builder)
    with open(toy_dir / "train_1000.csv", newline="") as f:
        rows = [ast.literal_eval(r["item_ids"]) for _, r in zip(range(32), csv.DictReader(f))]
    prompts = [builder.build([titles[i] for i in r[:-1]], titles[r[-1]]) for r in rows]
    T = max(len(p.ids) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, :len(p.ids)] = torch.tensor(p.ids)
        mask[b, p.target[0]:p.target[1]] = True
    allowed = trie.allowed(trie.target_nodes(ids, mask))
    assert ((allowed.tokens == ids[mask][:, None]) & allowed.mask).any(1).all()
