"""The embedded SmolLM2-135M checkpoint: conversion, tokenizer and logits against transformers."""

import json

import numpy as np
import pytest
import torch

from nanogdrt.checkpoint import DEFAULT_DIR, hf_name, unpermute_rope_rows
from nanogdrt.prompt import PromptBuilder

transformers = pytest.importorskip("transformers")
GGUF = DEFAULT_DIR.parent / ".gguf-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows (written independently of the module)."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]            # x_i
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]  # y_i
    return out


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)


def test_gguf_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        hf_name("blk.0.attn_qkv.weight")


def test_config_of_the_embedded_model(smollm_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 1e5


def test_greedy_continuation_knows_paris(smollm, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, smollm(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "Paris" in tokenizer.decode(ids[0].tolist())


def _toy_prompts(toy_dir, tokenizer, n=3):
    import ast
    import csv

    titles = {int(k): v for k, v in json.loads((toy_dir / "id2name.json").read_text()).items()}
    builder = PromptBuilder(tokenizer, "toy")
    with open(toy_dir / "test.csv") as f:
        rows = [ast.literal_eval(r["item_ids"]) for _, r in zip(range(n), csv.DictReader(f))]
    return [builder.build([titles[i] for i in r[:-1]], titles[r[-1]]).ids for r in rows]


def test_logits_equal_transformers_on_real_prompts(smollm, hf_smollm, tokenizer, toy_dir):
    for ids in _toy_prompts(toy_dir, tokenizer):
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (smollm(x) - hf_smollm(x).logits).abs().max() <= 1e-3


@pytest.fixture(scope="session")
def gguf_reference_tokenizer():
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} absent: `make setup` downloads it")
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_token_ids_equal_transformers_for_every_toy_title(tokenizer, gguf_reference_tokenizer, toy_dir):
    titles = list(json.loads((toy_dir / "id2name.json").read_text()).values())
    assert len(titles) == 11758
    ours = tokenizer.encode_batch(titles)
    ref = gguf_reference_tokenizer(titles, add_special_tokens=True)["input_ids"]
    mismatched = [t for t, a, b in zip(titles, ours, ref) if a != b]
    assert not mismatched, mismatched[:5]
    assert tokenizer.eos_id == gguf_reference_tokenizer.eos_token_id == 2


def test_weights_equal_transformers_reading_the_gguf(smollm):
    """transformers dequantizes the GGUF itself (and undoes the q/k permutation): same weights."""
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} absent: `make setup` downloads it")
    ref = transformers.LlamaForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    ref_state = ref.state_dict()
    for name, tensor in smollm.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
