"""The token-tree cache of constrained beam search: one slot per user, the user's beams sharing it.

A user's B beams all continue one prompt and, step by step, one another: beam b extends some
beam of the step before. A per-beam KV cache would copy every beam's whole history whenever
beams are reordered. Here a slot holds its user's prompt and then the tree of tokens its beams
have fed, B columns per step at most, and a boolean `visible` row per beam says which columns
(the prompt and its own ancestors) that beam attends to: reordering moves masks, never keys.

The interface `nanogdrt.beam` uses, and all it knows of the cache:

    load_prompts(slots, prompt_cache, lengths)   a new user in each of `slots`
    select(parent, fed)                          beam b extends beam parent[s, b]; `fed` take a token
    pack(x) / unpack(x, out)                     (S, B, ...) <-> the fed beams' rows (M, ...)
    release(slots) / keep(slots)                 a user finished / drop empty slots
    dead_columns() / compact()                   share of pruned columns / squeeze them out

and `Llama.hidden_states(ids, context=cache)` with the fed beams' tokens packed, ids (1, M),
through the `nanogdrt.llama.AttentionContext` protocol (positions, start_step, attend,
end_step). The cache knows nothing of scores: which beams live and which tokens they take is
the search's business.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanogdrt.kv_cache import KVCache

# For the beam tree's masked attention in bf16 on CUDA, PyTorch picks cuDNN attention. In a
# profile on an H200 it spent ~2 ms of CPU time per call (20 us on the GPU): it plans anew for
# each key length, and the tree's width changes every step. experiments/gpu/device_check.py (check 6)
# times beam search with and without it. The other kernels are what fp32 and the CPU use anyway.
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        self.n_generated = torch.zeros(slots, dtype=torch.long, device=device)   # fed per beam: RoPE offset
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self.fed = torch.zeros(slots, beams, dtype=torch.bool, device=device)   # take a token next
        self.beams = beams
        self._slot = self._beam = self._rank = self._cols = self._mask = None   # for one forward pass

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

    # nanogdrt.llama.AttentionContext: positions, start_step, attend (per layer), end_step.
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
