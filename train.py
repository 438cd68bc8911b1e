"""Fine-tune an LLM recommender with SFT (Eq. 1), GDRT (Eq. 5) or a baseline; choose on validation; test.

    python train.py                                   # offline: synthetic data, embedded SmolLM2-135M
    python train.py --dataset toy --method gdrt       # the paper's Amazon Toys split
    python train.py --dataset toy --method sft --out runs/toy-sft

The script follows §3 of the paper, top to bottom:
  1. prompts: the history titles -> prompt ids; the target title -> the ids to generate
  2. Eq. 3: every target token's relevance to the auxiliary tokens, with the history -> "N/A";
     Eq. 2: every item's relevance (mean over its tokens), for the fairness groups of the metrics
  3. §3.2: 1-D k-means over the target tokens' relevance -> G token groups
  4. LoRA fine-tuning; each step weights the group losses L(g) by Q = softmax(L(g) / tau) (Eq. 5)
     (--method also runs the baselines MSL, MSL+GDRT and IFairLRS's Reweight: nanogdrt/methods.py)
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
from typing import NamedTuple
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import nanogdrt
from nanogdrt import d3, distributed, files, grouping, methods, metrics, plots, relevance, sasrec, synthetic
from nanogdrt.batches import collate, epoch_batches, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter
from nanogdrt.methods import METHODS, TargetLoss, Totals, group_weights, method_loss, totals
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import build_trie, recommend, score
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.train_state import claim_run_folder, load_state, save_state
from nanogdrt.validate import DEVICE, RANGE_KEYS, check_config, describe


# ----------------------------------------------------------------------------- config

def option(default, help, **argparse_kwargs):
    """A RunConfig field and its command-line option (--field-name), declared once; `min`, `max`,
    `above`, `below` declare its allowed range (checked by nanogdrt.validate at start-up)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class RunConfig:
    """Every setting of a run, saved in results.json. A None count is filled per dataset below."""
    dataset: str = option("synthetic", "toy | clothing | book | synthetic (embedded, offline)",
                          pattern="toy|clothing|book|synthetic")
    data_dir: str | None = option(None, "dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    train_file: str | None = option(None, "which train*.csv of the folder (toy: train_1000.csv)")
    synthetic_size: str = option("full", "synthetic only: full (2,000 items) or small (120 items, for "
                                         "tutorials and smoke tests)", choices=["full", "small"])
    method: str = option("gdrt", "SFT (Eq. 1), GDRT (Eq. 5), MSL's masked softmax, MSL with GDRT's group "
                                 "weights, or IFairLRS's reweighting (nanogdrt/methods.py)", choices=list(METHODS))
    model: str | None = option(None, "Hugging Face Llama folder (default: embedded SmolLM2-135M-Instruct)")
    train_samples: int | None = option(None, "seeded sample of training windows (MSL's recipe: 10,000; the GDRT "
                                               "paper gives none)", min=1)
    valid_users: int | None = option(None, "seeded sample of validation users per epoch", min=1)
    test_users: int | None = option(None, "seeded sample of test users (default per dataset; MSL tests "
                                            "its whole test file, 4,794 Toy users)", min=1)
    epochs: int | None = option(None, "training epochs (paper: 5)", min=1)
    batch_size: int = option(8, "examples per micro-batch (MSL's recipe: 128 per optimizer step = "
                                  "batch-size x grad-accum x ranks; the GDRT paper gives none)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(5e-4, "AdamW learning rate of the LoRA parameters (MSL's recipe: 1e-4, "
                                 "after a 20-step warm-up, which train.py omits; the GDRT paper gives none)", above=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    clip: float = option(1.0, "gradient-norm clip", above=0)
    groups: int = option(5, "G token groups (paper grid: 2, 5, 10)", min=1)
    tau: float = option(0.5, "Group-DRO temperature (paper grid: 0.1 .. 1.0)", above=0)
    loss_scope: str = option("step", "the batch a loss is computed over (its token mean; GDRT's L(g) and Q(g)). "
                                     "step: the optimizer step's whole batch, every micro-batch of every rank "
                                     "(exact: batch 4 x accum 32 and 4 x 4 x 8 ranks give the same Q and update; "
                                     "GDRT with --grad-accum > 1 runs one extra no-grad forward per step for Q). "
                                     "micro: each micro-batch across the ranks, averaged over the accumulation. "
                                     "rank-micro: each rank's own micro-batch, as HF-Trainer implementations "
                                     "compute it", choices=["step", "micro", "rank-micro"])
    tau_msl: float = option(4.5, "MSL's softmax temperature (MSL's recipe for Toy: 4.5)", above=0)
    reweight_power: float = option(1.0, "Reweight: IFairLRS's group weights raised to this power (our knob, "
                                        "not IFairLRS's): 1 = IFairLRS, 0 = uniform = SFT. Item groups: Eq. 2's",
                                   min=0)
    grouping: str = option("kmeans", "how tokens are split by relevance", choices=["kmeans", "quantile"])
    regroup_every_epoch: bool = option(False, "re-score Eq. 3 with the current model at each later epoch "
                                             "(default: the base model scores Eq. 2/3 once)")
    lora_r: int = option(8, "LoRA rank (MSL's recipe; the GDRT paper gives no LoRA settings)", min=1)
    lora_alpha: float = option(16, "LoRA alpha (scale alpha/r; MSL's recipe)", above=0)
    lora_dropout: float = option(0.05, "dropout on the LoRA path (MSL's recipe)", min=0, below=1)
    lora_targets: list[str] = option(["q_proj", "v_proj"], "module names that get LoRA (MSL's recipe)", nargs="+")
    beams: int = option(10, "beam width of constrained beam search (paper and MSL: 10)", min=1)
    eval_batch_size: int = option(32, "users decoded at once (slots refilled as users finish)", min=1)
    decoding: str = option("cbs", "decoding of the test (validation: cbs): constrained beam search or D3 "
                                  "(Bao et al. 2024, nanogdrt/d3.py)", choices=d3.DECODINGS)
    assistant: str | None = option(None, "d3: SASRec folder (python -m nanogdrt.sasrec), weighted by --alpha")
    alpha: float = option(0.0, "d3: step score (1 - alpha) log p_LM + alpha log p_assistant (D3's code: 0)",
                          min=0, max=1)
    seed: int = option(0, "seed of sampling, batching, LoRA init and dropout", min=0)
    device: str = option("cpu", "cpu | cuda | mps", pattern=DEVICE)
    dtype: str = option("float32", "model dtype", choices=["float32", "bfloat16", "float16"])
    out: str | None = option(None, "run folder (default: runs/<dataset>-<method>)")
    resume: bool = option(False, "continue from <out>/state")
    save_every: int = option(50, "checkpoint every N optimizer steps", min=1)
    max_steps: int | None = option(None, "stop after N optimizer steps in all (then --resume)", min=1)
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
        kwargs = {k: v for k, v in f.metadata.items() if k not in RANGE_KEYS}
        bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata and k != "pattern"}
        if bounds:
            kwargs["help"] += f" [{describe(**bounds)}]"
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
    if args["epochs"] is None:                             # datasets without defaults (clothing, book)
        args["epochs"] = 2
    args["out"] = args["out"] or f"runs/{args['dataset']}-{args['method']}"
    return check_config(RunConfig(**args))        # every range, before any work


# ----------------------------------------------------------------------------- steps

class StepData(NamedTuple):
    """What a training step reads per example, besides the token groups (which --regroup changes)."""
    examples: list                      # PromptIds of every training window
    nodes: list | None                  # MSL: trie node before each target token, per example
    example_weight: torch.Tensor | None  # Reweight: (n,) IFairLRS weight of each example
    pad_id: int


def micro_batch(data, token_groups, global_indices, device, dist):
    """This rank's slice of a global micro-batch: ids, target mask, token groups, trie nodes and
    example weights. A rank left without rows (a last batch shorter than the world) still runs a
    forward and backward with no target tokens: DDP and the all-reduces need every rank."""
    indices = dist.split_batch(global_indices)
    rows = indices or global_indices[:1]
    ids, mask, groups = collate(data.examples, token_groups, rows, data.pad_id, device)
    nodes = collate(data.examples, data.nodes, rows, data.pad_id, device)[2] if data.nodes else None
    if not indices:
        mask[:] = False
    weight = data.example_weight[rows] if data.example_weight is not None else None
    return ids, mask, groups, nodes, weight


def train_step(net, micro_batches, data, token_groups, cfg, dist=distributed.Dist()):
    """One optimizer step's worth of forward/backward over the micro-batches (grad accumulation).

    `net` is a TargetLoss, DDP-wrapped under data parallelism. Each micro-batch holds indices of
    the *global* batch; this rank takes its slice of it. The method's loss (nanogdrt.methods)
    weights each token by constants from the totals of its --loss-scope:
      step        totals over every micro-batch of every rank: the loss (and GDRT's Q) of the
                  whole step's batch. GDRT needs L(g) before any backward, so with more than one
                  micro-batch a no-grad pass sums them first (LoRA dropout draws its own masks
                  there: equal to one big batch only with dropout 0); one micro-batch uses the
                  detached sums of its own forward. Token counts need no forward.
      micro       totals over the micro-batch on all ranks; the step averages the micro-batches.
      rank-micro  totals over this rank's micro-batch only (HF-Trainer-style); DDP averages ranks.
    Returns what is logged, the same on every rank: the loss, L(g) over all the step's tokens (0
    for a group without tokens), Q(g) (step: the step's; otherwise the mean over micro-batches
    and ranks; 0 for methods without group weights)."""
    ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
    module = ddp.module if ddp is not None else net
    method, G, K, W = METHODS[cfg.method], cfg.groups, len(micro_batches), dist.world
    reduce_fn = dist.all_reduce_sum if dist.enabled else None
    parts = [micro_batch(data, token_groups, b, cfg.device, dist) for b in micro_batches]
    step_totals = None                                      # scope "step" with one micro-batch: from its forward
    if cfg.loss_scope == "step" and K > 1:
        zero = torch.zeros(G, device=cfg.device)
        if method.weighting == "groups":
            with torch.no_grad():                           # the pass for L(g): sums and counts of the step
                step_totals = sum((totals(module(ids, mask, nodes).nll, groups[mask], G)
                                   for ids, mask, groups, nodes, _ in parts), Totals(zero, zero))
        else:                                               # a token mean needs the counts only
            step_totals = sum((totals(torch.zeros(int(mask.sum()), device=cfg.device), groups[mask], G)
                               for _, mask, groups, _, _ in parts), Totals(zero, zero))
        step_totals = step_totals.reduce(reduce_fn)
    # The backward value of each rank: DDP averages the ranks' gradients, so a loss that is a sum
    # over ranks (scopes step and micro) is scaled by W; micro-batches are averaged except in step.
    scale = {"step": W, "micro": W / K, "rank-micro": 1 / K}[cfg.loss_scope]
    loss_sum, q_sum = torch.zeros((), device=cfg.device), torch.zeros(G, device=cfg.device)
    pooled = Totals(torch.zeros(G, device=cfg.device), torch.zeros(G, device=cfg.device))
    for k, (ids, mask, groups, nodes, weight) in enumerate(parts):
        # Gradients are all-reduced once per optimizer step, at the last micro-batch.
        with (ddp.no_sync() if ddp is not None and k < K - 1 else contextlib.nullcontext()):
            out = net(ids, mask, nodes)                                 # (N,) this rank's target tokens
            token_group = groups[mask]                                  # (N,) 1..G
            mine = totals(out.nll, token_group, G)
            if step_totals is not None:
                scope = step_totals
            else:
                scope = mine if cfg.loss_scope == "rank-micro" else mine.reduce(reduce_fn)
            loss = method_loss(method.weighting, out.nll, token_group, out.rows, weight, scope, cfg.tau)
            if not torch.isfinite(loss):   # stop before a NaN reaches the LoRA weights
                raise FloatingPointError(f"loss is {loss.item()}")
            (loss * scale).backward()
        loss_sum += loss.detach() * scale
        if method.weighting == "groups":
            q_sum += group_weights(scope, cfg.tau) / K
        pooled = pooled + mine                  # per-group losses are logged for every method (Fig. 6)
    pooled = pooled.reduce(reduce_fn)
    loss_sum = loss_sum if reduce_fn is None else reduce_fn(loss_sum)
    if cfg.loss_scope == "rank-micro" and reduce_fn is not None:
        q_sum = reduce_fn(q_sum) / W                        # each rank had its own Q: log their mean
    return {"loss": loss_sum.item() / W, "q": q_sum.cpu(),
            "group_loss": (pooled.sums / pooled.counts.clamp(min=1)).cpu()}


def method_postfix(cfg, log, method_log) -> dict:
    """What the progress bar shows of the method: Q(g) each step, or the run's constants."""
    if METHODS[cfg.method].weighting == "groups":
        return {"Q": " ".join(f"{q:.2f}" for q in log["q"].tolist())}
    if "example_weight_min" in method_log:
        return {"w": f"{method_log['example_weight_min']:.2f}..{method_log['example_weight_max']:.2f}"}
    if "single_allowed_token_share" in method_log:
        return {"single": f"{method_log['single_allowed_token_share']:.0%}"}
    return {}


def method_setup(cfg, dataset, examples, trie, item_group, say):
    """What a method needs once per run, and what it logs about it (results.json "method"):
    MSL's trie nodes of every target token, Reweight's example weights (Eq. 2's item groups)."""
    method, nodes, weight, log = METHODS[cfg.method], None, None, {}
    if method.per_token == "msl":
        trie.to(cfg.device)                                 # the allowed sets are looked up on the device
        nodes = methods.target_nodes_of(trie, examples)
        log["single_allowed_token_share"] = methods.single_continuation_share(trie, nodes)
        log["tau_msl"] = cfg.tau_msl
        say(f"MSL: {log['single_allowed_token_share']:.1%} of the target positions allow a single token")
    if method.weighting == "examples":
        n_item_groups = max(item_group.values())
        group_w, weight = methods.reweight_example_weights(dataset.train, item_group, n_item_groups,
                                                           cfg.reweight_power)
        log.update(item_groups="Eq. 2", power=cfg.reweight_power, group_weights=group_w.tolist(),
                   example_weight_min=float(weight.min()), example_weight_max=float(weight.max()))
        say(f"Reweight: example weights {log['example_weight_min']:.3f} .. {log['example_weight_max']:.3f}")
    return nodes, weight, log


def evaluate(model, builder, trie, interactions, titles, item_group, beams, batch_size, desc,
             dist=distributed.Dist(), decoding="cbs", assistant=None, alpha=0.0):
    """Top-K for every user (split across data-parallel ranks, gathered in order on all) + metrics.
    `decoding`, `assistant` (a SASRec) and `alpha`: see nanogdrt.recommend.recommend."""
    model.eval()                                           # no LoRA dropout while decoding
    records = recommend(model, builder, trie, interactions, titles, beams=beams, batch_size=batch_size,
                        progress=dist.main, dist=dist, decoding=decoding, assistant=assistant, alpha=alpha)
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
        "method": state["method"],
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
    # Before any work: --out writable and locked for this run (a second run is refused), its
    # checkpoint present when resuming, absent otherwise. The lock is held until main() returns.
    lock = claim_run_folder(out, cfg.resume) if dist.main else None   # noqa: F841 (held, not used)
    torch.manual_seed(cfg.seed)                            # LoRA init and dropout follow from --seed

    # Step 1: the data, the base model and the prompt template.
    dataset, model_dir, model, tokenizer, builder = load_data_and_model(cfg, say)
    assistant = sasrec.load(cfg.assistant, device=cfg.device) if cfg.assistant else None
    d3.scoring(cfg.decoding, cfg.alpha, assistant, [], list(dataset.titles))   # bad D3 options fail before training

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
    nodes, example_weight, method_log = method_setup(cfg, dataset, examples, trie, item_group, say)
    data = StepData(examples, nodes, example_weight, tokenizer.pad_id)
    net = data_parallel(TargetLoss(model, METHODS[cfg.method].per_token, trie, cfg.tau_msl), cfg, dist, say)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = start_or_resume(out, cfg, model, optimizer, dist, say)
    state["method"] = method_log                           # recomputed by a resumed run: the same numbers
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
                log = train_step(net, steps[b], data, token_groups, cfg, dist)
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
            bar.set_postfix(loss=f"{log['loss']:.3f}", **method_postfix(cfg, log, method_log))
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
                             cfg.eval_batch_size, "test", dist, cfg.decoding, assistant, cfg.alpha)
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
