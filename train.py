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
import platform
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import nanogdrt
from nanogdrt import distributed, files, grouping, metrics, plots, relevance, synthetic
from nanogdrt.batches import collate, epoch_batches, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter
from nanogdrt.loss import gdrt_loss, group_sums_and_counts, sft_loss, token_nll
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import build_trie, recommend, score
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.train_state import load_state, save_state


# ----------------------------------------------------------------------------- config

def option(default, help, **argparse_kwargs):
    """A RunConfig field and its command-line option (--field-name), declared once."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class RunConfig:
    """Every setting of a run, saved in results.json. A None count is filled per dataset below."""
    dataset: str = option("synthetic", "toy | clothing | book | synthetic (embedded, offline)")
    data_dir: str | None = option(None, "dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    train_file: str | None = option(None, "which train*.csv of the folder (toy: train_1000.csv)")
    synthetic_size: str = option("full", "synthetic only: full (2,000 items) or small (120 items, for "
                                         "tutorials and smoke tests)", choices=["full", "small"])
    method: str = option("gdrt", "SFT (Eq. 1) or GDRT (Eq. 5)", choices=["sft", "gdrt"])
    model: str | None = option(None, "Hugging Face Llama folder (default: embedded SmolLM2-135M-Instruct)")
    train_samples: int | None = option(None, "seeded sample of training windows (MSL's recipe: 10,000; the GDRT "
                                               "paper gives none)")
    valid_users: int | None = option(None, "seeded sample of validation users per epoch")
    test_users: int | None = option(None, "seeded sample of test users (default per dataset; MSL tests "
                                            "its whole test file, 4,794 Toy users)")
    epochs: int | None = option(None, "training epochs (paper: 5)")
    batch_size: int = option(8, "examples per micro-batch (MSL's recipe: 128 per optimizer step = "
                                  "batch-size x grad-accum x ranks; the GDRT paper gives none)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-4, "AdamW learning rate of the LoRA parameters (MSL's recipe: 1e-4, "
                                 "after a 20-step warm-up, which train.py omits; the GDRT paper gives none)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "gradient-norm clip")
    groups: int = option(5, "G token groups (paper grid: 2, 5, 10)")
    tau: float = option(0.5, "Group-DRO temperature (paper grid: 0.1 .. 1.0)")
    grouping: str = option("kmeans", "how tokens are split by relevance", choices=["kmeans", "quantile"])
    regroup_every_epoch: bool = option(False, "re-score Eq. 3 with the current model at each later epoch "
                                             "(default: the base model scores Eq. 2/3 once)")
    lora_r: int = option(8, "LoRA rank (MSL's recipe; the GDRT paper gives no LoRA settings)")
    lora_alpha: float = option(16, "LoRA alpha (scale alpha/r; MSL's recipe)")
    lora_dropout: float = option(0.05, "dropout on the LoRA path (MSL's recipe)")
    lora_targets: list[str] = option(["q_proj", "v_proj"], "module names that get LoRA (MSL's recipe)", nargs="+")
    beams: int = option(10, "beam width of constrained beam search (paper and MSL: 10)")
    eval_batch_size: int = option(32, "users decoded at once (slots refilled as users finish)")
    seed: int = option(0, "seed of sampling, batching, LoRA init and dropout")
    device: str = option("cpu", "cpu | cuda | mps")
    dtype: str = option("float32", "model dtype", choices=["float32", "bfloat16", "float16"])
    out: str | None = option(None, "run folder (default: runs/<dataset>-<method>)")
    resume: bool = option(False, "continue from <out>/state")
    save_every: int = option(50, "checkpoint every N optimizer steps")
    max_steps: int | None = option(None, "stop after N optimizer steps in all (then --resume)")
    skip_bad: bool = option(False, "skip malformed data rows (counted in results.json)")
    group_by_length: bool = option(True, "batch examples in plain random order (default: random pools of "
                                         "batches, each of similar-length examples, so less of a step is padding)")
    no_test: bool = option(False, "stop after training and validation (e.g. while choosing G and tau); the "
                                  "same command with --resume then runs the test")


# Paper-like defaults scaled to 2 CPU cores, per dataset (a flag on the command line wins).
DATASET_DEFAULTS = {
    "synthetic": dict(train_samples=128, valid_users=32, test_users=128, epochs=2),
    "toy": dict(train_file="train_1000.csv", train_samples=1000, valid_users=100, test_users=500, epochs=2),
}


def build_parser() -> argparse.ArgumentParser:
    """One option per RunConfig field. A bool field is a switch: --name turns a False default
    on, --no-name turns a True default off."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(RunConfig):
        kwargs = dict(f.metadata)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = f.name.replace("_", "-")
        if f.type is bool:
            flag = f"--no-{name}" if default else f"--{name}"
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", **kwargs)
        else:   # the type of one value: `int | None` -> int, `list[str]` -> str
            value_type = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
            p.add_argument(f"--{name}", type=value_type, default=default, **kwargs)
    return p


def parse_args(argv=None) -> RunConfig:
    args = vars(build_parser().parse_args(argv))
    for key, value in DATASET_DEFAULTS.get(args["dataset"], {}).items():
        if args.get(key) is None:
            args[key] = value
    args["epochs"] = args["epochs"] or 2                   # datasets without defaults (clothing, book)
    args["out"] = args["out"] or f"runs/{args['dataset']}-{args['method']}"
    return RunConfig(**args)


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


def train_step(net, micro_batches, examples, token_groups, pad_id, method, n_groups, tau, device,
               dist=distributed.Dist()):
    """One optimizer step's worth of forward/backward over the micro-batches (grad accumulation).

    `net` is a TargetNLL, DDP-wrapped under data parallelism. Each micro-batch holds indices of
    the *global* batch; this rank takes its slice of it (`dist`) and the losses are computed over
    the global batch (nanogdrt.loss), so every rank logs the same numbers.
    Returns what is logged: the loss, L(g) over all the step's tokens (0 for a group with no
    token in this step) and Q(g) averaged over the micro-batches (GDRT only)."""
    ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
    # The losses are means over the *global* batch: each rank's sums are all-reduced inside them.
    reduce_fn = dist.all_reduce_sum if dist.enabled else None
    loss_sum, q = 0.0, torch.zeros(n_groups)
    group_sums, group_counts = torch.zeros(n_groups), torch.zeros(n_groups)
    for k, global_indices in enumerate(micro_batches):
        indices = dist.split_batch(global_indices)
        # A rank left without rows (a last batch shorter than the world) still runs a forward
        # and backward with no target tokens: DDP and the all-reduces need every rank.
        ids, target_mask, groups = collate(examples, token_groups, indices or global_indices[:1], pad_id, device)
        if not indices:
            target_mask[:] = False
        last = k == len(micro_batches) - 1
        # Gradients are all-reduced once per optimizer step, at the last micro-batch.
        with (ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()):
            nll = net(ids, target_mask)                                 # (N,) this rank's target tokens
            token_group = groups[target_mask]                           # (N,) 1..G
            if method == "gdrt":
                out = gdrt_loss(nll, token_group, n_groups, tau, reduce_fn)     # Eq. 5
                loss = out.loss
                q += out.q.cpu() / len(micro_batches)
            else:
                loss = sft_loss(nll, reduce_fn)                         # Eq. 1
            if not torch.isfinite(loss):   # stop before a NaN reaches the LoRA weights
                raise FloatingPointError(f"loss is {loss.item()}")
            (loss / len(micro_batches)).backward()                      # the mean over micro-batches
        loss_sum += loss.item()
        # Per-group losses are logged for both methods (Fig. 6), pooled over the micro-batches.
        sums, counts = group_sums_and_counts(nll.detach(), token_group, n_groups)
        if dist.enabled:
            sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
        group_sums += sums.cpu()
        group_counts += counts.cpu()
    return {"loss": loss_sum / len(micro_batches), "q": q,
            "group_loss": group_sums / group_counts.clamp(min=1)}


def evaluate(model, builder, trie, interactions, titles, item_group, beams, batch_size, desc,
             dist=distributed.Dist()):
    """Top-K for every user (split across data-parallel ranks, gathered in order on all) + metrics."""
    model.eval()                                           # no LoRA dropout while decoding
    records = recommend(model, builder, trie, interactions, titles, beams=beams, batch_size=batch_size,
                        progress=dist.main, dist=dist)
    model.train()
    result = score(records, interactions, titles, item_group)
    top1 = [r["topk_item_ids"][0] for r in records if r["topk_item_ids"]]
    result["top1_group_distribution"] = metrics.group_distribution(top1, item_group).tolist()
    if dist.main:
        print(f"{desc}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result, records


def validate(model, builder, trie, dataset, item_group, cfg, epoch, state, dist) -> bool:
    """The metrics on validation after `epoch`, logged in `state`; True when NDCG@5 is the best yet."""
    result, _ = evaluate(model, builder, trie, dataset.valid, dataset.titles, item_group, cfg.beams,
                         cfg.eval_batch_size, f"epoch {epoch + 1} valid", dist)
    state["epochs"].append({"epoch": epoch + 1, "step": state["step"], "valid": result,
                            "top1_group1_share": result["top1_group_distribution"][0]})
    if state["best"] is None or result["NDCG@5"] > state["best"]["NDCG@5"]:   # ties keep the earlier epoch
        state["best"] = {"epoch": epoch + 1, "NDCG@5": result["NDCG@5"]}
        return True
    return False


# ----------------------------------------------------------------------------- relevance -> groups

def relevance_groups(model, builder, dataset, n_groups, method, seed, cached=True, dist=None):
    """Eq. 2/3 under `model`: the token groups of every training example (§3.2), the item groups
    of the fairness metrics, and each training example's token relevance."""
    logprobs = relevance.catalogue_logprobs(model, builder, dataset, cached=cached, shard=dist)
    # With the history masked, Eq. 3 depends on the target item only: a lookup per example.
    token_rel = relevance.token_relevance(logprobs, [x.target for x in dataset.train])
    token_groups = grouping.token_groups(token_rel, n_groups, method=method, seed=seed)
    return token_groups, grouping.item_groups(relevance.item_scores(logprobs)), token_rel


def regroup_or_restore(model, builder, dataset, cfg, state, token_groups, token_rel, dist):
    """--regroup-every-epoch, at the start of every epoch after the first: Eq. 3 re-scored under
    the current model (not cached: no other run has this model) and the tokens regrouped; both
    are kept in the checkpoint. A run resumed mid-epoch takes them from there instead, because
    the model that scored them at the epoch's start no longer exists."""
    lengths = [len(g) for g in token_groups]
    if state["batch"] > 0 and "token_groups" in state:
        return (list(torch.tensor(state["token_groups"]).split(lengths)),
                list(torch.tensor(state["token_relevance"]).split(lengths)))
    model.eval()
    token_groups, _, token_rel = relevance_groups(model, builder, dataset, cfg.groups, cfg.grouping, cfg.seed,
                                                  cached=False, dist=dist)
    model.train()
    state["token_groups"] = torch.cat(token_groups).tolist()
    state["token_relevance"] = torch.cat(token_rel).tolist()
    return token_groups, token_rel


# ----------------------------------------------------------------------------- set-up and results

def load_data_and_model(cfg, say):
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_file=cfg.train_file,
                           train_samples=cfg.train_samples, valid_samples=cfg.valid_users,
                           test_samples=cfg.test_users, seed=cfg.seed, skip_bad=cfg.skip_bad,
                           synthetic=synthetic.SMALL if cfg.synthetic_size == "small" else None)
    model_dir = Path(cfg.model) if cfg.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    tokenizer = Tokenizer(model_dir)
    # A dataset without a template of its own (e.g. synthetic) gets the Toy wording.
    builder = PromptBuilder(tokenizer, cfg.dataset if cfg.dataset in ("toy", "book", "clothing") else "synthetic")
    say(f"{cfg.dataset}: {len(dataset.titles)} items, {len(dataset.train)} train / {len(dataset.valid)} "
        f"valid / {len(dataset.test)} test windows; model {model_dir}; method {cfg.method}")
    return dataset, model_dir, model, tokenizer, builder


def data_parallel(net, cfg, dist, say):
    """Under torchrun, `net` wrapped in DDP (gradients averaged over ranks); else `net` itself."""
    if not dist.enabled:
        return net
    # DDP averages the gradients of the parameters that require them: the LoRA ones only.
    # Buffers (RoPE tables) are the same on every rank: no need to broadcast them each step.
    ddp = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[dist.local_rank] if cfg.device.startswith("cuda") else None, broadcast_buffers=False)
    torch.manual_seed(cfg.seed + dist.rank)                # LoRA init is shared; dropout masks are not
    say(f"data parallel: {dist.world} ranks; global batch = {cfg.batch_size} per rank x "
        f"{cfg.grad_accum} accumulation x {dist.world} ranks = "
        f"{cfg.batch_size * cfg.grad_accum * dist.world} examples per optimizer step")
    return ddp


def start_or_resume(out, cfg, model, optimizer, dist, say) -> dict:
    """A fresh training state, or the one in <out>/state with --resume (weights, optimizer, RNG)."""
    if cfg.resume:
        state = load_state(out / "state", model, optimizer, device=cfg.device, rank=dist.rank)
        say(f"resumed from {out / 'state'}: epoch {state['epoch'] + 1}, step {state['step']}")
        return state
    if (out / "state").exists():   # never overwrite a run by accident
        raise SystemExit(f"{out / 'state'} exists: pass --resume to continue that run, or choose another --out")
    return {"epoch": 0, "batch": 0, "step": 0, "steps": [], "epochs": [], "best": None}


def write_results(out, cfg, dataset, model_dir, world, token_groups, token_rel, item_group, state, test, records,
                  times):
    """The test predictions (one line per user, e.g. for bootstrap intervals), results.json
    (everything a report needs, the config included), the run's figures and the table."""
    files.write_jsonl(out / "test_predictions.jsonl", records)
    target_dist = metrics.group_distribution([x.target for x in dataset.test], item_group).tolist()
    groups, rel = torch.cat(token_groups), torch.cat(token_rel)
    results = {
        "config": asdict(cfg),
        "versions": {"nanogdrt": getattr(nanogdrt, "__version__", "0.1.0"), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "relevance_model": ("current model, re-scored every epoch" if cfg.regroup_every_epoch
                            else f"{model_dir} before fine-tuning (no adapter)"),
        "dataset": {"name": dataset.name, "source": dataset.source, "items": len(dataset.titles),
                    "train": len(dataset.train), "valid": len(dataset.valid), "test": len(dataset.test),
                    "skipped": dataset.skipped},
        "token_groups": {"counts": torch.bincount(groups, minlength=cfg.groups + 1)[1:].tolist(),
                         "mean_relevance": [float(rel[groups == g].mean()) for g in range(1, cfg.groups + 1)]},
        "data_parallel_ranks": world,
        "best_epoch": state["best"]["epoch"],
        "epochs": state["epochs"],
        "test": test,
        "test_target_group_distribution": target_dist,
        "steps": state["steps"],
        "wall_times": times,
    }
    files.write_json(out / "results.json", results)
    plots.run_figures(out, cfg.method, cfg.tau, state["steps"], test["top1_group_distribution"], target_dist)
    print_table(cfg, test, times)


def print_table(cfg, test, times):
    keys = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]
    print("\n| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    print(f"| {cfg.method.upper()} | " + " | ".join(f"{test[k]:.4f}" for k in keys) + " |")
    print(f"wall time: {times['total_s']:.0f} s (grouping {times['grouping_s']:.0f} s, "
          f"train+valid {times['train_and_valid_s']:.0f} s, test {times['test_s']:.0f} s); "
          f"results in {cfg.out}/results.json")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    cfg = parse_args(argv)
    dist = distributed.init(cfg.device)                    # torchrun: one rank of N; else rank 0 of 1
    cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, dist))   # cuda -> cuda:<local rank>
    say = print if dist.main else (lambda *args, **kwargs: None)
    out, times, t0 = Path(cfg.out), {}, time.perf_counter()
    torch.manual_seed(cfg.seed)                            # LoRA init and dropout follow from --seed

    # Step 1: the data, the base model and the prompt template.
    dataset, model_dir, model, tokenizer, builder = load_data_and_model(cfg, say)

    # Steps 2-3: relevance under the model at the start of fine-tuning (no adapter), then groups.
    t = time.perf_counter()
    token_groups, item_group, token_rel = relevance_groups(model, builder, dataset, cfg.groups, cfg.grouping,
                                                           cfg.seed, dist=dist)
    times["grouping_s"] = time.perf_counter() - t
    examples = make_examples(builder, dataset.train, dataset.titles)
    trie = build_trie(builder, dataset.titles)

    # Step 4: LoRA on the frozen model; only its parameters are trained.
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=tuple(cfg.lora_targets))
    inject_lora(model, lora)
    model.to(cfg.device)
    net = data_parallel(TargetNLL(model), cfg, dist, say)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = start_or_resume(out, cfg, model, optimizer, dist, say)
    out.mkdir(parents=True, exist_ok=True)                 # only now: an existing run was refused above
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
            token_groups, token_rel = regroup_or_restore(model, builder, dataset, cfg, state, token_groups,
                                                         token_rel, dist)
        # The same (seed, epoch) gives the same batches, so a resumed epoch skips exactly the
        # steps already taken. Batches are global: each rank takes its slice in train_step.
        lengths = [len(ex.ids) for ex in examples] if cfg.group_by_length else None
        batches = epoch_batches(len(examples), cfg.batch_size * dist.world, cfg.seed, epoch, lengths)
        steps = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        # A run resumed mid-epoch starts at the step after the checkpoint's.
        bar = tqdm(range(state["batch"], len(steps)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   initial=state["batch"], total=len(steps), disable=not dist.main)
        for b in bar:
            try:
                log = train_step(net, steps[b], examples, token_groups, tokenizer.pad_id, cfg.method, cfg.groups,
                                 cfg.tau, cfg.device, dist)
            except FloatingPointError as e:
                raise SystemExit(f"{e} at epoch {epoch + 1}, step {state['step'] + 1}: stopping. The last "
                                 f"good checkpoint is {out / 'state'} (--resume); try a lower --lr.") from None
            torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"], state["batch"] = state["step"] + 1, b + 1
            # The log of every step lives in the checkpoint, so a resumed run reports all of them.
            state["steps"].append({"step": state["step"], "loss": log["loss"],
                                   "group_loss": log["group_loss"].tolist(), "q": log["q"].tolist()})
            bar.set_postfix(loss=f"{log['loss']:.3f}",
                            Q=" ".join(f"{q:.2f}" for q in log["q"].tolist()) if cfg.method == "gdrt" else "-")
            if state["step"] % cfg.save_every == 0:
                checkpoint()
            stopped = cfg.max_steps is not None and state["step"] >= cfg.max_steps
            if stopped:
                break
        if stopped:
            break
        # Step 5: choose on validation (the paper's protocol), never on test.
        if validate(model, builder, trie, dataset, item_group, cfg, epoch, state, dist) and dist.main:
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

    # Step 6: test the best adapter (chosen on validation above).
    t = time.perf_counter()
    dist.barrier()                                          # rank 0 has written best_adapter/
    load_adapter(model, out / "best_adapter")
    test, records = evaluate(model, builder, trie, dataset.test, dataset.titles, item_group, cfg.beams,
                             cfg.eval_batch_size, "test", dist)
    times["test_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0 + trained_before   # + earlier processes of a resumed run
    if dist.main:
        write_results(out, cfg, dataset, model_dir, dist.world, token_groups, token_rel, item_group, state, test,
                      records, times)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file, line or field
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()
