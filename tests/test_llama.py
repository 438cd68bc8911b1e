"""nanogdrt.llama against transformers: logits to 1e-4 (fp32) on tiny random configs,
left padding, KV-cached decoding, beams sharing a prompt cache, and loading errors; the
hand-written attention against SDPA."""

import json

import pytest
import torch

from nanogdrt.kv_cache import SharedPrefixCache
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


@pytest.mark.parametrize("name", ["mha", "gqa", "gqa_head_dim"])
def test_hand_written_attention_equals_sdpa(tmp_path, name):
    """Attention.use_sdpa = False (softmax(QK^T/sqrt(D) + mask) V written out) gives SDPA's
    logits to 1e-5 (fp32), causal and with left padding, with and without GQA."""
    _, ours = make_pair(tmp_path, name)
    ids = torch.randint(0, 101, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :17] = 0, 0  # left padding
    with torch.no_grad():
        fused = [ours(ids), ours(ids, attention_mask=mask)]
        for block in ours.model.layers:
            block.self_attn.use_sdpa = False
        written = [ours(ids), ours(ids, attention_mask=mask)]
    for a, b in zip(fused, written):
        assert (a - b).abs().max() <= 1e-5


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    _, ours = make_pair(tmp_path, "gqa")
    ids = torch.randint(0, 101, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache(batch_size=2, max_len=20)
        steps = [ours(ids[:, :8], attention_mask=mask[:, :8], context=cache)]
        for t in range(8, 20):  # one token at a time
            steps.append(ours(ids[:, t:t + 1], context=cache))
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
        ours(prompts, attention_mask=mask, context=prefix)
        shared = SharedPrefixCache(prefix, beams, max_new_tokens=G)
        out = torch.cat([ours(gen[:, :2], context=shared)] +
                        [ours(gen[:, t:t + 1], context=shared) for t in range(2, G)], dim=1)
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
        ours(prompts, context=prefix)
        shared = SharedPrefixCache(prefix, 3, max_new_tokens=3)
        ours(gen[:, :1], context=shared)
        order = torch.tensor([2, 2, 0])  # beam 2 forks twice, beam 0 survives, beam 1 dies
        shared.reorder(order)
        nxt = torch.tensor([[5], [6], [7]])
        out = ours(nxt, context=shared)[:, -1]
        for row, src in enumerate(order.tolist()):
            full = ours(torch.cat([prompts[0], gen[src, :1], nxt[row]])[None])[0, -1]
            assert (out[row] - full).abs().max() <= 1e-4


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


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_blocks_equal_eager_loss_and_lora_grads(tmp_path, backend):
    """compile_blocks (train.py --compile): the same loss and LoRA gradients as eager, on a
    padded batch (mask path) and then a plain one, with names and state dict unchanged.
    aot_eager checks what dynamo and autograd trace (tests/test_train.py runs inductor)."""
    from nanogdrt.llama import compile_blocks
    from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters

    make_pair(tmp_path, "gqa")
    models = []
    for _ in range(2):
        torch.manual_seed(1)   # the same LoRA init in both
        m = Llama.from_pretrained(tmp_path)
        inject_lora(m, LoRAConfig(dropout=0.0))
        with torch.no_grad():  # B != 0, so the LoRA path carries a gradient into A too
            for p in lora_parameters(m):
                p.add_(torch.randn_like(p) * 0.1)
        models.append(m.train())
    eager, compiled = models
    keys = list(compiled.state_dict())
    compile_blocks(compiled, backend=backend)
    assert list(compiled.state_dict()) == keys
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    ids = torch.randint(0, 101, (3, 12))
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[0, :4] = 0
    for mask in (padding, None):
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = m(ids, attention_mask=mask)[:, -4:].logsumexp(-1).mean()
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in lora_parameters(m)]))
        (a, grads_a), (b, grads_b) = losses
        assert torch.allclose(a, b, atol=1e-5)
        assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(grads_a, grads_b))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # how train.py decodes
        assert torch.allclose(compiled.eval()(ids), eager.eval()(ids), atol=1e-5)
