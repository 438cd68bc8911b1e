"""The token-tree cache of beam search (nanogdrt.tree_cache) against brute force: every fed
beam's output equals a full forward pass of its prompt and path, to 1e-4 (fp32), through forks,
deaths, refilled slots, growth and compaction."""

import pytest
import torch

from nanogdrt import tree_cache
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.tree_cache import BeamTreeCache


def _gqa_model():
    """A random 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Llama(config).eval()


def _tree_cache_for(model, slots, beams, max_len):
    c = model.config
    return BeamTreeCache(c.num_hidden_layers, slots, beams, c.num_key_value_heads, max_len, c.head_dim)


def _load(model, cache, slots, prompts):
    """Right-padded prefill of `prompts` into the tree cache's `slots`."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    prompt_cache = model.new_cache(len(prompts), T)
    model(ids, attention_mask=mask, context=prompt_cache)
    cache.load_prompts(torch.tensor(slots), prompt_cache, torch.tensor([len(p) for p in prompts]))


def _attention_in_cuda_layout(monkeypatch):
    """Make SDPA return its output as CUDA's fused kernels do: (batch, time, heads, dim) in
    memory, transposed back to (batch, heads, time, dim). Same values, other strides."""
    sdpa = tree_cache.F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(tree_cache.F, "scaled_dot_product_attention", strided_sdpa)


@pytest.mark.parametrize("compact_every_step,cuda_layout", [(False, False), (True, False), (False, True)])
def test_beam_tree_cache_equals_full_forward(monkeypatch, compact_every_step, cuda_layout):
    """Beams that fork, die and are refilled with a new user see exactly their own path; dead
    beams are not fed.

    cuda_layout: the attention output arrives with CUDA's memory layout (a `.view` of it failed
    on an H200 once; on CPU it had always been contiguous)."""
    ours = _gqa_model()
    if cuda_layout:
        _attention_in_cuda_layout(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (7, 4, 9)]
    B = 3
    # Per step: the beam each beam extends, and which beams stay alive (are fed). A parent is
    # always a beam fed at the step before.
    parents = [None, [[2, 2, 0], [1, 0, 0]], [[0, 1, 1], [0, 0, 1]], [[0, 0, 2], [1, 1, 0]]]
    feds = [None, [[1, 1, 1], [1, 1, 0]], [[1, 0, 1], [1, 1, 1]], [[1, 1, 0], [1, 0, 1]]]
    with torch.no_grad():
        cache = _tree_cache_for(ours, 2, B, max_len=12)  # small: the cache has to grow
        _load(ours, cache, [0, 1], prompts[:2])
        prompt_of = {0: prompts[0], 1: prompts[1]}
        paths = {s: [[] for _ in range(B)] for s in (0, 1)}
        entries = {s: [[] for _ in range(B)] for s in (0, 1)}  # a unique id per fed token
        for step, (parent, fed) in enumerate(zip(parents, feds)):
            if step == 2:  # slot 0's user finishes; the third user takes its slot
                cache.release(torch.tensor([0]))
                _load(ours, cache, [0], prompts[2:])
                prompt_of[0], paths[0], entries[0] = prompts[2], [[] for _ in range(B)], [[] for _ in range(B)]
                parent[0] = [0] * B
            if parent is not None:
                parent, fed = torch.tensor(parent), torch.tensor(fed, dtype=torch.bool)
                cache.select(parent, fed=fed)
                paths = {s: [list(paths[s][int(parent[s, b])]) for b in range(B)] for s in (0, 1)}
                entries = {s: [list(entries[s][int(parent[s, b])]) if fed[s, b] else [] for b in range(B)]
                           for s in (0, 1)}
            tokens = torch.randint(0, 101, (2, B), generator=g)
            packed = ours(cache.pack(tokens)[None], context=cache)[0]              # (M, V)
            assert len(packed) == int(cache.fed.sum())
            out = cache.unpack(packed, torch.zeros(2, B, packed.shape[-1]))       # (2, B, V)
            for s, b in cache.fed.nonzero().tolist():
                paths[s][b].append(int(tokens[s, b]))
                entries[s][b].append((step, b))
                full = ours(torch.tensor([prompt_of[s] + paths[s][b]]))[0, -1]
                assert (out[s, b] - full).abs().max() <= 1e-4, (step, s, b)
            if compact_every_step:
                cache.compact()  # keeps the prompt and every fed token a live beam descends from
                for s in (0, 1):
                    needed = len(prompt_of[s]) + len({e for path in entries[s] for e in path})
                    assert int(cache.length[s]) == needed
