"""Key/value caches for plain incremental decoding.

A cache holds, for every layer, the rotated keys and the values of the tokens seen so far, and
knows how queries attend over them. It is an attention context (`nanogdrt.llama.AttentionContext`):
the model asks it for `positions` (RoPE positions of the new tokens, skipping padding),
`start_step` / `end_step` (bookkeeping around the layers), and `attend` (inside each layer).

- `KVCache`: one row per sequence; left or right padding is remembered per key.
- `SharedPrefixCache`: B continuations ("beams") per prompt that all share the prompt (Eq. 3
  scores many titles after one prompt this way). Repeating the prompt's keys B times costs B x
  memory traffic for nothing, so the beams of a prompt attend to one shared copy of the prompt
  cache plus their own small cache of generated tokens; the two score blocks share one softmax,
  which is exactly attention over the concatenated keys.
The token-tree cache of beam search lives in `nanogdrt.tree_cache`.
Caches are used under `torch.no_grad()` only: they write into their buffers in place.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache(nn.Module):
    """Keys and values (n_layers, batch, n_kv_heads, max_len, head_dim) of every row's tokens so far."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype=torch.float32, device="cpu"):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.length = 0  # positions filled so far (the same for every row; padding is masked)
        self._mask = None

    @property
    def max_len(self):
        return self.k.shape[3]

    def start_with(self, prefix: "KVCache"):
        """Start every row with the tokens of `prefix` (a cache of batch 1): copies its keys and values."""
        n = prefix.length
        self.k[:, :, :, :n] = prefix.k[:, :, :, :n]
        self.v[:, :, :, :n] = prefix.v[:, :, :, :n]
        self.valid[:, :n] = prefix.valid[:, :n]
        self.length = n

    def positions(self, attention_mask, T):
        """RoPE positions (B, T) of the new tokens: count of real tokens before each one."""
        B = self.k.shape[1]
        new = self._new_valid(attention_mask, B, T)
        past = self.valid[:, : self.length].sum(-1, keepdim=True)           # (B, 1)
        return (past + new.long().cumsum(-1) - 1).clamp(min=0)

    def _new_valid(self, attention_mask, B, T):
        if attention_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=self.k.device)
        return attention_mask.bool()

    def start_step(self, attention_mask, T):
        L, B = self.length, self.k.shape[1]
        if L + T > self.max_len:
            raise ValueError(f"KV cache full: {L} + {T} tokens > max_len {self.max_len}")
        self.valid[:, L:L + T] = self._new_valid(attention_mask, B, T)
        # Query i (absolute position L+i) sees real keys at positions <= L+i, and itself.
        q_pos = torch.arange(L, L + T, device=self.k.device)[:, None]
        k_pos = torch.arange(L + T, device=self.k.device)[None, :]
        causal = k_pos <= q_pos                                                 # (T, L+T)
        mask = causal[None] & self.valid[:, None, : L + T]                      # (B, T, L+T)
        self._mask = (mask | (k_pos == q_pos)[None])[:, None]                   # (B, 1, T, L+T)

    def write(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer, q, k, v):
        """q (B, Hq, T, D); k, v (B, Hkv, T, D) of the new tokens -> (B, Hq, T, D)."""
        keys, values = self.write(layer, k, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask, enable_gqa=True)

    def end_step(self, T):
        self.length += T


class SharedPrefixCache(nn.Module):
    """N users' prompt cache (shared, read-only) + a cache of generated tokens per beam.

    Rows are user-major: row n * beams + b is beam b of user n.
    """

    def __init__(self, prefix: KVCache, beams: int, max_new_tokens: int):
        super().__init__()
        n_layers, N, n_kv_heads, _, head_dim = prefix.k.shape
        self.prefix, self.beams, self.n_users = prefix, beams, N
        self.generated = KVCache(n_layers, N * beams, n_kv_heads, max_new_tokens, head_dim,
                                 dtype=prefix.k.dtype, device=prefix.k.device)

    def positions(self, attention_mask, T):
        past = self.prefix.valid[:, : self.prefix.length].sum(-1)               # (N,)
        past = past.repeat_interleave(self.beams)[:, None] + self.generated.length
        return past + torch.arange(T, device=past.device)[None]                 # (N*beams, T)

    def start_step(self, attention_mask, T):
        self.generated.start_step(None, T)  # generated tokens are never padding

    def end_step(self, T):
        self.generated.end_step(T)

    def reorder(self, rows: torch.Tensor):
        """Keep the generated cache of beams `rows` (N*beams global row indices), in that order."""
        L = self.generated.length
        g = self.generated
        g.k[:, :, :, :L] = g.k[:, rows, :, :L]
        g.v[:, :, :, :L] = g.v[:, rows, :, :L]

    def attend(self, layer, q, k, v):
        N, beams = self.n_users, self.beams
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv                                   # query heads per key/value head (GQA)
        scale = 1.0 / math.sqrt(D)
        gen_k, gen_v = self.generated.write(layer, k, v)                        # (B, Hkv, S, D)
        P = self.prefix.length
        pre_k = self.prefix.k[layer, :, :, :P]                                  # (N, Hkv, P, D)
        pre_v = self.prefix.v[layer, :, :, :P]

        # Prompt part: fold all beams (and the GQA group) of a user into the query axis.
        q_shared = (q.reshape(N, beams, Hkv, g, T, D).permute(0, 2, 1, 3, 4, 5)
                    .reshape(N, Hkv, beams * g * T, D))
        s_pre = (q_shared @ pre_k.transpose(-1, -2)) * scale                    # (N, Hkv, beams*g*T, P)
        s_pre = s_pre.masked_fill(~self.prefix.valid[:, None, None, :P], float("-inf"))
        s_pre = (s_pre.view(N, Hkv, beams, g * T, P).permute(0, 2, 1, 3, 4)
                 .reshape(B, Hkv, g * T, P))
        # Generated part: each beam's own tokens, causal among the new ones.
        q_own = q.reshape(B, Hkv, g * T, D)
        s_gen = (q_own @ gen_k.transpose(-1, -2)) * scale                       # (B, Hkv, g*T, S)
        own_mask = self.generated._mask[:, :, None].expand(B, 1, g, T, -1).reshape(B, 1, g * T, -1)
        s_gen = s_gen.masked_fill(~own_mask, float("-inf"))

        p = torch.cat([s_pre, s_gen], dim=-1).float().softmax(-1).to(q.dtype)   # one softmax
        p_pre, p_gen = p[..., :P], p[..., P:]
        p_pre = (p_pre.view(N, beams, Hkv, g * T, P).permute(0, 2, 1, 3, 4)
                 .reshape(N, Hkv, beams * g * T, P))
        y_pre = (p_pre @ pre_v).view(N, Hkv, beams, g, T, D).permute(0, 2, 1, 3, 4, 5)
        y = y_pre.reshape(B, Hkv, g * T, D) + p_gen @ gen_v                     # (B, Hkv, g*T, D)
        return y.reshape(B, Hq, T, D)
