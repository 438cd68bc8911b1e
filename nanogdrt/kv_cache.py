"""Key/value caches for incremental decoding.

A cache holds, for every layer, the rotated keys and the values of the tokens seen so far, and
knows how queries attend over them (`attend`). The model asks it three things per step:
`positions` (RoPE positions of the new tokens, skipping padding), `start_step` / `end_step`
(bookkeeping around the layers), and `attend` (inside each layer).

- `KVCache`: one row per sequence; left or right padding is remembered per key.
- `SharedPrefixCache`: constrained beam search keeps B beams per user that all continue the
  same prompt. Repeating the prompt's keys B times costs B x memory traffic for nothing, so the
  beams of a user attend to one shared copy of the prompt cache plus their own small cache of
  generated tokens; the two score blocks share one softmax, which is exactly attention over
  the concatenated keys.
- `BeamTreeCache`: the cache of the constrained beam search (`nanogdrt.beam`). One slot per user
  being searched; a slot holds its prompt and then the tree of tokens its beams have fed. Beams
  are reordered by moving visibility masks, never keys; a finished user's slot is refilled with
  the next user's prompt (continuous batching).
Caches are used under `torch.no_grad()` only: they write into their buffers in place.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# For the beam tree's masked attention in bf16 on CUDA, PyTorch picks cuDNN attention. In a
# profile on an H200 it spent ~2 ms of CPU time per call (20 us on the GPU): it plans anew for
# each key length, and the tree's width changes every step. scripts/device_check.py (check 6)
# times beam search with and without it. The other kernels are what fp32 and the CPU use anyway.
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache(nn.Module):
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


class BeamTreeCache(nn.Module):
    """Keys and values of `slots` users' beam searches, each user's beams sharing one token tree.

    Slot s holds its user's prompt in columns [0, prompt_len[s]) and, after it, the tokens its
    `beams` beams were fed: B new columns per step, one per beam. A beam attends to the prompt and
    to the columns of its own ancestors, which `visible` (slots, beams, columns) records. When
    beams are reordered (beam b now extends beam parent[b]) only the visibility rows move: no key
    is copied, unlike a per-beam cache whose whole history is copied every step. Columns that no
    beam sees any more (pruned branches) are squeezed out by `compact` when they pile up.

    Only the beams marked in `fed` (slots, beams) take a token: the live beams of live slots.
    Beams that died (fewer titles left than beams; with length_penalty 1 most of a search's late
    steps) and slots without a user cost no matrix product. The model is called with the fed
    beams' tokens packed into one row, input_ids (1, M) in (slot, beam) order (`pack`), and
    returns them packed (`unpack` spreads them back). Inside attention each slot's beams take
    the place of the time axis, so one masked attention per slot serves all its beams (a tree
    attention mask); each fed beam adds one column to its slot.
    """

    def __init__(self, n_layers, slots, beams, n_kv_heads, max_len, head_dim, dtype=torch.float32, device="cpu"):
        super().__init__()
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.visible = torch.zeros(slots, beams, max_len, dtype=torch.bool, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)        # columns in use
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.n_generated = torch.zeros(slots, dtype=torch.long, device=device)   # tokens fed per beam
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self.fed = torch.zeros(slots, beams, dtype=torch.bool, device=device)   # take a token next
        self.beams = beams
        self._slot = self._beam = self._rank = self._cols = self._mask = None   # for one forward pass
        self._width = 0

    @property
    def slots(self):
        return self.k.shape[1]

    @property
    def max_len(self):
        return self.k.shape[3]

    def load_prompts(self, slots: torch.Tensor, prompt: KVCache, lengths: torch.Tensor):
        """Put prompts into `slots`: `prompt` holds them right-padded, row i of length lengths[i]."""
        P = prompt.length
        self.reserve(P)
        self.k[:, slots, :, :P] = prompt.k[:, :, :, :P]
        self.v[:, slots, :, :P] = prompt.v[:, :, :, :P]
        cols = torch.arange(self.max_len, device=self.k.device)
        self.visible[slots] = (cols[None] < lengths[:, None])[:, None]          # every beam: the prompt
        self.length[slots] = lengths
        self.prompt_len[slots] = lengths
        self.n_generated[slots] = 0
        self.live[slots] = True
        self.fed[slots] = True

    def release(self, slots: torch.Tensor):
        """Free `slots` (their users finished): they stop growing and attend to nothing real."""
        self.live[slots] = False
        self.fed[slots] = False
        self.length[slots] = 0
        self.visible[slots] = False

    def select(self, parent: torch.Tensor, fed: torch.Tensor | None = None):
        """Beam b of each live slot now extends beam parent[s, b]: it inherits that beam's view.

        fed (S, B): the beams fed next (default: every beam of a live slot). The others are dead:
        they lose their view, so that compaction can drop what only they saw.
        """
        index = parent[:, :, None].expand(-1, -1, self.max_len)
        moved = self.visible.gather(1, index)
        live = self.live[:, None].expand(-1, self.beams)
        self.fed = live.clone() if fed is None else fed & live
        self.visible = moved & self.fed[:, :, None]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(S, B, ...) -> (M, ...): the rows of the fed beams, in (slot, beam) order."""
        return x[self.fed]

    def unpack(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write packed rows x (M, ...) into their (slot, beam) places of out (S, B, ...)."""
        out[self.fed] = x
        return out

    def keep(self, slots: torch.Tensor):
        """Drop every slot but `slots` (indices): once no user waits, emptied slots cost nothing."""
        self.k, self.v = self.k[:, slots], self.v[:, slots]
        for name in ("visible", "length", "prompt_len", "n_generated", "live", "fed"):
            setattr(self, name, getattr(self, name)[slots])

    def reserve(self, n_columns: int):
        """Make room for `n_columns` columns (doubling), keeping what the cache holds."""
        if n_columns <= self.max_len:
            return
        new_len = max(n_columns, 2 * self.max_len)
        L, S, H, M, D = self.k.shape
        self.k = torch.cat([self.k, self.k.new_zeros(L, S, H, new_len - M, D)], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(L, S, H, new_len - M, D)], dim=3)
        self.visible = torch.cat([self.visible, self.visible.new_zeros(S, self.beams, new_len - M)], dim=2)

    def _seen(self) -> torch.Tensor:
        """(S, W) columns some beam of the slot still sees, W = the longest slot's length."""
        return self.visible[:, :, :int(self.length.max())].any(1)

    def dead_columns(self) -> float:
        """Share of the attended width that no beam sees any more (pruned branches, padding)."""
        seen = self._seen()
        return 1.0 - float(seen.sum(-1).max()) / max(seen.shape[1], 1)

    def compact(self):
        """Squeeze out the columns no beam of a slot sees; the others keep their order."""
        seen = self._seen()
        for s in self.live.nonzero().flatten().tolist():  # a copy per slot: faster than one gather
            cols = seen[s].nonzero().flatten()
            n = len(cols)
            self.k[:, s, :, :n] = self.k[:, s].index_select(2, cols)
            self.v[:, s, :, :n] = self.v[:, s].index_select(2, cols)
            self.visible[s, :, :n] = self.visible[s][:, cols]
            self.visible[s, :, n:] = False
            self.length[s] = n

    # The model's side of the protocol: positions, start_step, attend, end_step.
    def positions(self, attention_mask, T):
        self._slot, self._beam = self.fed.nonzero(as_tuple=True)                # (M,) each
        return (self.prompt_len + self.n_generated)[self._slot][None]           # (1, M)

    def start_step(self, attention_mask, T):
        if T != len(self._slot):
            raise ValueError(f"BeamTreeCache takes the fed beams' tokens packed, input_ids (1, M): "
                             f"got {T} tokens for {len(self._slot)} fed beams")
        self._n_fed = n_fed = self.fed.sum(1)                                    # (S,)
        width = int((self.length + n_fed).max())
        if width > self.max_len:
            self.compact()  # often frees enough room without growing
            width = int((self.length + n_fed).max())
        self.reserve(width)
        self._width = width
        # A slot's fed beams take its next columns, in beam order, and its first query rows.
        self._rank = (self.fed.cumsum(1) - 1)[self._slot, self._beam]            # (M,)
        self._cols = self.length[self._slot] + self._rank                        # (M,)
        self.visible[self._slot, self._beam, self._cols] = True                  # itself
        # The attention's query axis is as long as the most beams any slot feeds, not B: late in
        # a search most beams are dead. Row r of slot s is its r-th fed beam (unused rows see
        # nothing; their outputs are dropped).
        self._query_visible = self.visible.new_zeros(self.slots, int(n_fed.max()), width)  # (S, R, W)
        self._query_visible[self._slot, self._rank] = self.visible[self._slot, self._beam, :width]

    def attend(self, layer, q, k, v):
        """q (1, Hq, M, D); k, v (1, Hkv, M, D) of the M fed beams' tokens -> (1, Hq, M, D)."""
        _, Hq, M, D = q.shape
        Hkv = k.shape[1]
        S, g = self.slots, Hq // Hkv
        R, W = self._query_visible.shape[1:]
        k_layer, v_layer = self.k[layer], self.v[layer]                          # (S, Hkv, max_len, D)
        k_layer[self._slot, :, self._cols] = k[0].transpose(0, 1)               # (M, Hkv, D)
        v_layer[self._slot, :, self._cols] = v[0].transpose(0, 1)
        if layer == 0:  # the same mask for every layer: GQA's query heads share it
            mask = self._query_visible[:, None]                                  # (S, 1, R, W)
            self._mask = mask[:, :, None].expand(S, 1, g, R, W).reshape(S, 1, g * R, W)
        # Queries to (slot, rank) places, zeros elsewhere; the GQA group is folded into the
        # query axis rather than keys repeated per query head.
        queries = q.new_zeros(S, R, Hq, D)
        queries[self._slot, self._rank] = q[0].transpose(0, 1)
        queries = queries.transpose(1, 2).reshape(S, Hkv, g * R, D)
        with sdpa_kernel(NOT_CUDNN):
            y = F.scaled_dot_product_attention(queries, k_layer[:, :, :W], v_layer[:, :, :W],
                                               attn_mask=self._mask)
        # reshape, not view: a CUDA kernel may return another memory layout
        return y.reshape(S, Hq, R, D)[self._slot, :, self._rank].transpose(0, 1)[None]

    def end_step(self, T):
        self.length = self.length + self._n_fed
        self.n_generated = self.n_generated + self.live
