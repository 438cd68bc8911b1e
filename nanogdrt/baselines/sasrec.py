"""SASRec (Kang & McAuley, ICDM 2018) and SASRec++: the traditional sequential baselines of Table 2.

A small causal Transformer over item ids, following the widely used PyTorch port
pmixer/SASRec.pytorch (model.py, main.py, utils.py):

    x = item_emb(s) * sqrt(C) + pos_emb(t); dropout; zero the padding rows     (timeline mask)
    per block:  q = LN(x);  x = q + Attn(q, x, x)                              (LN on the query only)
                x = LN(x);  x = x + FFN(x);  zero the padding rows             (FFN = two 1x1 convs)
    h = LN(x);  score(item i after prefix s_1..s_t) = <h_t, item_emb(i)>       (shared embeddings)

Losses, both per position (every prefix of a sequence predicts its next item), padding ignored:
    SASRec    BCE on one positive and one uniformly sampled negative item per position:
              mean_t -log sigma(r_pos) + mean_t -log(1 - sigma(r_neg))       (pmixer's two means)
    SASRec++  full softmax cross-entropy over the whole catalogue: mean_t logsumexp_i r_i - r_pos,
              the fix of Klenitskiy & Vasilev (RecSys 2023) and Xu et al. (2024, "Are LLM-based
              recommenders already the best?"), who show that BCE with one negative underrates SASRec.
    DROS      SASRec's BCE + alpha * mean_t log sum_i exp(w_i (r_i - y_i)^2 / beta) over the whole
              catalogue, w from the training targets' counts (Yang et al., SIGIR 2023; dros.py).

Deliberate differences from pmixer (none changes the model's capacity):
* Padding keys are masked in attention (pmixer attends to the zeroed padding rows, whose keys and
  values are the projection biases), so a history's scores do not depend on how much padding a
  batch adds; every row still attends to itself, so an all-padding row never sees an empty softmax.
* Positions count back from the last item fed, so a batch is padded to its own longest sequence
  instead of always to maxlen. pmixer left-pads to maxlen, so its last item always sits in the
  last slot too: the two position tables are the same up to relabelling. As in pmixer, training
  feeds a whole window, so the prefix s_1..s_t is scored with the positions it has in the window,
  not with those it would have if fed alone (then its s_t would take position 0).
* The 1x1 Conv1d layers are nn.Linear (the same map per position); dropout before or after the
  ReLU is the same function.
* maxlen = 10 (the windows hold at most 10 history items) instead of 50/200; dropout 0.2 (the
  value of pmixer's README runs and newer main.py; its older main.py default is 0.5).
* Negatives avoid the items of the training window (pmixer: of the user's whole training
  sequence, which a window-based split does not give).
* Epochs end by validation NDCG@10 with patience (pmixer trains a fixed number of epochs).

    python -m nanogdrt.baselines.sasrec --dataset toy --data-dir ../shared/data/toy --loss ce --out runs/toy-sasrec
    python -m nanogdrt.baselines.sasrec ... --loss dros --dros-alpha 0.1 --dros-beta 1 --out runs/toy-dros
"""

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogdrt import files, metrics
from nanogdrt.baselines import dros
from nanogdrt.infra import validate

WEIGHTS, CONFIG = "model.safetensors", "config.json"
LOSSES = {"bce": "SASRec", "ce": "SASRec++", "dros": "DROS"}     # --loss -> the row of Table 2


@dataclass
class SASRecConfig:
    n_items: int            # catalogue size: columns of score_items
    hidden: int = 50        # pmixer's hidden_units
    n_blocks: int = 2
    n_heads: int = 1
    maxlen: int = 10        # longest history read (older items are dropped)
    dropout: float = 0.2


# ----------------------------------------------------------------------------- the network

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, query, x, allowed):
        """query, x: (B, T, C); allowed: (B, T, T) bool, True where row i may attend to column j."""
        B, T, C = x.shape
        H = self.n_heads
        q, k, v = (proj(inp).view(B, T, H, C // H).transpose(1, 2)        # (B, H, T, C/H)
                   for proj, inp in ((self.q_proj, query), (self.k_proj, x), (self.v_proj, x)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))          # (B, T, C)


class PointWiseFeedForward(nn.Module):
    """pmixer's two kernel-size-1 Conv1d layers, i.e. one Linear per position, with ReLU."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.hidden, cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(F.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.ffn = PointWiseFeedForward(cfg)

    def forward(self, x, allowed, keep):
        q = self.attn_norm(x)              # as pmixer: only the query is normalised, and the
        x = q + self.attn(q, x, allowed)   # residual adds the normalised query
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x * keep                    # timeline mask: padding rows stay zero


class SASRec(nn.Module):
    """Scores over a catalogue whose item ids are `item_ids`; index 0 of the embeddings is padding."""

    def __init__(self, cfg: SASRecConfig, item_ids):
        super().__init__()
        if len(item_ids) != cfg.n_items or len(set(item_ids)) != cfg.n_items or min(item_ids) < 0:
            raise ValueError(f"item_ids must be {cfg.n_items} distinct non-negative ids")
        self.cfg = cfg
        ids = torch.tensor(sorted(item_ids), dtype=torch.long)
        self.register_buffer("item_ids", ids)                          # (N,) column j <-> item id
        index = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        index[ids] = torch.arange(1, cfg.n_items + 1)                   # item id -> embedding row
        self.register_buffer("id_to_index", index, persistent=False)
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.maxlen, cfg.hidden)             # row 0 = the most recent
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.last_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        for p in self.parameters():        # pmixer: Xavier-normal for every matrix, defaults else
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def index(self, histories, maxlen=None) -> torch.Tensor:
        """Item-id lists -> (B, T) embedding rows, left-padded with 0, the last `maxlen` items kept."""
        rows = [list(h)[-(maxlen or self.cfg.maxlen):] for h in histories]
        T = max(1, max(len(r) for r in rows))
        ids = torch.tensor([[-1] * (T - len(r)) + r for r in rows], device=self.id_to_index.device)
        table, real = self.id_to_index, ids >= 0                                  # -1 marks padding
        rows = torch.where(real, table[ids.clamp(0, len(table) - 1)], 0)
        if bool((ids < -1).any() | (ids >= len(table)).any() | (real & (rows < 0)).any()):
            raise ValueError("a history holds an item id outside the model's catalogue")
        return rows

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (B, T) embedding rows, 0 = padding (left). Returns hidden states (B, T, C)."""
        B, T = seq.shape
        keep = (seq != 0).unsqueeze(-1)                                 # (B, T, 1)
        pos = torch.arange(T - 1, -1, -1, device=seq.device)            # (T,) distance from the end
        x = self.item_emb(seq) * self.cfg.hidden ** 0.5 + self.pos_emb(pos)
        x = self.emb_dropout(x) * keep
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)
        allowed = causal & (keep.transpose(1, 2) | eye)                 # (B, T, T): no padding keys
        for block in self.blocks:
            x = block(x, allowed, keep)
        return self.last_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., C) -> (..., N) scores of every catalogue item (padding row left out)."""
        return h @ self.item_emb.weight[1:].T

    @torch.no_grad()
    def score_items(self, histories) -> torch.Tensor:
        """(B, N) scores of every item after each history; column j is item `self.item_ids[j]`
        (for ids 1..N, as in the Amazon folders, column j is item j + 1)."""
        was_training = self.training
        self.eval()
        out = self.logits(self(self.index(histories))[:, -1])
        self.train(was_training)
        return out


# ----------------------------------------------------------------------------- losses (pure)

def bce_loss(pos_logits, neg_logits, mask) -> torch.Tensor:
    """SASRec: (B, T) logits of the positive and the sampled negative, mask (B, T) of real positions.
    pmixer adds BCEWithLogits(pos, 1) and BCEWithLogits(neg, 0), each a mean over real positions."""
    pos, neg = pos_logits[mask].float(), neg_logits[mask].float()
    return -F.logsigmoid(pos).mean() - F.logsigmoid(-neg).mean()   # log(1 - sigma(r)) = logsigma(-r)


def ce_loss(logits, targets) -> torch.Tensor:
    """SASRec++: logits (M, N) over the catalogue at the M real positions, targets (M,) columns."""
    logits = logits.float()
    return (torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).mean()


def sample_negatives(positives, windows, n_items, generator) -> torch.Tensor:
    """(B, T) uniform embedding rows in 1..N, none in its window's items (padding gets 0)."""
    neg = torch.randint(1, n_items + 1, positives.shape, generator=generator)
    for b, items in enumerate(windows):
        for t in range(positives.shape[1]):
            while positives[b, t] and int(neg[b, t]) in items:
                neg[b, t] = torch.randint(1, n_items + 1, (1,), generator=generator)
    return neg * (positives != 0)


def sequence_loss(model: SASRec, rows, loss: str, generator, robust: dros.Robust | None = None) -> torch.Tensor:
    """Per-position loss of a batch of (history, target) windows: input s_1..s_n predicts s_2..target.
    loss "dros" is "bce" plus robust.alpha times DROS's term over the whole catalogue (dros.py)."""
    if loss == "dros" and robust is None:
        raise ValueError("loss 'dros' needs its term's settings (dros.robust)")
    seqs = model.index([h + [t] for h, t in rows], model.cfg.maxlen + 1).cpu()  # (B, T+1), target last
    inp, pos = seqs[:, :-1], seqs[:, 1:]                            # (B, T) inputs and next items
    mask = (inp != 0) & (pos != 0)                                  # positions that have a next item
    dev = model.item_ids.device
    h = model(inp.to(dev))                                          # (B, T, C)
    mask, pos = mask.to(dev), pos.to(dev)
    if loss == "ce":
        return ce_loss(model.logits(h[mask]), pos[mask] - 1)        # rows 1..N -> columns 0..N-1
    neg = sample_negatives(pos.cpu(), [set(r.tolist()) for r in seqs], model.cfg.n_items, generator)
    emb = model.item_emb
    value = bce_loss((h * emb(pos)).sum(-1), (h * emb(neg.to(dev))).sum(-1), mask)
    if loss == "dros" and robust.alpha != 0:        # alpha = 0 is the base loss exactly, as in DROS's code
        value = value + robust.alpha * dros.robust_term(model.logits(h[mask]), pos[mask] - 1,
                                                        robust.weights, robust.beta)
    return value


# ----------------------------------------------------------------------------- ranking and training

def recommend(model: SASRec, interactions, top_k=10, batch_size=256) -> list[dict]:
    """Full-catalogue ranking (history items included, as the LLM's beam search over all titles):
    one record per interaction, in the shape of nanogdrt.recommend's."""
    records = []
    for i in range(0, len(interactions), batch_size):
        chunk = interactions[i:i + batch_size]
        scores, cols = model.score_items([x.history for x in chunk]).topk(top_k, dim=-1)
        ids = model.item_ids[cols].tolist()
        records += [{"row": x.row, "target_item_id": x.target, "topk_item_ids": r, "scores": s}
                    for x, r, s in zip(chunk, ids, scores.tolist())]
    return records


def score(records, interactions, titles, item_group=None) -> dict:
    """NDCG/HR@5,10 (and MGU/DGU@5,10 with item groups), matching titles as the LLM evaluation does."""
    return metrics.evaluate([r["topk_item_ids"] for r in records], [x.target for x in interactions],
                            [x.history for x in interactions], item_group=item_group, titles=titles)


def evaluate(model, interactions, titles, item_group=None) -> dict:
    return score(recommend(model, interactions), interactions, titles, item_group)


def train(model: SASRec, train_rows, valid_rows, titles, loss="ce", epochs=200, patience=20,
          lr=1e-3, batch_size=128, seed=0, metric="NDCG@10", progress=False, robust=None) -> dict:
    """Adam(betas 0.9, 0.98) as pmixer; after each epoch score the validation split and keep the
    best state by `metric`; stop after `patience` epochs without improvement. Test is never read.
    loss "dros" needs `robust` (dros.robust(training targets, model.item_ids, alpha, beta))."""
    from tqdm import tqdm

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if loss == "dros" and robust is None:
        raise ValueError("loss 'dros' needs robust=dros.robust(...) (the term's weights, alpha, beta)")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = [(x.history, x.target) for x in train_rows]
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    best = {"epoch": 0, metric: -1.0, "state": None, "valid": {}, "history": []}
    bar = tqdm(range(1, epochs + 1), desc=f"sasrec-{loss}", disable=not progress)
    for epoch in bar:
        model.train()
        rng.shuffle(rows)
        total = 0.0
        for i in range(0, len(rows), batch_size):
            value = sequence_loss(model, rows[i:i + batch_size], loss, gen, robust)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.item()
        valid = evaluate(model, valid_rows, titles)
        best["history"].append({"epoch": epoch, "loss": total / math.ceil(len(rows) / batch_size), **valid})
        if valid[metric] > best[metric]:
            best.update({"epoch": epoch, metric: valid[metric], "valid": valid,
                         "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        bar.set_postfix(loss=f"{best['history'][-1]['loss']:.4f}", valid=f"{valid[metric]:.4f}",
                        best=f"{best[metric]:.4f}@{best['epoch']}")
        if epoch - best["epoch"] >= patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best.pop("state"))
    model.eval()
    return best


# ----------------------------------------------------------------------------- save / load

def save(model: SASRec, folder):
    """model.safetensors (weights + the item-id table) and config.json, each written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with files.atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, tmp)
    files.write_json(folder / CONFIG, asdict(model.cfg), indent=2)


def load(folder, device="cpu") -> SASRec:
    """The model saved by `save`, in eval mode (safetensors + JSON, never pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = SASRecConfig(**json.loads((folder / CONFIG).read_text()))  # unknown fields fail loudly
    state = load_file(str(folder / WEIGHTS))
    model = SASRec(cfg, state["item_ids"].tolist())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- CLI

def _versions() -> dict:
    import subprocess

    import numpy
    import safetensors
    try:  # the code's commit, when run from a git checkout
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "nanogdrt_commit": commit}


def _parser() -> argparse.ArgumentParser:
    N = validate.number
    p = argparse.ArgumentParser(prog="python -m nanogdrt.baselines.sasrec",
                                description="Train SASRec (--loss bce), SASRec++ (--loss ce) or DROS (--loss dros) "
                                            "on a dataset's training windows, choose the epoch on validation NDCG, "
                                            "rank the full catalogue for every test user.")
    p.add_argument("--dataset", default="synthetic", help="toy | clothing | book | synthetic")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    p.add_argument("--train-file", default=None,
                   help="training CSV in the folder (default: train.csv, else the largest train*.csv)")
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"],
                   help="synthetic only: full (2,000 items) or small (120 items), as train.py's")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop malformed rows and items with blank titles, counted in results.json (as train.py's)")
    p.add_argument("--loss", default="ce", choices=list(LOSSES),
                   help="bce: SASRec; ce: SASRec++ (full softmax); dros: SASRec's bce + DROS's robust term")
    p.add_argument("--dros-alpha", type=N(float, min=0), default=None,
                   help=f"--loss dros only: weight of the robust term (default {dros.ALPHA}; 0 = --loss bce "
                        "exactly; DROS's code defaults to 0, i.e. off)")
    p.add_argument("--dros-beta", type=N(float, above=0), default=None,
                   help=f"--loss dros only: the term's temperature, DROS's robust radius (default {dros.BETA}, "
                        "the code's)")
    p.add_argument("--out", required=True, help="output folder: model, config, test records, results.json")
    p.add_argument("--hidden", type=N(int, min=1), default=50)
    p.add_argument("--blocks", type=N(int, min=1), default=2)
    p.add_argument("--heads", type=N(int, min=1), default=1)
    p.add_argument("--maxlen", type=N(int, min=1), default=10, help="history items read (the windows hold at most 10)")
    p.add_argument("--dropout", type=N(float, min=0, below=1), default=0.2)
    p.add_argument("--lr", type=N(float, above=0), default=1e-3)
    p.add_argument("--batch-size", type=N(int, min=1), default=128, help="training windows per step")
    p.add_argument("--epochs", type=N(int, min=1), default=200, help="most epochs")
    p.add_argument("--patience", type=N(int, min=1), default=20,
                   help="stop after this many epochs without a better validation score")
    p.add_argument("--metric", default="NDCG@10", choices=["NDCG@10", "NDCG@5"],
                   help="validation metric that picks the best epoch")
    p.add_argument("--valid-samples", type=N(int, min=1), default=None, help="validate on a seeded sample of users")
    p.add_argument("--test-samples", type=N(int, min=1), default=None, help="test on a seeded sample of users")
    p.add_argument("--item-groups", default=None, help="JSON {item id: group 1..5} (Eq. 2) to add MGU/DGU@K")
    p.add_argument("--seed", type=N(int, min=0), default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    return p


def main(argv=None):
    from nanogdrt import synthetic
    from nanogdrt.data import load_dataset

    p = _parser()
    args = p.parse_args(argv)                     # every range checked here, before any work
    if args.loss != "dros" and (args.dros_alpha is not None or args.dros_beta is not None):
        p.error("--dros-alpha and --dros-beta apply to --loss dros only")
    if args.loss == "dros":                       # resolved here, so results.json records the values used
        args.dros_alpha = dros.ALPHA if args.dros_alpha is None else args.dros_alpha
        args.dros_beta = dros.BETA if args.dros_beta is None else args.dros_beta
    validate.check_output(p, args.out, "folder")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, train_file=args.train_file,
                      valid_samples=args.valid_samples, test_samples=args.test_samples, seed=args.seed,
                      synthetic=synthetic.config_for(args.dataset, args.synthetic_size), skip_bad=args.skip_bad)
    item_group = ({int(k): int(v) for k, v in json.loads(Path(args.item_groups).read_text()).items()}
                  if args.item_groups else None)
    cfg = SASRecConfig(len(ds.titles), args.hidden, args.blocks, args.heads, args.maxlen, args.dropout)
    model = SASRec(cfg, list(ds.titles)).to(args.device)
    robust = (dros.robust([x.target for x in ds.train], model.item_ids, args.dros_alpha, args.dros_beta)
              if args.loss == "dros" else None)       # weights from the training targets' counts
    best = train(model, ds.train, ds.valid, ds.titles, args.loss, args.epochs, args.patience, args.lr,
                 args.batch_size, args.seed, args.metric, progress=True, robust=robust)
    records = recommend(model, ds.test)
    test = score(records, ds.test, ds.titles, item_group)
    out = Path(args.out)
    save(model, out)
    files.write_jsonl(out / "test_records.jsonl", records)
    results = {"model": LOSSES[args.loss], "config": vars(args),
               "model_config": asdict(cfg), "dataset": {"name": ds.name, "source": ds.source,
               "train": len(ds.train), "valid": len(ds.valid), "test": len(ds.test), "items": len(ds.titles),
               "skipped": ds.skipped},
               "best_epoch": best["epoch"], "epochs_run": len(best["history"]), "valid": best["valid"],
               "metrics": test, "history": best["history"], "wall_time_s": time.perf_counter() - start,
               "versions": _versions(), "command": " ".join(sys.argv)}
    if robust is not None:
        results["dros"] = {"alpha": robust.alpha, "beta": robust.beta, "power": dros.POWER,
                           "weights": "((c + 1) / sum(c + 1)) ** power, c = training-target counts"}
    files.write_json(out / "results.json", results, indent=2)
    print(f"{results['model']} on {ds.name}: best epoch {best['epoch']} (valid {args.metric} "
          f"{best['valid'].get(args.metric, 0):.4f}), test on {len(ds.test)} users -> {out}")
    print("  ".join(f"{k} {v:.4f}" for k, v in test.items()))


if __name__ == "__main__":
    main()
