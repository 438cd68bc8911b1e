"""A Llama forward pass from scratch: config, RMSNorm, RoPE, attention, MLP, block, model.

Covers the decoder-only family that LLM recommenders fine-tune: Llama 2 / 3 / 3.2 (incl.
`llama3` RoPE scaling), SmolLM2, TinyLlama, and Qwen2 (q/k/v biases). Module names equal the
Hugging Face weight names (`model.layers.0.self_attn.q_proj`, ...) so checkpoints load strictly
and LoRA targets read as in PEFT.

Three choices serve the rest of nanogdrt:
- `hidden_states()` and `logits()` are separate steps. The loss needs logits only at the target
  positions, beam search only at each beam's last token; a full (B, T, V) logits tensor is
  ~200 MB for one 8 x 160 batch of a 49k vocabulary.
- An optional *attention context* (`AttentionContext`) gives the new tokens' RoPE positions and
  computes attention in every layer: `kv_cache.KVCache`, `kv_cache.SharedPrefixCache`,
  `tree_cache.BeamTreeCache` (beam search) and `attribution.PackedAttention` (not a cache).
  Without one, attention is causal (or padding-masked) self-attention over the tokens given.
- Fused `scaled_dot_product_attention` by default; `Attention.use_sdpa = False` runs the same
  formula written out, softmax(Q K^T / sqrt(D) + mask) V (`manual_attention`), as llama2.c does.
"""

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogdrt.checkpoint import load_safetensors_folder
from nanogdrt.kv_cache import KVCache

# config.json fields that carry no information for a forward pass.
IGNORED_FIELDS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "hidden_dropout", "bos_token_id", "eos_token_id",
    "pad_token_id", "max_window_layers", "use_sliding_window", "sliding_window", "layer_types",
    "pretraining_tp", "mlp_bias", "hidden_act", "rope_scaling", "rope_parameters", "rope_theta",
    "generation_config", "tokenizer_class", "name_or_path", "quantization_config",
}
SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # None or {"rope_type": "llama3", "factor": ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # bias on q/k/v (Qwen2 style); o_proj never has one
    extra: dict = field(default_factory=dict, repr=False)  # ids etc. kept for callers

    def __post_init__(self):
        # Derived fields: a config.json may leave them out (as older Llama configs do).
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "LlamaConfig":
        """Explicit mapping from a Hugging Face config.json; unsupported values fail naming the field."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if cfg.get("pretraining_tp", 1) != 1:
            raise ValueError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)")
        if cfg.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        # transformers < 5 writes `rope_theta` + `rope_scaling`; transformers 5 one `rope_parameters`.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only default, llama3)")
        known = {f.name for f in fields(cls)} | IGNORED_FIELDS
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; nanogdrt.llama would ignore "
                             f"them silently, so it refuses instead")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            extra={k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg},
        )


# ----------------------------------------------------------------------------- the attention context

class AttentionContext(Protocol):
    """What `Llama.hidden_states(ids, context=...)` asks of the object that decides what the new
    tokens attend to (a KV cache, or several sequences packed in one row). Per forward pass of B
    rows of T new tokens, in this order:
      positions(attention_mask, T) -> (B, T)  RoPE positions, continuing what the context holds
      start_step(attention_mask, T)           bookkeeping before the first layer (masks, room)
      attend(layer, q, k, v) -> (B, Hq, T, D) once per layer, in order: the new tokens' rotated
                                              q (B, Hq, T, D), k and v (B, Hkv, T, D), GQA's Hq
                                              a multiple of Hkv; a cache also stores k and v
      end_step(T)                             the new tokens now count as held
    attention_mask (B, T): 1 for real tokens, 0 for padding; None: all real.
    """
    def positions(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor: ...
    def start_step(self, attention_mask: torch.Tensor | None, T: int) -> None: ...
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
    def end_step(self, T: int) -> None: ...


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even for bf16 activations (as the reference does), then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d), optionally rescaled as Llama 3.1 does for long contexts."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", config.max_position_embeddings)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, D), computed in float32 and cast once."""
    freqs = positions[..., None].float() * inv_freq.float()   # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                    # (B, T, D): rotate-half layout
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """x (B, H, T, D) rotated by its positions' angles; cos, sin (B, 1, T, D) broadcast over heads."""
    # Hugging Face checkpoints pair dimension i with i + D/2 ("rotate half"), not 2i with 2i+1
    # as the original Llama code did; nanogdrt.checkpoint converts GGUF rows to this layout.
    x1, x2 = x.chunk(2, dim=-1)                                # (B, H, T, D/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def manual_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + mask) v written out: what the fused SDPA kernel computes.
    q (B, Hq, T, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv (GQA); mask (B, 1, T, S) boolean,
    True where a query may look, or None for causal attention (T == S)."""
    B, Hq, T, D = q.shape
    S, g = k.shape[2], Hq // k.shape[1]
    # GQA: query head h reads key/value head h // g, so each K/V head is repeated g times in a row.
    k = k.repeat_interleave(g, dim=1)                                            # (B, Hq, S, D)
    v = v.repeat_interleave(g, dim=1)                                            # (B, Hq, S, D)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)                               # (B, Hq, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()       # (T, S)
    att = att.masked_fill(~mask, float("-inf"))  # -inf: exp(-inf) = 0, a masked key gets no weight
    # Softmax in float32 (a bf16 sum of hundreds of terms loses digits), then back.
    return att.float().softmax(-1).to(q.dtype) @ v                               # (B, Hq, T, D)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # an attention context keeps one K/V buffer per layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        self.use_sdpa = True  # False: `manual_attention`, the formula written out (slower)

    def forward(self, x, cos, sin, mask, context=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        # Keys are stored rotated (by their own position), so a cache never rotates them again.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if context is not None:  # a cache or packing decides which keys each query sees
            y = context.attend(self.layer_idx, q, k, v)                                 # (B, Hq, T, D)
        elif not self.use_sdpa:
            y = manual_attention(q, k, v, mask)                                         # (B, Hq, T, D)
        elif mask is None:  # is_causal lets SDPA skip the masked half instead of reading a mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)              # (B, T, Hq*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # SwiGLU: a SiLU-gated product, (B, T, C) -> (B, T, intermediate) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, context=None):
        # Pre-norm residual stream: each sublayer reads a normalised copy and adds its output.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, context)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Decoder(nn.Module):
    """The part under `model.` in Hugging Face names: embeddings, blocks, final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def compile_blocks(model: nn.Module, **options) -> None:
    """torch.compile each decoder block in place (opt-in: train.py --compile), as gpt-fast does.

    A block is where a step's many small kernels live (RMSNorm, RoPE, SiLU, the LoRA adds);
    compiling it fuses them. All blocks share one compiled graph (their parameters are inputs),
    so the cost is one compilation, not one per layer. Names and state dicts are unchanged.
    """
    for block in model.model.layers:
        block.compile(**options)


# ----------------------------------------------------------------------------- the model

def padding_positions_and_mask(attention_mask: torch.Tensor):
    """(B, T) 0/1 mask -> positions that skip padding, and a (B, 1, T, T) boolean attention mask.

    With left padding, a row's first real token gets position 0, so a padded row computes the
    same as the unpadded one. Padding queries attend to themselves only: never a fully masked
    row (which would give NaN), and their outputs are ignored anyway.
    """
    valid = attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)                 # (B, T)
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]                                # (B, T query, T key)
    mask = mask | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return positions, mask[:, None]


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # SmolLM2, Llama 3.2 1B/3B: one matrix embeds and unembeds
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not persistent: derived from the config, and absent from Hugging Face checkpoints.
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, context: AttentionContext | None = None,
                      inputs_embeds=None):
        """input_ids (B, T) -> final-normed hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding (left or right). With a context
        (a KV cache, say), it covers only the tokens given now; the cache remembers the earlier
        ones, and the context alone decides positions and attention (see `AttentionContext`).
        inputs_embeds (B, T, C), instead of input_ids: the input vectors themselves, e.g. token
        embeddings with some rows replaced (soft tokens, nanogdrt/soft_tokens.py).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, C)
        B, T = x.shape[:2]
        mask = None  # None: plain causal attention, the fast path
        if context is not None:
            positions = context.positions(attention_mask, T)
            context.start_step(attention_mask, T)
        elif attention_mask is not None and not bool(attention_mask.all()):
            positions, mask = padding_positions_and_mask(attention_mask)
        else:
            positions = torch.arange(T, device=x.device).expand(B, T)
        if position_ids is not None:
            positions = position_ids
        # cos/sin once per forward, shared by every layer (they depend on positions only).
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, context)
        if context is not None:
            context.end_step(T)
        return self.model.norm(x)

    def logits(self, hidden, rows=None):
        """LM head, optionally restricted to vocabulary `rows` (a 1-D index tensor)."""
        weight = self.lm_head.weight if rows is None else self.lm_head.weight[rows]   # (V or R, C)
        return F.linear(hidden, weight)                                                # (..., V or R)

    def forward(self, input_ids, attention_mask=None, position_ids=None, context: AttentionContext | None = None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, context))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=p.dtype, device=p.device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Llama":
        """Load a Hugging Face folder: config.json + model.safetensors (or a sharded index)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: not found (expected a Hugging Face model folder)")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        config = LlamaConfig.from_hf(raw, source=str(config_file))
        with torch.device("meta"):  # shapes only: no memory or random init for weights we replace
            model = cls(config)
        state = load_safetensors_folder(path)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {k: v for k, v in model.state_dict().items()
                    if not (config.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        for k, t in state.items():
            if t.shape != expected[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(expected[k].shape)}")
        model = model.to_empty(device=device)
        # strict=False only for the tied lm_head, checked above; assign=True keeps the loaded
        # tensors instead of copying them into the empty ones.
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if config.tie_word_embeddings:  # assign=True replaced embed_tokens.weight: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        # Buffers made on the meta device hold no values, and inv_freq is not in the checkpoint.
        model.inv_freq = rope_inverse_frequencies(config).to(device)
        return model.to(device=device, dtype=dtype).eval()
