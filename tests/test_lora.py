"""nanogdrt.lora against PEFT (the reference), on a tiny random Llama.

Adapters cross both ways (nanogdrt -> PEFT, PEFT -> nanogdrt) and must give the same logits,
max abs diff <= 1e-4 (float32, eval mode), and the same LoRA gradients (rel. 1e-4). Merging is
checked to 1e-5. Errors name the file, field or key at fault.
"""

import copy
import json

import pytest
import torch

from nanogdrt.llama import Llama
from nanogdrt.lora import (LoRAConfig, LoRALinear, adapter_state_dict, inject_lora, load_adapter,
                           lora_disabled, lora_modules, lora_parameters, merge_lora, save_adapter,
                           set_lora_enabled, unmerge_lora)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Llama (GQA: 4 heads, 2 kv heads), saved; returns (folder, hf model)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture
def hf(tiny):
    return copy.deepcopy(tiny[1])  # get_peft_model wraps in place: never touch the shared one


@pytest.fixture
def nano(tiny):
    return Llama.from_pretrained(tiny[0])


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize(params, std=0.1, seed=0):
    """Non-zero B (and new A) so an adapter is not the identity it starts as."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- PEFT round trips

def test_nanogdrt_adapter_loads_in_peft(nano, hf, ids, tmp_path):
    config = LoRAConfig(r=4, alpha=8, dropout=0.1)
    names = inject_lora(nano, config)
    assert names == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    randomize(lora_parameters(nano))
    save_adapter(nano, tmp_path, config, base_model_name_or_path="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]  # no temp files

    ref = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    cfg = ref.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    with torch.no_grad():
        assert max_diff(nano.eval()(ids), ref(ids).logits) <= TOL


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_LINEAR])
def test_peft_adapter_loads_in_nanogdrt(nano, hf, ids, tmp_path, targets):
    lc = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=list(targets),
                         task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf, lc)
    randomize(p for n, p in ref.named_parameters() if "lora_B" in n)
    ref.save_pretrained(tmp_path)

    config = load_adapter(nano, tmp_path)
    assert (config.r, config.alpha, config.dropout) == (4, 16, 0.05)
    assert set(config.target_modules) == set(targets)  # PEFT stores them as a set
    assert len(lora_modules(nano)) == 2 * len(targets)
    with torch.no_grad():
        assert max_diff(nano.eval()(ids), ref.eval()(ids).logits) <= TOL


def test_gradients_match_peft(nano, hf, ids, tmp_path):
    """Same loss, same gradients on A and B (dropout 0 so both sides are deterministic)."""
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
    randomize(p for n, p in ref.named_parameters() if "lora_B" in n)
    ref.save_pretrained(tmp_path)
    load_adapter(nano, tmp_path)

    ref.train()(ids).logits.logsumexp(-1).mean().backward()
    nano.train()(ids).logsumexp(-1).mean().backward()
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    ours = {f"base_model.model.{n}": p.grad for n, p in nano.named_parameters() if p.requires_grad}
    assert ours.keys() == ref_grads.keys()
    for name, g in ours.items():
        scale = ref_grads[name].abs().max().item()
        assert scale > 0 and max_diff(g, ref_grads[name]) <= 1e-4 * scale, name


# ----------------------------------------------------------------------------- the layer itself

def test_starts_as_noop_and_freezes_base(nano, ids):
    with torch.no_grad():
        base = nano(ids)
    base_state = {k: v.clone() for k, v in nano.state_dict().items()}
    config = LoRAConfig(r=8, alpha=16, dropout=0.5, target_modules=ALL_LINEAR)
    names = inject_lora(nano, config)

    # B = 0: exactly the base model, in eval and (dropout on the LoRA path only) in training mode.
    with torch.no_grad():
        assert torch.equal(nano.eval()(ids), base)
        assert torch.equal(nano.train()(ids), base)
    # Base keys keep their HF names and values; only lora_A / lora_B keys are new.
    state = nano.state_dict()
    assert set(base_state) <= set(state)
    assert all(".lora_A." in k or ".lora_B." in k for k in set(state) - set(base_state))
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    # Only LoRA parameters train, r * (in + out) per wrapped layer.
    trainable = [p for p in nano.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(nano)}
    layers = [nano.get_submodule(n) for n in names]
    assert sum(p.numel() for p in trainable) == sum(8 * (m.in_features + m.out_features) for m in layers)
    # A uses nn.Linear's / PEFT's kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in); B is zero.
    for m in layers:
        assert m.lora_A.weight.abs().max() <= 1 / m.in_features ** 0.5
        assert not m.lora_B.weight.any()


def test_injected_layers_take_the_mode_of_the_model(nano, ids):
    """A model in eval mode gets LoRA layers in eval mode (no dropout: a decode is deterministic),
    and one in training mode gets them in training mode, as PEFT leaves them."""
    training = copy.deepcopy(nano).train()
    nano.eval()
    for model, mode in ((nano, False), (training, True)):
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.5))
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert layers and all(m.training == mode for m in layers)
    randomize([m.lora_B.weight for m in nano.modules() if isinstance(m, LoRALinear)])
    with torch.no_grad():
        torch.testing.assert_close(nano(ids), nano(ids), rtol=0, atol=0)


def test_gradient_flows_to_A_and_B(nano, ids):
    inject_lora(nano, LoRAConfig(r=4, alpha=8, dropout=0.1))
    q = nano.model.layers[0].self_attn.q_proj
    nano.train()(ids).logsumexp(-1).mean().backward()
    assert q.lora_B.weight.grad.abs().sum() > 0
    assert not q.lora_A.weight.grad.any()  # B = 0 at init: A's gradient passes through B
    assert q.weight.grad is None           # frozen base

    randomize(lora_parameters(nano))
    nano.zero_grad()
    nano(ids).logsumexp(-1).mean().backward()
    assert q.lora_A.weight.grad.abs().sum() > 0 and q.lora_B.weight.grad.abs().sum() > 0


def test_merge_unmerge(nano, ids):
    base_weights = {n: p.detach().clone() for n, p in nano.named_parameters()}
    inject_lora(nano, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR))
    randomize(lora_parameters(nano))
    nano.eval()
    with torch.no_grad():
        unmerged = nano(ids)
        merge_lora(nano)
        merge_lora(nano)  # idempotent
        assert all(m.merged for m in lora_modules(nano).values())
        assert max_diff(nano(ids), unmerged) <= 1e-5
        q = nano.model.layers[0].self_attn.q_proj
        assert not torch.allclose(q.weight, base_weights["model.layers.0.self_attn.q_proj.weight"])
        unmerge_lora(nano)
        assert max_diff(nano(ids), unmerged) <= 1e-5
    for name, p in nano.named_parameters():
        if name in base_weights:
            assert max_diff(p, base_weights[name]) <= 1e-6, name


def two_peft_adapters(hf, tmp_path):
    """PEFT model holding adapters "first" and "second" (different random B), each saved to its own folder."""
    lc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf, lc, adapter_name="first")
    ref.add_adapter("second", lc)
    folders = {}
    for seed, name in enumerate(("first", "second")):
        randomize((p for n, p in ref.named_parameters() if f"lora_B.{name}." in n), seed=seed)
        ref.save_pretrained(tmp_path / name, selected_adapters=[name])
        (config,) = (tmp_path / name).rglob("adapter_config.json")  # PEFT nests a non-default name
        folders[name] = config.parent
    return ref.eval(), folders


def test_disable_and_swap_match_peft(nano, hf, ids, tmp_path):
    """lora_disabled == PEFT's disable_adapter (the base model); load_adapter first, second, first
    again == PEFT's set_adapter on each."""
    with torch.no_grad():
        base = hf(ids).logits
    ref, folders = two_peft_adapters(hf, tmp_path)
    nano.eval()
    with torch.no_grad():
        for name in ("first", "second", "first"):
            load_adapter(nano, folders[name])
            ref.set_adapter(name)
            with_adapter = ref(ids).logits
            assert max_diff(nano(ids), with_adapter) <= TOL, name
            assert max_diff(with_adapter, base) > 1e-3  # each adapter changes the output
            with ref.disable_adapter(), lora_disabled(nano):
                assert max_diff(ref(ids).logits, base) <= TOL
                assert torch.equal(nano(ids), Llama.forward(nano, ids))
                assert max_diff(nano(ids), base) <= TOL
            assert max_diff(nano(ids), with_adapter) <= TOL  # back on after the block


def test_set_lora_enabled_unmerges_and_blocks_merge(nano, ids):
    with torch.no_grad():
        base = nano(ids)
    inject_lora(nano, LoRAConfig(r=4, alpha=8, dropout=0.0))
    randomize(lora_parameters(nano))
    nano.eval()
    with torch.no_grad():
        adapted = nano(ids)
        merge_lora(nano)
        set_lora_enabled(nano, False)  # a merged W still holds B A: unmerged first
        assert not any(m.merged or m.enabled for m in lora_modules(nano).values())
        assert max_diff(nano(ids), base) <= 1e-5
        with pytest.raises(ValueError, match="disabled"):
            merge_lora(nano)
        set_lora_enabled(nano, True)
        assert max_diff(nano(ids), adapted) <= 1e-5
    with lora_disabled(nano):  # A and B are out of the graph: nothing in it trains
        assert not nano(ids).requires_grad
    assert nano(ids).requires_grad


def test_adapter_state_dict_is_a_snapshot(nano):
    inject_lora(nano, LoRAConfig(r=2))
    state = adapter_state_dict(nano)
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 64)
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 2)
    randomize(lora_parameters(nano))
    assert not state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].any()


def test_save_load_round_trip_into_injected_model(nano, tiny, ids, tmp_path):
    config = LoRAConfig(r=4, alpha=4, dropout=0.0, target_modules=("k_proj", "down_proj"))
    inject_lora(nano, config)
    randomize(lora_parameters(nano))
    save_adapter(nano, tmp_path, config)
    save_adapter(nano, tmp_path, config)  # overwrite in place

    other = Llama.from_pretrained(tiny[0])
    inject_lora(other, LoRAConfig(r=4, alpha=99, dropout=0.3, target_modules=("k_proj", "down_proj")))
    assert load_adapter(other, tmp_path) == config  # scale and dropout now the adapter's
    with torch.no_grad():
        assert torch.equal(other.eval()(ids), nano.eval()(ids))


def test_smollm_qv_adapter(smollm, ids):
    """Default config on the embedded 135M model: PEFT's 460,800 trainable parameters, no-op at init."""
    model = copy.deepcopy(smollm)  # the session fixture is shared: never modify it
    inject_lora(model, LoRAConfig())
    assert sum(p.numel() for p in lora_parameters(model)) == 30 * 8 * ((576 + 576) + (576 + 192))
    assert all(isinstance(model.model.layers[i].self_attn.v_proj, LoRALinear) for i in range(30))
    with torch.no_grad():
        assert torch.equal(model(ids[:1, :6]), smollm(ids[:1, :6]))


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def saved(nano, tmp_path):
    """A valid adapter folder (r=4 on q, v) and its config."""
    config = LoRAConfig(r=4, alpha=8)
    src = copy.deepcopy(nano)
    inject_lora(src, config)
    save_adapter(src, tmp_path, config)
    return tmp_path


def test_missing_files(nano, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(nano, tmp_path / "nowhere")
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(nano, saved)
    assert not lora_modules(nano)


def test_corrupt_files(nano, saved):
    weights, cfg = saved / "adapter_model.safetensors", saved / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text(good[:-5])
    with pytest.raises(ValueError, match="adapter_config.json: invalid JSON"):
        load_adapter(nano, saved)
    cfg.write_text(good)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read"):
        load_adapter(nano, saved)
    assert not lora_modules(nano)


@pytest.mark.parametrize("field, value", [
    ("bias", "all"), ("use_dora", True), ("peft_type", "PREFIX_TUNING"), ("use_rslora", True),
    ("task_type", "SEQ_CLS"), ("target_modules", "all-linear"), ("rank_pattern", {"q_proj": 2}),
    ("modules_to_save", ["lm_head"]), ("r", 0),
])
def test_unsupported_config(nano, saved, field, value):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json.*{field}" if field != "r" else "r must"):
        load_adapter(nano, saved)


def test_shape_mismatch_names_key_and_shapes(nano, saved):
    inject_lora(nano, LoRAConfig(r=8, alpha=16))  # model's LoRA has r=8, the adapter r=4
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=rf"{key} has shape \(4, 64\), the model expects \(8, 64\)"):
        load_adapter(nano, saved)


def test_adapter_for_another_model(saved):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    folder = saved / "narrow_model"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    narrow = Llama.from_pretrained(folder)
    expected = r"q_proj.lora_A.weight has shape \(4, 64\), the model expects \(4, 32\)"
    with pytest.raises(ValueError, match=expected):
        load_adapter(narrow, saved)
    assert not lora_modules(narrow)  # checked before anything was injected


def test_key_mismatch(nano, saved):
    inject_lora(nano, LoRAConfig(r=4, target_modules=("q_proj", "k_proj")))
    with pytest.raises(ValueError, match="unexpected.*v_proj"):
        load_adapter(nano, saved)


def test_bad_targets(nano):
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        inject_lora(nano, LoRAConfig(target_modules=("q_proj", "nope")))
    with pytest.raises(ValueError, match="input_layernorm.*RMSNorm"):
        inject_lora(nano, LoRAConfig(target_modules=("input_layernorm",)))
    assert not lora_modules(nano)  # untouched after a failed inject
    inject_lora(nano, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(nano, LoRAConfig())


def test_load_into_merged_model_fails(nano, saved):
    inject_lora(nano, LoRAConfig(r=4, alpha=8))
    merge_lora(nano)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(nano, saved)


# ----------------------------------------------------------------------------- an adapter trained elsewhere, decoded

def test_peft_adapter_on_every_linear_decodes_like_transformers(nano, hf, tmp_path):
    """A PEFT adapter on other targets than ours (every linear layer; r 4, alpha 16, dropout 0.05,
    bias "none"), loaded into nanogdrt: the same top-10 lists and scores as transformers'
    constrained `generate` with PEFT's model (tests/references.py), on 12 titles with shared prefixes."""
    from nanogdrt.beam import beam_search
    from nanogdrt.trie import Trie
    from tests.references import hf_constrained_beam_search

    lc = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=list(ALL_LINEAR),
                         bias="none", task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf, lc)
    randomize((p for n, p in ref.named_parameters() if "lora_B" in n), std=0.3)
    ref.save_pretrained(tmp_path)
    eos, g = 2, torch.Generator().manual_seed(3)
    titles, seen = {}, set()
    while len(titles) < 12:
        ids = tuple(torch.randint(5, 14, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
        if ids not in seen:
            seen.add(ids)
            titles[100 + len(titles)] = list(ids) + [eos]
    trie = Trie.from_token_ids(titles, eos)
    prompts = [[1, 40, 41, 42, 7], [1, 50, 51, 52, 53, 54, 9]]
    base = beam_search(nano.eval(), prompts, trie, beams=10, top_k=10)
    load_adapter(nano, tmp_path)
    recs = beam_search(nano.eval(), prompts, trie, beams=10, top_k=10)
    assert [r.scores for r in recs] != [r.scores for r in base]      # the adapter matters (fixed seeds)
    for prompt, rec in zip(prompts, recs):
        items, scores = hf_constrained_beam_search(ref.eval(), prompt, trie, 10, eos)
        assert rec.item_ids == items
        assert max(abs(a - b) for a, b in zip(rec.scores, scores)) <= 1e-4
