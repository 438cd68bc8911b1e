"""Fine-tune an LLM recommender with SFT (Eq. 1) or GDRT (Eq. 5); choose on validation; test.

    python train.py                                   # offline: synthetic data, embedded SmolLM2-135M
    python train.py --dataset toy --method gdrt       # the paper's Amazon Toys split
    python train.py --dataset toy --method sft --out runs/toy-sft

The script follows §3 of the paper, top to bottom:
  1. prompts: the history titles -> prompt ids; the target title -> the ids to generate
  2. Eq. 3: every target token's relevance to the auxiliary tokens, with the history -> "N/A";
     Eq. 2: every item's relevance (mean over its tokens), for the fairness groups of the metrics
  3. §3.2: 1-D k-means over the target tokens' relevance -> G token groups
  4. LoRA fine-tuning; each step weights the group losses L(g) by Q = softmax(L(g) / tau) (Eq. 5)
  5. each epoch: NDCG@5 on validation by constrained beam search; the best adapter is kept
  6. the best adapter is tested: NDCG/HR@5,10, MGU/DGU@5,10, top-1 item-group distribution
Everything lands in <out>/: results.json, best_adapter/ (PEFT format), PNG figures, and state/
(the last checkpoint: `--resume` continues an interrupted run and ends where it would have).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import nanogdrt
from nanogdrt import distributed, grouping, metrics, plots
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter
from nanogdrt.loss import gdrt_loss, group_sums_and_counts, sft_loss, token_nll
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import (RELEVANCE_CACHE, build_trie, catalogue_logprobs, item_groups, recommend, score,
                                write_jsonl)
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.train_state import load_state, save_state


@dataclass
class RunConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    train_file: str | None = None
    method: str = "gdrt"
    model: str | None = None
    train_samples: int | None = None
    valid_users: int | None = None
    test_users: int | None = None
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    clip: float = 1.0
    groups: int = 5
    tau: float = 0.5
    grouping: str = "kmeans"
    regroup_every_epoch: bool = False
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    beams: int = 10
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    out: str | None = None
    resume: bool = False
    save_every: int = 50
    max_steps: int | None = None
    skip_bad: bool = False
    no_test: bool = False
    group_by_length: bool = True


# Paper-like defaults scaled to 2 CPU cores, per dataset (a flag on the command line wins).
DATASET_DEFAULTS = {
    "synthetic": dict(train_samples=128, valid_users=32, test_users=128, epochs=2),
    "toy": dict(train_file="train_1000.csv", train_samples=1000, valid_users=100, test_users=500, epochs=2),
}


def parse_args(argv=None) -> RunConfig:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default=d.dataset, help="toy | clothing | book | synthetic (embedded, offline)")
    a("--data-dir", default=None, help="dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    a("--train-file", default=None, help="which train*.csv of the folder (toy: train_1000.csv)")
    a("--method", default=d.method, choices=["sft", "gdrt"], help="SFT (Eq. 1) or GDRT (Eq. 5)")
    a("--model", default=None, help="Hugging Face Llama folder (default: embedded SmolLM2-135M-Instruct)")
    a("--train-samples", type=int, default=None, help="seeded sample of training windows (paper: 10,000)")
    a("--valid-users", type=int, default=None, help="seeded sample of validation users per epoch")
    a("--test-users", type=int, default=None, help="seeded sample of test users (default per dataset)")
    a("--epochs", type=int, default=None, help="training epochs (paper: 5)")
    a("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate of the LoRA parameters")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    a("--clip", type=float, default=d.clip, help="gradient-norm clip")
    a("--groups", type=int, default=d.groups, help="G token groups (paper grid: 2, 5, 10)")
    a("--tau", type=float, default=d.tau, help="Group-DRO temperature (paper grid: 0.1 .. 1.0)")
    a("--grouping", default=d.grouping, choices=["kmeans", "quantile"], help="how tokens are split by relevance")
    a("--regroup-every-epoch", action="store_true", help="re-score relevance with the current model each epoch")
    a("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    a("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (scale alpha/r)")
    a("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA path")
    a("--lora-targets", nargs="+", default=d.lora_targets, help="module names that get LoRA")
    a("--beams", type=int, default=d.beams, help="beam width of constrained beam search (paper: 10)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size, help="users decoded at once (slots refilled as users finish)")
    a("--seed", type=int, default=d.seed, help="seed of sampling, batching, LoRA init and dropout")
    a("--device", default=d.device, help="cpu | cuda | mps")
    a("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"], help="model dtype")
    a("--out", default=None, help="run folder (default: runs/<dataset>-<method>)")
    a("--resume", action="store_true", help="continue from <out>/state")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N optimizer steps")
    a("--max-steps", type=int, default=None, help="stop after N optimizer steps in all (then --resume)")
    a("--skip-bad", action="store_true", help="skip malformed data rows (counted in results.json)")
    a("--no-group-by-length", dest="group_by_length", action="store_false",
      help="batch examples in plain random order (default: random pools of batches, each of similar-length "
           "examples, so less of a step is padding)")
    a("--no-test", action="store_true", help="stop after training and validation (e.g. while choosing G and "
                                             "tau); the same command with --resume then runs the test")
    args = vars(p.parse_args(argv))
    for key, value in DATASET_DEFAULTS.get(args["dataset"], {}).items():
        if args.get(key) is None:
            args[key] = value
    args["epochs"] = args["epochs"] or 2
    args["out"] = args["out"] or f"runs/{args['dataset']}-{args['method']}"
    return RunConfig(**{k.replace("-", "_"): v for k, v in args.items()})


# ----------------------------------------------------------------------------- data -> tensors

def make_examples(builder, interactions, titles):
    """Prompt + target ids of each training window, with where the target lies."""
    return [builder.build([titles[i] for i in x.history], titles[x.target]) for x in interactions]


def collate(examples, token_groups, indices, pad_id, device):
    """Right-padded (B, T) ids, the target mask and each target token's group id (0 elsewhere)."""
    T = max(len(examples[i].ids) for i in indices)
    ids = torch.full((len(indices), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(indices), T, dtype=torch.bool)
    groups = torch.zeros(len(indices), T, dtype=torch.long)
    for row, i in enumerate(indices):
        ex = examples[i]
        ids[row, :len(ex.ids)] = torch.tensor(ex.ids)
        s, e = ex.target
        mask[row, s:e] = True
        groups[row, s:e] = token_groups[i]
    return ids.to(device), mask.to(device), groups.to(device)


def epoch_batches(n, batch_size, seed, epoch, lengths=None, pool_batches=50):
    """The example indices of each micro-batch; a pure function of (seed, epoch) for --resume.

    With `lengths`, batches group examples of similar length: the shuffled order is cut into
    pools of `pool_batches` batches, each pool sorted by length and cut into batches, and the
    batches shuffled again. Rows are padded to their batch's longest: on Toy's train_1000 random
    batches of 8 compute 1.239 tokens per real token, length-grouped ones 1.016
    (scripts/prompt_lengths.py); the pools keep the batches' content random otherwise."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    pool = batch_size * pool_batches
    batches = []
    for p in range(0, n, pool):
        chunk = sorted(order[p:p + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ----------------------------------------------------------------------------- steps

class TargetNLL(torch.nn.Module):
    """The model up to the NLL of each target token: the forward that DDP wraps (DDP hooks a
    module's forward to know which backward it must synchronise)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, target_mask):
        hidden = self.model.hidden_states(ids)                          # right padding: no mask needed
        return token_nll(self.model.logits, hidden, ids, target_mask).nll   # (N,) target tokens only


def train_step(model, cfg, examples, token_groups, micro_batches, pad_id, dist=distributed.Dist(), ddp=None):
    """One optimizer step's worth of forward/backward over `grad_accum` micro-batches.

    Each micro-batch holds the indices of the *global* batch; with data parallelism (`dist`,
    and `ddp` the DDP-wrapped TargetNLL) this rank takes its slice and the losses are computed
    over the global batch (nanogdrt.loss), so every rank logs the same numbers.
    Returns what is logged: the loss, L(g) over all the step's tokens (0 for a group with no
    token in this step) and Q(g) averaged over the micro-batches (GDRT only)."""
    net = ddp if ddp is not None else TargetNLL(model)
    reduce_fn = dist.all_reduce_sum if dist.enabled else None
    loss_sum, q = 0.0, torch.zeros(cfg.groups)
    group_sums, group_counts = torch.zeros(cfg.groups), torch.zeros(cfg.groups)
    for k, global_indices in enumerate(micro_batches):
        indices = dist.split_batch(global_indices)
        # A rank left without rows (a last batch shorter than the world) still runs a forward
        # and backward with no target tokens: DDP and the all-reduces need every rank.
        ids, target_mask, groups = collate(examples, token_groups, indices or global_indices[:1], pad_id,
                                           cfg.device)
        if not indices:
            target_mask[:] = False
        last = k == len(micro_batches) - 1
        with (ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()):
            nll = net(ids, target_mask)                                 # (N,) this rank's target tokens
            token_group = groups[target_mask]                           # (N,) 1..G
            if cfg.method == "gdrt":
                out = gdrt_loss(nll, token_group, cfg.groups, cfg.tau, reduce_fn)    # Eq. 5
                loss = out.loss
                q += out.q.cpu() / len(micro_batches)
            else:
                loss = sft_loss(nll, reduce_fn)                         # Eq. 1
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            (loss / len(micro_batches)).backward()
        loss_sum += loss.item()
        # Per-group losses are logged for both methods (Fig. 6), pooled over the micro-batches.
        sums, counts = group_sums_and_counts(nll.detach(), token_group, cfg.groups)
        if dist.enabled:
            sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
        group_sums += sums.cpu()
        group_counts += counts.cpu()
    return {"loss": loss_sum / len(micro_batches), "q": q,
            "group_loss": group_sums / group_counts.clamp(min=1)}


def evaluate(model, builder, trie, interactions, titles, item_group, cfg, desc, dist=distributed.Dist()):
    """Top-K for every user (split across data-parallel ranks, gathered in order on all) + metrics."""
    model.eval()
    records = recommend(model, builder, trie, interactions, titles, beams=cfg.beams,
                        batch_size=cfg.eval_batch_size, progress=dist.main, dist=dist)
    model.train()
    result = score(records, interactions, titles, item_group)
    top1 = [r["topk_item_ids"][0] for r in records if r["topk_item_ids"]]
    result["top1_group_distribution"] = metrics.group_distribution(top1, item_group, 5).tolist()
    if dist.main:
        print(f"{desc}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result, records


def relevance_groups(model, builder, dataset, cfg, cached=True, dist=None):
    """Eq. 2/3 under `model`: the token groups of every training example (§3.2), the 5 item
    groups of the fairness metrics, and each training example's token relevance."""
    logprobs = catalogue_logprobs(model, builder, dataset, RELEVANCE_CACHE if cached else None, shard=dist)
    token_rel = [logprobs[x.target] for x in dataset.train]   # Eq. 3 depends on the target only
    token_groups = grouping.token_groups(token_rel, cfg.groups, method=cfg.grouping, seed=cfg.seed)
    return token_groups, item_groups(logprobs, 5), token_rel


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    cfg = parse_args(argv)
    dist = distributed.init(cfg.device)                    # torchrun: one rank of N; else rank 0 of 1
    cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, dist))
    say = print if dist.main else (lambda *args, **kwargs: None)
    out = Path(cfg.out)
    times = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)

    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_file=cfg.train_file,
                           train_samples=cfg.train_samples, valid_samples=cfg.valid_users,
                           test_samples=cfg.test_users, seed=cfg.seed, skip_bad=cfg.skip_bad)
    model_dir = Path(cfg.model) if cfg.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=dtype, device=cfg.device)
    tokenizer = Tokenizer(model_dir)
    builder = PromptBuilder(tokenizer, cfg.dataset if cfg.dataset in ("toy", "book", "clothing") else "synthetic")
    say(f"{cfg.dataset}: {len(dataset.titles)} items, {len(dataset.train)} train / {len(dataset.valid)} "
          f"valid / {len(dataset.test)} test windows; model {model_dir}; method {cfg.method}")

    # Steps 2-3: relevance under the model at the start of fine-tuning (no adapter), then groups.
    t = time.perf_counter()
    token_groups, item_group, token_rel = relevance_groups(model, builder, dataset, cfg, dist=dist)
    times["grouping_s"] = time.perf_counter() - t
    examples = make_examples(builder, dataset.train, dataset.titles)
    trie = build_trie(builder, dataset.titles)

    # Step 4: LoRA on the frozen model.
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=tuple(cfg.lora_targets))
    inject_lora(model, lora)
    model.to(cfg.device)
    ddp = None
    if dist.enabled:
        # DDP averages the gradients of the parameters that require them: the LoRA ones only.
        # Buffers (RoPE tables) are the same on every rank: no need to broadcast them each step.
        ddp = torch.nn.parallel.DistributedDataParallel(
            TargetNLL(model), device_ids=[dist.local_rank] if cfg.device.startswith("cuda") else None,
            broadcast_buffers=False)
        torch.manual_seed(cfg.seed + dist.rank)             # LoRA init is shared; dropout masks are not
        say(f"data parallel: {dist.world} ranks; global batch = {cfg.batch_size} per rank x "
            f"{cfg.grad_accum} accumulation x {dist.world} ranks = "
            f"{cfg.batch_size * cfg.grad_accum * dist.world} examples per optimizer step")
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "batch": 0, "step": 0, "steps": [], "epochs": [], "best": None}
    if cfg.resume:
        state = load_state(out / "state", model, optimizer, device=cfg.device, rank=dist.rank)
        say(f"resumed from {out / 'state'}: epoch {state['epoch'] + 1}, step {state['step']}")
    elif (out / "state").exists():
        raise SystemExit(f"{out / 'state'} exists: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model.train()

    # Training time is kept in the checkpoint so that a resumed run reports the whole run's time.
    t, trained_before = time.perf_counter(), state.get("train_and_valid_s", 0.0)

    def checkpoint():
        state["train_and_valid_s"] = trained_before + time.perf_counter() - t
        rank_rng = dist.gather([distributed.rng_state(cfg.device)], dist.world) if dist.enabled else None
        if dist.main:
            save_state(out / "state", model, optimizer, state, lora, cfg, rank_rng)

    stopped = False
    for epoch in range(state["epoch"], cfg.epochs):
        if cfg.regroup_every_epoch and epoch > 0:
            if state["batch"] > 0 and "token_groups" in state:
                # Resumed mid-epoch: the groups were scored by the model at the epoch's start,
                # which no longer exists; take them from the checkpoint.
                lengths = [len(g) for g in token_groups]
                token_groups = list(torch.tensor(state["token_groups"]).split(lengths))
                token_rel = list(torch.tensor(state["token_relevance"]).split(lengths))
            else:
                model.eval()
                token_groups, _, token_rel = relevance_groups(model, builder, dataset, cfg, cached=False, dist=dist)
                model.train()
                state["token_groups"] = torch.cat(token_groups).tolist()
                state["token_relevance"] = torch.cat(token_rel).tolist()
        lengths = [len(ex.ids) for ex in examples] if cfg.group_by_length else None
        batches = epoch_batches(len(examples), cfg.batch_size * dist.world, cfg.seed, epoch, lengths)  # global
        steps = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        bar = tqdm(range(state["batch"], len(steps)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   initial=state["batch"], total=len(steps), disable=not dist.main)
        for b in bar:
            try:
                log = train_step(model, cfg, examples, token_groups, steps[b], tokenizer.pad_id, dist, ddp)
            except FloatingPointError as e:
                raise SystemExit(f"{e} at epoch {epoch + 1}, step {state['step'] + 1}: stopping. The last "
                                 f"good checkpoint is {out / 'state'} (--resume); try a lower --lr.") from None
            torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] = b + 1
            state["steps"].append({"step": state["step"], "loss": log["loss"],
                                   "group_loss": log["group_loss"].tolist(), "q": log["q"].tolist()})
            bar.set_postfix(loss=f"{log['loss']:.3f}",
                            Q=" ".join(f"{q:.2f}" for q in log["q"].tolist()) if cfg.method == "gdrt" else "-")
            if state["step"] % cfg.save_every == 0:
                checkpoint()
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                stopped = True
                break
        if stopped:
            break
        # Step 5: choose on validation (the paper's protocol), never on test.
        result, _ = evaluate(model, builder, trie, dataset.valid, dataset.titles, item_group, cfg,
                             f"epoch {epoch + 1} valid", dist)
        state["epochs"].append({"epoch": epoch + 1, "step": state["step"], "valid": result,
                                "top1_group1_share": result["top1_group_distribution"][0]})
        if state["best"] is None or result["NDCG@5"] > state["best"]["NDCG@5"]:
            state["best"] = {"epoch": epoch + 1, "NDCG@5": result["NDCG@5"]}
            if dist.main:
                save_adapter(model, out / "best_adapter", lora, str(model_dir))
        state["epoch"], state["batch"] = epoch + 1, 0
        checkpoint()
    times["train_and_valid_s"] = state.get("train_and_valid_s", time.perf_counter() - t)
    if stopped:
        checkpoint()
        say(f"stopped after {state['step']} steps (--max-steps); continue with --resume")
        return
    if cfg.no_test:
        say(f"trained; best valid NDCG@5 {state['best']['NDCG@5']:.4f} at epoch {state['best']['epoch']}. "
              f"Test later: the same command with --resume instead of --no-test")
        return

    # Step 6: test the best adapter.
    t = time.perf_counter()
    dist.barrier()                                          # rank 0 has written best_adapter/
    load_adapter(model, out / "best_adapter")
    test, records = evaluate(model, builder, trie, dataset.test, dataset.titles, item_group, cfg, "test", dist)
    times["test_s"] = time.perf_counter() - t
    if not dist.main:
        return
    write_jsonl(records, out / "test_predictions.jsonl")   # per user, e.g. for bootstrap intervals
    times["total_s"] = time.perf_counter() - t0 + trained_before   # + earlier processes of a resumed run
    target_dist = metrics.group_distribution([x.target for x in dataset.test], item_group, 5).tolist()
    results = {
        "config": asdict(cfg),
        "versions": {"nanogdrt": getattr(nanogdrt, "__version__", "0.1.0"), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "relevance_model": ("current model, re-scored every epoch" if cfg.regroup_every_epoch
                            else f"{model_dir} before fine-tuning (no adapter)"),
        "dataset": {"name": dataset.name, "source": dataset.source, "items": len(dataset.titles),
                    "train": len(dataset.train), "valid": len(dataset.valid), "test": len(dataset.test),
                    "skipped": dataset.skipped},
        "token_groups": {"counts": torch.bincount(torch.cat(token_groups), minlength=cfg.groups + 1)[1:].tolist(),
                         "mean_relevance": [float(torch.cat(token_rel)[torch.cat(token_groups) == g].mean())
                                            for g in range(1, cfg.groups + 1)]},
        "data_parallel_ranks": dist.world,
        "best_epoch": state["best"]["epoch"],
        "epochs": state["epochs"],
        "test": test,
        "test_target_group_distribution": target_dist,
        "steps": state["steps"],
        "wall_times": times,
    }
    write_json_atomic(out / "results.json", results)
    draw_figures(out, cfg, state["steps"], test["top1_group_distribution"], target_dist)
    print_table(cfg, test, times)


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def draw_figures(out, cfg, steps, top1_dist, target_dist):
    x = [s["step"] for s in steps]
    plots.group_distribution({"test targets": target_dist, f"{cfg.method.upper()} top-1": top1_dist},
                             out / "top1_group_distribution.png")
    plots.per_group_curves(x, [s["group_loss"] for s in steps], out / "group_loss.png",
                           "mean NLL of the group's tokens", f"{cfg.method.upper()}: training loss by token group")
    if cfg.method == "gdrt":
        plots.per_group_curves(x, [s["q"] for s in steps], out / "group_weights.png", "Q(g)",
                               f"GDRT: group weights Q(g) = softmax(L(g)/{cfg.tau})")


def print_table(cfg, test, times):
    keys = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]
    print("\n| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    print(f"| {cfg.method.upper()} | " + " | ".join(f"{test[k]:.4f}" for k in keys) + " |")
    print(f"wall time: {times['total_s']:.0f} s (grouping {times['grouping_s']:.0f} s, "
          f"train+valid {times['train_and_valid_s']:.0f} s, test {times['test_s']:.0f} s); "
          f"results in {cfg.out}/results.json")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file, line or field
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()
