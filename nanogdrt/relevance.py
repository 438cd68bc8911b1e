"""Relevance to the auxiliary tokens: Eq. 3 per target token, Eq. 2 per item, and their disk cache.

Eq. 3 scores each target token by how predictable it is from the task description alone:

    r(y_t) = log P(y_t | x with its history replaced by "N/A", y_<t)

and Eq. 2 scores an item by the mean of r over its title tokens. High r = the model would
produce the token without looking at the user: the context bias GDRT counteracts. The split of
these scores into groups is `nanogdrt.grouping`'s job; this module only scores.

Which tokens, and which model (the paper leaves both open):
- Eq. 3 is scored for every target token: the quotes around the title and EOS are trained like
  the title's words, so GDRT's token grouping needs their relevance too.
- Eq. 2 averages over the title's own tokens only. The opening quote scores the same for every
  item (about -6 nats under the embedded SmolLM2), so averaging it in would shift short titles
  more than long ones: with quotes and EOS in the mean, 16% of the synthetic catalogue's items
  land in another group (tools/eq2_title_tokens.py counts them).
  "The title's own tokens" under the joint tokenization: a token is a title token when it holds
  any character of the title, by the character offsets of '"title"'. A token that fuses a quote
  with title characters (Llama 3's '"The', the '!"' after a title ending in "!") counts as a
  title token; a token of quote characters only, and EOS, does not. Every non-empty title has at
  least one title token. `title_token_mask` computes the mask from the builder (the disk cache
  keeps the per-token scores of every target token, so it needs no mask).
- Both are scored by the base model, once, before fine-tuning (train.py's default; the item
  groups of MGU/DGU always come from it). `--regroup-every-epoch` re-scores Eq. 3 under the
  model being trained at the start of each later epoch and regroups the tokens.

Speed. With the history masked the prompt is the same for every example of a dataset, so r
depends on the target item only: we score each distinct title once, not each training row.
The masked prompt is prefilled once into a KV cache; the titles are then run as "beams" of that
one prefix through a `SharedPrefixCache` (no copies of the prompt's keys), a batch at a time.

Cache. Scoring a whole catalogue (11,758 Toy titles) takes minutes on a CPU, and every run on the
same data and base model needs the same numbers: `load_or_compute` keeps them on disk, keyed by
everything they depend on, under `cache_dir()` ($NANOGDRT_CACHE, else checkpoints/.relevance-cache).
"""

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from nanogdrt import grouping
from nanogdrt.files import atomic_path
from nanogdrt.kv_cache import SharedPrefixCache

CACHE_FORMAT = "nanogdrt-relevance-v1"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "checkpoints" / ".relevance-cache"


def cache_dir() -> Path:
    """Where relevance scores are cached: $NANOGDRT_CACHE, read at each call (so a test or a
    notebook can point it elsewhere at any time), else checkpoints/.relevance-cache."""
    return Path(os.environ.get("NANOGDRT_CACHE", DEFAULT_CACHE))


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
    `shard` (a `nanogdrt.infra.distributed.Dist`) splits the titles across data-parallel ranks and
    gathers the scores, so every rank returns the whole list."""
    targets = [tuple(builder.target_ids(t)) for t in titles]
    distinct = list(dict.fromkeys(targets))
    mine = shard.shard(distinct) if shard is not None else distinct
    scored = score_targets(model, masked_prompt_ids(builder), mine, batch_size, progress)
    if shard is not None:
        scored = shard.gather(scored, len(distinct))
    where = {t: k for k, t in enumerate(distinct)}
    return [scored[where[t]] for t in targets]


def title_token_mask(builder, title: str) -> torch.Tensor:
    """Which of `builder.target_ids(title)` are the title's own tokens (Eq. 2) -> bool (n_tokens,).

    Token k of '"title"' spans the characters from its start to the next token's start (at least
    one character: byte-level pieces of one character share its start). It is a title token when
    that span meets the title's characters [1, 1 + len(title)); the appended EOS never is."""
    if not title:
        raise ValueError("an empty title has no title tokens (Eq. 2 is undefined for it)")
    text = f'"{title}"'
    ids, starts = builder.tokenizer.encode_with_offsets(text)
    if ids + [builder.tokenizer.eos_id] != builder.target_ids(title):
        raise ValueError(f"title {title!r}: its tokens with offsets differ from target_ids")
    ends = starts[1:] + [len(text)]
    first, stop = 1, 1 + len(title)                     # the title's characters, quotes excluded
    mask = [s < stop and max(e, s + 1) > first for s, e in zip(starts, ends)]
    return torch.tensor(mask + [False])                 # EOS: a format token


def title_token_masks(builder, titles: Sequence[str]) -> list[torch.Tensor]:
    """`title_token_mask` of each title, in the order given."""
    return [title_token_mask(builder, t) for t in titles]


def item_relevance(token_logprobs: Sequence[torch.Tensor], title_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 2: an item's relevance is the mean of its title tokens' Eq. 3 scores -> (n_items,).

    `title_masks[i]` marks the title's own tokens among item i's target tokens (quotes and EOS
    excluded, see `title_token_mask`)."""
    if len(token_logprobs) != len(title_masks):
        raise ValueError(f"{len(token_logprobs)} items' log-probs but {len(title_masks)} title masks")
    means = []
    for lp, mask in zip(token_logprobs, title_masks):
        if mask.shape != lp.shape or not mask.any():
            raise ValueError(f"title mask {mask.tolist()} does not fit log-probs of shape {tuple(lp.shape)}")
        means.append(lp.float()[mask].mean())
    return torch.stack(means) if means else torch.zeros(0)


def token_relevance(item_logprobs: Sequence[torch.Tensor], target_items: Sequence[int]) -> list[torch.Tensor]:
    """Per training example, the Eq. 3 scores of its target tokens: those of its target item
    (an index into item_logprobs). The prompt is history-free, so nothing else matters.
    All target tokens, quotes and EOS included: they are trained, so they need a group."""
    return [item_logprobs[i] for i in target_items]


class CatalogueLogprobs(dict):
    """{item id: Eq. 3 log-probs of its target tokens, (n_tokens,)}, as `catalogue_logprobs`
    returns it, with `title_mask`: {item id: which of those are title tokens}, for Eq. 2."""

    def __init__(self, logprobs: dict, title_mask: dict):
        super().__init__(logprobs)
        self.title_mask = title_mask


def item_scores(logprobs: dict, title_mask: dict | None = None) -> dict:
    """Eq. 2 of every item of {item id: its Eq. 3 token scores} -> {item id: relevance}.

    The title masks come from `title_mask` ({item id: bool mask}), else from `logprobs` itself
    when it is a `CatalogueLogprobs`."""
    masks = title_mask if title_mask is not None else getattr(logprobs, "title_mask", None)
    if masks is None:
        raise TypeError("item_scores needs each item's title-token mask (Eq. 2 averages over the title's "
                        "own tokens): pass title_mask, or the CatalogueLogprobs of catalogue_logprobs")
    return dict(zip(logprobs, item_relevance(list(logprobs.values()), [masks[i] for i in logprobs]).tolist()))


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


def load_or_compute(model, builder, dataset: str, titles: Sequence[str], folder,
                    batch_size: int = 64, shard=None, progress: bool = False) -> list[torch.Tensor]:
    """`item_token_logprobs`, read from `folder` when an entry with the exact same key exists.

    With `shard` the scoring is split across ranks and only rank 0 writes the entry. The file
    (safetensors: flat log-probs + offsets, the key in its metadata) is named after the key and
    written atomically, so a stale or half-written entry is never read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    targets = [builder.target_ids(t) for t in titles]
    key = relevance_cache_key(model_fingerprint(model), dataset, masked_prompt_ids(builder), titles, targets)
    path = Path(folder) / f"relevance-{dataset}-{key[:20]}.safetensors"
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
    try:
        with atomic_path(path) as tmp:
            save_file({"logprobs": flat.float().contiguous(), "offsets": offsets}, tmp,
                      metadata={"key": key, "format": CACHE_FORMAT, "dataset": dataset, "n_items": str(len(titles))})
    except OSError as e:   # a read-only or full cache costs the next run a re-scoring, not this run its work
        print(f"warning: relevance cache not written ({path}: {e.strerror or e}); the run goes on")
    return logprobs


def catalogue_logprobs(model, builder, dataset, cached: bool = True, shard=None, progress: bool = True) -> dict:
    """Eq. 3 token log-probs of every catalogue title under `model` -> {item id: (n_tokens,)}, a
    `CatalogueLogprobs` that also holds each title's Eq. 2 token mask (`item_scores` reads it).

    `cached`: read from / written to `cache_dir()` (keyed by model, dataset and titles); off when
    the model changes during training (--regroup-every-epoch), as no later run could reuse it.
    `shard` (a `nanogdrt.infra.distributed.Dist`) splits the work across data-parallel ranks."""
    items = sorted(dataset.titles)
    titles = [dataset.titles[i] for i in items]
    progress = progress and (shard is None or shard.main)
    logprobs = (load_or_compute(model, builder, dataset.name, titles, cache_dir(), shard=shard, progress=progress)
                if cached else item_token_logprobs(model, builder, titles, shard=shard, progress=progress))
    return CatalogueLogprobs(dict(zip(items, logprobs)), dict(zip(items, title_token_masks(builder, titles))))


# ----------------------------------------------------------------------------- scores -> groups

class DatasetGroups(NamedTuple):
    """What §3.2 and the metrics take from the relevance scores of a dataset under one model."""
    token_groups: list[torch.Tensor]     # per training example: (n_targets,) token group 1..G (Eq. 3 + k-means)
    item_group: dict[int, int]           # item id -> item group 1..5 of MGU/DGU (Eq. 2)
    token_relevance: list[torch.Tensor]  # per training example: (n_targets,) Eq. 3 relevance


def dataset_groups(model, builder, dataset, n_groups: int, method: str = "kmeans", seed: int = 0,
                   cached: bool = True, shard=None, progress: bool = True) -> DatasetGroups:
    """Eq. 2/3 under `model`, then the groups: the one way every entry point builds them.
    With the history masked, Eq. 3 depends on the target item only: a lookup per example."""
    logprobs = catalogue_logprobs(model, builder, dataset, cached=cached, shard=shard, progress=progress)
    token_rel = token_relevance(logprobs, [x.target for x in dataset.train])
    token_groups = grouping.token_groups(token_rel, n_groups, method=method, seed=seed)
    return DatasetGroups(token_groups, grouping.item_groups(item_scores(logprobs)), token_rel)


def dataset_item_groups(model, builder, dataset, cached: bool = True, shard=None,
                        progress: bool = True) -> dict[int, int]:
    """The item groups of MGU/DGU only (Eq. 2), for evaluations that train nothing."""
    logprobs = catalogue_logprobs(model, builder, dataset, cached=cached, shard=shard, progress=progress)
    return grouping.item_groups(item_scores(logprobs))
