"""nanogdrt.llama against transformers: logits to 1e-4 (fp32) on tiny random configs,
left padding, KV-cached decoding, beams sharing a prompt cache, and loading errors."""

import json

import pytest
import torch

from nanogdrt.kv_cache import BeamTreeCache, SharedPrefixCache
from nanogdrt.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "gqa_head_dim": dict(num_key_value_heads=1, head_dim=32),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=256,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def make_pair(tmp_path, name, **overrides):
    """A random transformers model saved to disk and the same weights loaded by nanogdrt."""
    torch.manual_seed(0)
    if name == "qwen2_bias":
        cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, use_sliding_window=False,
                                       tie_word_embeddings=False)
        hf = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **CONFIGS[name], **overrides})
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases, so they are really tested
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(tmp_path)
    return hf, Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", [*CONFIGS, "qwen2_bias"])
def test_logits_match_transformers(tmp_path, name):
    hf, ours = make_pair(tmp_path, name)
    ids = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (3, 40, 101)
    assert (out - ref).abs().max() <= 1e-4


def test_left_padding_matches_unpadded_and_transformers(tmp_path):
    hf, ours = make_pair(tmp_path, "gqa")
    lengths = [12, 7, 3]
    T = max(lengths)
    rows = [torch.randint(0, 101, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    # transformers takes positions as given; pass the padding-skipping ones we compute.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        for i, r in enumerate(rows):
            alone = ours(r[None])[0]
            assert (out[i, T - len(r):] - alone).abs().max() <= 1e-4
            assert (out[i, T - len(r):] - ref[i, T - len(r):]).abs().max() <= 1e-4
    assert torch.isfinite(out).all()  # padding queries must not produce NaN


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    _, ours = make_pair(tmp_path, "gqa")
    ids = torch.randint(0, 101, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache(batch_size=2, max_len=20)
        steps = [ours(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
        for t in range(8, 20):  # one token at a time
            steps.append(ours(ids[:, t:t + 1], cache=cache))
        inc = torch.cat(steps, dim=1)
    assert (inc[0] - full[0]).abs().max() <= 1e-4
    assert (inc[1, 5:] - full[1, 5:]).abs().max() <= 1e-4


def test_shared_prefix_cache_equals_full_forward(tmp_path):
    """Beams that share one prompt cache compute what a full forward of prompt+beam computes."""
    _, ours = make_pair(tmp_path, "gqa")
    N, beams, P, G = 2, 3, 9, 4
    prompts = torch.randint(0, 101, (N, P))
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    gen = torch.randint(0, 101, (N * beams, G))
    with torch.no_grad():
        prefix = ours.new_cache(N, P)
        ours(prompts, attention_mask=mask, cache=prefix)
        shared = SharedPrefixCache(prefix, beams, max_new_tokens=G)
        out = torch.cat([ours(gen[:, :2], cache=shared)] +
                        [ours(gen[:, t:t + 1], cache=shared) for t in range(2, G)], dim=1)
        for row in range(N * beams):
            n = row // beams
            start = int((mask[n] == 0).sum())
            full = ours(torch.cat([prompts[n, start:], gen[row]])[None])[0, -G:]
            assert (out[row] - full).abs().max() <= 1e-4


def test_shared_prefix_reorder(tmp_path):
    _, ours = make_pair(tmp_path, "mha")
    prompts = torch.randint(0, 101, (1, 6))
    gen = torch.randint(0, 101, (3, 2))
    with torch.no_grad():
        prefix = ours.new_cache(1, 6)
        ours(prompts, cache=prefix)
        shared = SharedPrefixCache(prefix, 3, max_new_tokens=3)
        ours(gen[:, :1], cache=shared)
        order = torch.tensor([2, 2, 0])  # beam 2 forks twice, beam 0 survives, beam 1 dies
        shared.reorder(order)
        nxt = torch.tensor([[5], [6], [7]])
        out = ours(nxt, cache=shared)[:, -1]
        for row, src in enumerate(order.tolist()):
            full = ours(torch.cat([prompts[0], gen[src, :1], nxt[row]])[None])[0, -1]
            assert (out[row] - full).abs().max() <= 1e-4


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
    model(ids, attention_mask=mask, cache=prompt_cache)
    cache.load_prompts(torch.tensor(slots), prompt_cache, torch.tensor([len(p) for p in prompts]))


def _attention_in_cuda_layout(monkeypatch):
    """Make SDPA return its output as CUDA's fused kernels do: (batch, time, heads, dim) in
    memory, transposed back to (batch, heads, time, dim). Same values, other strides."""
    import nanogdrt.kv_cache as kv_cache

    sdpa = kv_cache.F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(kv_cache.F, "scaled_dot_product_attention", strided_sdpa)


@pytest.mark.parametrize("compact_every_step,cuda_layout", [(False, False), (True, False), (False, True)])
def test_beam_tree_cache_equals_full_forward(tmp_path, monkeypatch, compact_every_step, cuda_layout):
    """Beams that fork, die and are refilled with a new user see exactly their own path; dead
    beams are not fed.

    cuda_layout: the attention output arrives with CUDA's memory layout (a `.view` of it failed
    on an H200 once; on CPU it had always been contiguous)."""
    _, ours = make_pair(tmp_path, "gqa")
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
            packed = ours(cache.pack(tokens)[None], cache=cache)[0]                # (M, V)
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


def test_logits_rows_subset(tmp_path):
    _, ours = make_pair(tmp_path, "tied")
    ids = torch.randint(0, 101, (2, 7))
    rows = torch.tensor([3, 50, 7])
    with torch.no_grad():
        h = ours.hidden_states(ids)
        assert torch.allclose(ours.logits(h, rows), ours.logits(h)[..., rows], atol=1e-6)


def test_bf16_close_to_fp32(tmp_path):
    _, ours = make_pair(tmp_path, "gqa")
    ours16 = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        a, b = ours(ids), ours16(ids).float()
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1


def test_sharded_checkpoint_loads(tmp_path):
    hf, _ = make_pair(tmp_path / "one", "gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = Llama.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- bad input

def test_config_errors_name_the_field():
    base = dict(TINY, model_type="llama", num_key_value_heads=2)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        LlamaConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="unknown config field.*'shiny_new_feature'"):
        LlamaConfig.from_hf({**base, "shiny_new_feature": 3})
    with pytest.raises(ValueError, match="not a multiple"):
        LlamaConfig.from_hf({**base, "num_key_value_heads": 3})


def test_rope_parameters_and_rope_scaling_spellings_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    old = LlamaConfig.from_hf(dict(TINY, rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling}))
    new = LlamaConfig.from_hf(dict(TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling}))
    assert old == new and old.rope_theta == 5e5


def test_missing_and_corrupt_checkpoint_files(tmp_path):
    hf, _ = make_pair(tmp_path, "gqa")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 1"):
        Llama.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    make_pair(tmp_path, "gqa")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), the config implies"):
        Llama.from_pretrained(tmp_path)
