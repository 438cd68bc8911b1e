"""Token relevance to the auxiliary tokens (Eq. 2, Eq. 3) and the split into G groups (§3.2).

Eq. 3 scores each target token by how predictable it is from the task description alone:

    r(y_t) = log P(y_t | x with its history replaced by "N/A", y_<t)

and Eq. 2 scores an item by the mean of r over its title tokens. High r = the model would
produce the token without looking at the user: the context bias GDRT counteracts.

Speed. With the history masked the prompt is the same for every example of a dataset, so r
depends on the target item only: we score each distinct title once, not each training row.
The masked prompt is prefilled once into a KV cache; the titles are then run as "beams" of that
one prefix through a `SharedPrefixCache` (no copies of the prompt's keys), a batch at a time.

Grouping. All target tokens of the training set are split by r into G groups with 1-D k-means
(group 1 = highest relevance). scikit-learn's KMeans is used when importable; otherwise an
exact dynamic programme (optimal within-cluster sum of squares) with the divide-and-conquer
speed-up of Grønlund et al. 2017, vectorised over each recursion level. `quantile` gives
equal-size groups instead (the paper's footnote 2).
"""

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nanogdrt.kv_cache import SharedPrefixCache

CACHE_FORMAT = "nanogdrt-relevance-v1"


# ----------------------------------------------------------------------------- Eq. 3 / Eq. 2

def masked_prompt_ids(builder) -> list[int]:
    """The prompt of Eq. 3: task description with the history replaced by " N/A"."""
    return builder.build([], None, mask_history=True).ids


def _target_logprob(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log P(ids[n] | hidden[n]) for hidden (N, C): logit of the id minus the logsumexp, float32.

    Chunked so that at most (chunk, V) logits exist at once (V is ~50k-150k)."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        logits = model.logits(hidden[s:s + chunk]).float()                 # (n, V)
        picked = logits.gather(1, ids[s:s + chunk, None])[:, 0]
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def score_targets(model, prompt_ids: Sequence[int], targets: Sequence[Sequence[int]],
                  batch_size: int = 64, progress: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs (float32, on CPU) of each target id sequence after one shared prompt.

    Equal to a full forward of `prompt_ids + target` per target (up to float rounding).
    """
    from tqdm import tqdm

    if any(len(t) == 0 for t in targets):
        raise ValueError("every target needs at least one token (target_ids ends with EOS)")
    device = model.lm_head.weight.device
    P = len(prompt_ids)
    prefix = model.new_cache(1, P)
    h = model.hidden_states(torch.tensor([list(prompt_ids)], device=device), context=prefix)  # (1, P, C)
    h_last = h[0, -1]                           # predicts the first token of every target

    out: list[torch.Tensor | None] = [None] * len(targets)
    order = sorted(range(len(targets)), key=lambda i: len(targets[i]))   # similar lengths together
    for s in tqdm(range(0, len(order), batch_size), desc="Eq. 3 relevance", unit="batch",
                  disable=not progress or len(order) <= batch_size):
        chunk = order[s:s + batch_size]
        n, L = len(chunk), max(len(targets[i]) for i in chunk)
        ids = torch.zeros(n, L, dtype=torch.long)                          # right padding with id 0
        valid = torch.zeros(n, L, dtype=torch.bool)
        for r, i in enumerate(chunk):
            ids[r, :len(targets[i])] = torch.tensor(targets[i])
            valid[r, :len(targets[i])] = True
        ids, valid = ids.to(device), valid.to(device)
        logp = torch.zeros(n, L, dtype=torch.float32, device=device)
        logp[:, 0] = _target_logprob(model, h_last.expand(n, -1), ids[:, 0])
        if L > 1:
            # Beams of the one prefix: token t's hidden state predicts token t + 1. Padding sits
            # to the right of real tokens, so causal attention keeps it out of their states.
            cache = SharedPrefixCache(prefix, beams=n, max_new_tokens=L - 1)
            hid = model.hidden_states(ids[:, :-1], context=cache)             # (n, L-1, C)
            need = valid[:, 1:]                                             # rows whose logits we need
            rest = torch.zeros(n, L - 1, dtype=torch.float32, device=device)
            rest[need] = _target_logprob(model, hid[need], ids[:, 1:][need])
            logp[:, 1:] = rest
        for r, i in enumerate(chunk):
            out[i] = logp[r, :len(targets[i])].cpu()
    return out


def item_token_logprobs(model, builder, titles: Sequence[str], batch_size: int = 64,
                        shard=None, progress: bool = False) -> list[torch.Tensor]:
    """Eq. 3 for the target ids (quoted title + EOS) of each title, in the order given.

    Titles that tokenize identically (the same title under two item ids) are scored once.
    `shard` (a `nanogdrt.distributed.Dist`) splits the titles across data-parallel ranks and
    gathers the scores, so every rank returns the whole list."""
    targets = [tuple(builder.target_ids(t)) for t in titles]
    distinct = list(dict.fromkeys(targets))
    mine = shard.shard(distinct) if shard is not None else distinct
    scored = score_targets(model, masked_prompt_ids(builder), mine, batch_size, progress)
    if shard is not None:
        scored = shard.gather(scored, len(distinct))
    where = {t: k for k, t in enumerate(distinct)}
    return [scored[where[t]] for t in targets]


def item_relevance(token_logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 2: an item's relevance is the mean of its title tokens' Eq. 3 scores -> (n_items,)."""
    return torch.stack([lp.float().mean() for lp in token_logprobs]) if token_logprobs else torch.zeros(0)


def token_relevance(item_logprobs: Sequence[torch.Tensor], target_items: Sequence[int]) -> list[torch.Tensor]:
    """Per training example, the Eq. 3 scores of its target tokens: those of its target item
    (an index into item_logprobs). The prompt is history-free, so nothing else matters."""
    return [item_logprobs[i] for i in target_items]


# ----------------------------------------------------------------------------- disk cache

def model_fingerprint(model, samples: int = 4096) -> str:
    """Hash of the config plus, for every tensor of the state dict, its name, shape, dtype, a
    strided sample of its values and its float64 sum and sum of squares (so a change anywhere in
    a tensor, e.g. a merged LoRA delta, changes the fingerprint)."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].float().cpu().numpy()
        stats = torch.stack([flat.double().sum(), flat.double().square().sum()]).cpu().numpy()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(sample.tobytes())
        h.update(stats.tobytes())
    return h.hexdigest()


def relevance_cache_key(model_fingerprint: str, dataset: str, prompt_ids: Sequence[int],
                        titles: Sequence[str], target_ids: Sequence[Sequence[int]]) -> str:
    """Everything Eq. 3's numbers depend on: the scoring model, the dataset, the masked prompt's
    ids (template and tokenizer) and every item's title and target ids, in the caller's order."""
    payload = {"format": CACHE_FORMAT, "model": model_fingerprint, "dataset": dataset,
               "prompt": list(prompt_ids), "titles": list(titles),
               "targets": [list(t) for t in target_ids]}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def load_or_compute(model, builder, dataset: str, titles: Sequence[str], cache_dir,
                    batch_size: int = 64, shard=None, progress: bool = False) -> list[torch.Tensor]:
    """`item_token_logprobs`, read from `cache_dir` when an entry with the exact same key exists.

    With `shard` the scoring is split across ranks and only rank 0 writes the entry. The file (safetensors: flat log-probs + offsets, the key in its metadata) is named after the
    key and written atomically (temporary file + os.replace), so a stale or half-written entry
    is never read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    targets = [builder.target_ids(t) for t in titles]
    key = relevance_cache_key(model_fingerprint(model), dataset, masked_prompt_ids(builder), titles, targets)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"relevance-{dataset}-{key[:20]}.safetensors"
    lengths = [len(t) for t in targets]
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                stored_key = (f.metadata() or {}).get("key")
            if stored_key == key:
                data = load_file(str(path))
                offsets = data["offsets"].tolist()
                if np.diff(offsets).tolist() == lengths:
                    return list(torch.split(data["logprobs"], lengths))
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable entry: recompute and overwrite it
    logprobs = item_token_logprobs(model, builder, titles, batch_size, shard, progress)
    if shard is not None and not shard.main:
        return logprobs
    flat = torch.cat(logprobs) if logprobs else torch.zeros(0)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"logprobs": flat.float().contiguous(), "offsets": offsets}, tmp,
                  metadata={"key": key, "format": CACHE_FORMAT, "dataset": dataset, "n_items": str(len(titles))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return logprobs


# ----------------------------------------------------------------------------- grouping (§3.2)

def _kmeans_dp(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Exact weighted 1-D k-means of sorted distinct x (m >= k) -> cluster index 0..k-1 per value.

    D[c][j] = min SSE of x[0..j] in c+1 clusters = min_i D[c-1][i-1] + cost(i, j). The leftmost
    best split i*(j) is non-decreasing in j (the SSE cost is Monge), so each row is computed by
    divide and conquer: solve the middle j, then the left half searches only i <= i*(mid) and
    the right half i >= i*(mid). One numpy pass per recursion level: O(k m log m) in all."""
    m = len(x)
    x = x - np.average(x, weights=w)                   # centring keeps the prefix sums small
    P0, P1, P2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, w * x, w * x * x))

    def cost(i, j):                                    # SSE of x[i..j] (inclusive), vectorised
        n, s = P0[j + 1] - P0[i], P1[j + 1] - P1[i]
        return np.maximum(P2[j + 1] - P2[i] - s * s / n, 0.0)

    D_prev = cost(np.zeros(m, dtype=np.int64), np.arange(m))
    start = np.zeros((k, m), dtype=np.int64)           # start[c, j]: first index of cluster c
    for c in range(1, k):
        D = np.full(m, np.inf)
        # Pending (j range, split range) tasks; j >= c so every cluster is non-empty.
        jlo, jhi, olo, ohi = (np.array([v]) for v in (c, m - 1, c, m - 1))
        while jlo.size:
            mid = (jlo + jhi) // 2
            hi = np.minimum(ohi, mid)
            n = hi - olo + 1                                                 # candidates per task
            offs = np.concatenate([[0], np.cumsum(n)[:-1]])
            seg = np.repeat(np.arange(mid.size), n)
            i = olo[seg] + np.arange(n.sum()) - offs[seg]                    # all candidate splits
            val = D_prev[i - 1] + cost(i, mid[seg])
            best = np.minimum.reduceat(val, offs)
            opt = np.minimum.reduceat(np.where(val <= best[seg], i, m), offs)  # leftmost argmin
            D[mid], start[c, mid] = best, opt
            left, right = jlo < mid, mid < jhi
            jlo, jhi, olo, ohi = (np.concatenate([jlo[left], mid[right] + 1]),
                                  np.concatenate([mid[left] - 1, jhi[right]]),
                                  np.concatenate([olo[left], opt[right]]),
                                  np.concatenate([opt[left], ohi[right]]))
        D_prev = D
    bounds, j = [], m - 1                              # backtrack the cluster starts
    for c in range(k - 1, 0, -1):
        bounds.append(start[c, j])
        j = start[c, j] - 1
    return np.searchsorted(np.array(bounds[::-1]), np.arange(m), side="right")


def _kmeans_sklearn(x: np.ndarray, w: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn KMeans on the distinct values, weighted by multiplicity -> 0..k'-1 ascending."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x[:, None], sample_weight=w)
    used = np.unique(km.labels_)                       # a cluster may come out empty
    rank = np.empty(k, dtype=np.int64)
    rank[used[np.argsort(km.cluster_centers_[used, 0])]] = np.arange(used.size)
    return rank[km.labels_]


def group_values(values, n_groups: int, method: str = "kmeans", backend: str = "auto",
                 seed: int = 0) -> np.ndarray:
    """Split 1-D values (e.g. Eq. 3 token relevance) into groups 1..G, group 1 = highest values.

    method "kmeans": 1-D k-means; backend "sklearn" (KMeans, n_init=10, random_state=seed),
      "dp" (exact optimum, no dependency) or "auto" (sklearn if importable, else dp).
      With m < G distinct values each value is its own group: ids 1..m, groups m+1..G empty.
    method "quantile": equal-size groups by rank (footnote 2); a run of ties would straddle a
      boundary stays whole in the higher group, so sizes are equal up to ties and a group can
      be empty when ties are long.
    Always: equal values share a group; empty input -> empty array; non-finite values raise.
    Returns an int64 numpy array shaped like `values`.
    """
    v = np.asarray(values, dtype=np.float64)
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if v.size and not np.isfinite(v).all():
        raise ValueError("values contain NaN or infinity")
    if v.size == 0:
        return np.zeros(v.shape, dtype=np.int64)
    u, inverse, counts = np.unique(v.reshape(-1), return_inverse=True, return_counts=True)
    m = u.size
    if backend not in ("auto", "sklearn", "dp"):
        raise ValueError(f"unknown backend {backend!r} (auto, sklearn, dp)")
    if method == "quantile":
        greater = v.size - np.cumsum(counts)          # how many values lie above each distinct value
        group_of_unique = greater * n_groups // v.size + 1
    elif method == "kmeans":
        k = min(n_groups, m)
        if k == m:
            cluster = np.arange(m)                     # every distinct value is its own cluster
        elif backend == "auto":
            try:
                cluster = _kmeans_sklearn(u, counts, k, seed)
            except ImportError:
                cluster = _kmeans_dp(u, counts.astype(np.float64), k)
        elif backend == "sklearn":
            cluster = _kmeans_sklearn(u, counts, k, seed)
        else:
            cluster = _kmeans_dp(u, counts.astype(np.float64), k)
        group_of_unique = cluster.max() - cluster + 1  # ascending clusters -> group 1 = highest
    else:
        raise ValueError(f"unknown method {method!r} (kmeans, quantile)")
    return group_of_unique[inverse].reshape(v.shape).astype(np.int64)


def token_groups(token_values: Sequence[torch.Tensor], n_groups: int, **kwargs) -> list[torch.Tensor]:
    """Group the target tokens of all training examples together (every occurrence counts) and
    return one LongTensor of group ids per example, aligned with its target tokens."""
    lengths = [len(t) for t in token_values]
    flat = np.concatenate([t.float().numpy() for t in token_values]) if token_values else np.zeros(0)
    groups = torch.from_numpy(group_values(flat, n_groups, **kwargs))
    return list(torch.split(groups, lengths))
