"""Fine-tune an LLM recommender with SFT (Eq. 1), GDRT (Eq. 5) or a baseline; choose on validation; test.

    python train.py                                   # offline: synthetic data, embedded SmolLM2-135M
    python train.py --dataset toy --method gdrt       # the paper's Amazon Toys split
    python train.py --dataset toy --method sft --out runs/toy-sft

The script follows §3 of the paper, top to bottom:
  1. prompts: the history titles -> prompt ids; the target title -> the ids to generate
  2. Eq. 3: every target token's relevance to the auxiliary tokens, with the history -> "N/A";
     Eq. 2: every item's relevance (mean over its tokens), for the fairness groups of the metrics
  3. §3.2: 1-D k-means over the target tokens' relevance -> G token groups
  4. LoRA fine-tuning; each step weights the group losses L(g) by Q = softmax(L(g) / tau) (Eq. 5):
     token NLL -> loss.gdrt_loss (or loss.sft_loss, Eq. 1) -> backward -> clip -> AdamW step
     (--method also runs the baselines MSL, MSL+GDRT, IFairLRS's Reweight and CFT: nanogdrt/baselines/methods.py;
     they, --grad-accum, --loss-scope and torchrun go through nanogdrt/infra/step.py, with the same losses)
  5. each epoch: NDCG@5 on validation by constrained beam search; the best adapter is kept
  6. the best adapter is tested: NDCG/HR@5,10, MGU/DGU@5,10, top-1 item-group distribution
     (--k: other cut-offs; --beyond-accuracy: Coverage, ARP, Tail and Gini too)
Everything lands in <out>/: results.json, steps.jsonl (one line per optimizer step; TensorBoard's
events too with --tensorboard), best_adapter/ (PEFT format), PNG figures, state/
(the last checkpoint: `--resume` continues an interrupted run and ends where it would have), and
with --snapshot-every N the adapter every N optimizer steps in snapshots/step-<k>/.
"""

import dataclasses
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import nanogdrt
from nanogdrt import files, grouping, loss, metrics, relevance, synthetic
from nanogdrt.analysis import plots
from nanogdrt.baselines import cft, d3, llara, methods, sasrec
from nanogdrt.baselines.methods import GROUP_WEIGHTINGS, METHODS, TargetLoss
from nanogdrt.batches import collate, epoch_batches, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.controlled import ControlledConfig
from nanogdrt.data import load_dataset
from nanogdrt.infra import distributed, step
from nanogdrt.infra.step_log import StepLog
from nanogdrt.infra.validate import check_lora, cutoff_warning
from nanogdrt.infra.config import parse_args
from nanogdrt.infra.resume import StopOnSigterm, claim_run_folder, load_state, save_state
from nanogdrt.llama import Llama, compile_blocks
from nanogdrt.lora import LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import Decoding, recommend, score
from nanogdrt.relevance import DatasetGroups
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


# ----------------------------------------------------------------------------- steps 1-3: data, model, groups

@dataclass
class Setup:
    """What step 1 makes once per run."""
    dataset: object            # nanogdrt.data.Dataset: the titles and the train/valid/test windows
    model_dir: Path
    model: Llama
    tokenizer: Tokenizer
    builder: PromptBuilder     # the dataset's prompt template
    examples: list             # PromptIds of every training window: prompt ids + the target title's ids
    trie: Trie                 # every title's ids: constrained decoding (and MSL's allowed tokens)
    assistant: object | None   # D3's text-free assistant (a SASRec) for the test, if any
    llara: object | None = None  # LLaRA (--sasrec): the projector and the SASRec item table of the prompt's slots


def load_data_and_model(cfg, say) -> Setup:
    """The dataset, the base model, its tokenizer and prompt template, the training examples,
    the trie of the titles and D3's assistant."""
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_file=cfg.train_file,
                           train_samples=cfg.train_samples, valid_samples=cfg.valid_users,
                           test_samples=cfg.test_users, seed=cfg.seed, skip_bad=cfg.skip_bad,
                           synthetic=synthetic.SMALL if cfg.synthetic_size == "small" else None,
                           controlled=(ControlledConfig(seed=cfg.world_seed, shortcut=cfg.shortcut)
                                       if cfg.dataset == "controlled" else None))
    rec = llara.load_sasrec(cfg.sasrec, dataset.titles, cfg.device) if cfg.sasrec else None   # before the LLM
    model_dir = Path(cfg.model) if cfg.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    tokenizer = Tokenizer(model_dir)
    builder = (PromptBuilder(tokenizer, dataset.template) if rec is None
               else llara.HybridPromptBuilder(tokenizer, dataset.template))
    say(f"{cfg.dataset}: {len(dataset.titles)} items, {len(dataset.train)} train / {len(dataset.valid)} "
        f"valid / {len(dataset.test)} test windows; model {model_dir}; method {cfg.method}")
    # D3's text-free assistant (a SASRec) for the test; bad D3 options fail here, before training.
    assistant = sasrec.load(cfg.assistant, device=cfg.device) if cfg.assistant else None
    d3.decoding(cfg.decoding, cfg.alpha, assistant, list(dataset.titles))
    soft = None if rec is None else llara.LLaRA(rec, model.config.hidden_size, builder.placeholder).to(cfg.device)
    examples = (make_examples(builder, dataset.train, dataset.titles) if soft is None
                else llara.training_examples(builder, dataset.train, dataset.titles))   # slots: -(item + 1)
    return Setup(dataset, model_dir, model, tokenizer, builder, examples, Trie.from_titles(dataset.titles, builder),
                 assistant, soft)


def relevance_groups(run: Setup, cfg, cached=True, dist=None) -> DatasetGroups:
    """Eq. 2/3 under `run.model`: the token groups of every training example (§3.2), the item
    groups of the fairness metrics, and each training example's token relevance."""
    return relevance.dataset_groups(run.model, run.builder, run.dataset, cfg.groups, cfg.grouping, cfg.seed,
                                    cached=cached, shard=dist)


def regroup_or_restore(run: Setup, cfg, state, groups: DatasetGroups, dist) -> DatasetGroups:
    """--regroup-every-epoch, at the start of every epoch after the first: Eq. 3 re-scored under
    the current model (not cached: no other run has this model) and the tokens regrouped; both
    are kept in the checkpoint. A run resumed mid-epoch takes them from there instead, because
    the model that scored them at the epoch's start no longer exists. The item groups stay."""
    lengths = [len(g) for g in groups.token_groups]
    if state["batch"] > 0 and "token_groups" in state:
        return groups._replace(token_groups=list(torch.tensor(state["token_groups"]).split(lengths)),
                               token_relevance=list(torch.tensor(state["token_relevance"]).split(lengths)))
    run.model.eval()
    with torch.compiler.set_stance("force_eager"):  # as in evaluate: --compile is for training steps
        new = relevance_groups(run, cfg, cached=False, dist=dist)
    run.model.train()
    state["token_groups"] = torch.cat(new.token_groups).tolist()
    state["token_relevance"] = torch.cat(new.token_relevance).tolist()
    return groups._replace(token_groups=new.token_groups, token_relevance=new.token_relevance)


# ----------------------------------------------------------------------------- step 4: what training needs

@dataclass
class Training:
    """What step 4 trains with, besides the model."""
    lora: LoRAConfig
    data: step.StepData          # what step.train_step reads per example (MSL's nodes, Reweight's weights)
    net: torch.nn.Module         # TargetLoss: step.train_step's forward, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    method_log: dict             # results.json "method": what the method computed once (method_setup)


def method_setup(cfg, run: Setup, item_group, say):
    """What a method needs once per run, and what it logs about it (results.json "method"):
    MSL's trie nodes of every target token, Reweight's example weights (over IFairLRS's popularity
    groups, or Eq. 2's item groups with --reweight-groups eq2), CFT's counterfactual prompt (checked
    against every training title)."""
    method, nodes, weight, prompt, log = METHODS[cfg.method], None, None, None, {}
    if method.per_token == "msl":
        run.trie.to(cfg.device)                             # the allowed sets are looked up on the device
        nodes = methods.target_nodes_of(run.trie, run.examples)
        log["single_allowed_token_share"] = methods.single_continuation_share(run.trie, nodes)
        log["tau_msl"] = cfg.tau_msl
        say(f"MSL: {log['single_allowed_token_share']:.1%} of the target positions allow a single token")
    if method.weighting == "examples":
        if cfg.reweight_groups == "popularity":
            item_group = popularity_of(cfg, run.dataset.titles)
        n_item_groups = max(item_group.values())
        group_w, weight = methods.reweight_example_weights(run.dataset.train, item_group, n_item_groups,
                                                           cfg.reweight_power)
        log.update(item_groups={"eq2": "Eq. 2", "popularity": "IFairLRS popularity"}[cfg.reweight_groups],
                   power=cfg.reweight_power, group_weights=group_w.tolist(),
                   example_weight_min=float(weight.min()), example_weight_max=float(weight.max()))
        say(f"Reweight: example weights {log['example_weight_min']:.3f} .. {log['example_weight_max']:.3f}")
    if method.per_token == "cft":
        ids = cft.counterfactual_prompt(run.builder, run.dataset.template,
                                        [run.dataset.titles[x.target] for x in run.dataset.train])
        prompt = torch.tensor(ids, device=cfg.device)
        log.update(alpha=cft.ALPHA, beta=cft.BETA, counterfactual_prompt=run.tokenizer.decode(ids))
        say(f"CFT: alpha {cft.ALPHA}, weights 1 -> {cft.BETA}; counterfactual prompt of {len(ids)} tokens")
    if run.llara is not None:
        log["llara"] = llara.describe(run.llara, cfg.sasrec)
    return nodes, weight, prompt, log


def popularity_of(cfg, titles) -> dict[int, int]:
    """IFairLRS's popularity groups, counted over the dataset's whole training file (load_dataset's
    rule: train.csv, else the largest train*.csv), not the run's sample: IFairLRS counts every
    interaction, and a 1,000-window sample leaves most items tied at zero."""
    full = load_dataset(cfg.dataset, data_dir=cfg.data_dir, skip_bad=cfg.skip_bad,
                        synthetic=synthetic.SMALL if cfg.synthetic_size == "small" else None,
                        controlled=(ControlledConfig(seed=cfg.world_seed, shortcut=cfg.shortcut)
                                    if cfg.dataset == "controlled" else None))
    return grouping.popularity_groups(full.train, titles)


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


def setup_training(cfg, run: Setup, item_group, dist, say) -> Training:
    """LoRA on the frozen model, what the method needs (method_setup), the module whose forward
    gives the per-token losses (DDP-wrapped under torchrun) and AdamW over the LoRA parameters."""
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=tuple(cfg.lora_targets))
    inject_lora(run.model, lora)
    run.model.to(cfg.device)
    if cfg.compile:  # after inject_lora: the compiled blocks then trace the LoRA layers too
        compile_blocks(run.model)
    nodes, example_weight, prompt, method_log = method_setup(cfg, run, item_group, say)
    data = step.StepData(run.examples, nodes, example_weight, run.tokenizer.pad_id)
    if run.llara is not None and dist.enabled:
        raise ValueError("--method llara under torchrun is not supported yet (text-only steps leave the projector "
                         "unused, which DDP refuses)")
    net = (TargetLoss(run.model, METHODS[cfg.method].per_token, run.trie, cfg.tau_msl, prompt)
           if run.llara is None
           else llara.LLaRALoss(run.model, run.llara))
    net = data_parallel(net, cfg, dist, say)
    trainable = lora_parameters(run.model) + (list(run.llara.projector.parameters()) if run.llara else [])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Training(lora, data, net, optimizer, method_log)


def start_or_resume(out, cfg, model, optimizer, dist, say) -> dict:
    """A fresh training state, or the one in <out>/state with --resume (weights, optimizer, RNG)."""
    if cfg.resume:
        state = load_state(out / "state", model, optimizer, device=cfg.device, rank=dist.rank)
        say(f"resumed from {out / 'state'}: epoch {state['epoch'] + 1}, step {state['step']}")
        return state
    if (out / "state").exists():   # never overwrite a run by accident
        raise SystemExit(f"{out / 'state'} exists: pass --resume to continue that run, or choose another --out")
    return {"epoch": 0, "batch": 0, "step": 0, "steps": [], "epochs": [], "best": None}


def epoch_steps(examples, cfg, epoch, world) -> list[list[list[int]]]:
    """The optimizer steps of an epoch, each a list of global micro-batches of example indices.
    The same (seed, epoch) gives the same batches, so a resumed epoch skips exactly the steps
    already taken. Batches are global: each rank takes its slice in step.train_step."""
    lengths = [len(ex.ids) for ex in examples] if cfg.group_by_length else None
    batches = epoch_batches(len(examples), cfg.batch_size * world, cfg.seed, epoch, lengths)
    return [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]


# ----------------------------------------------------------------------------- steps 4-5: the training loop

def sft_or_gdrt(model, ids, mask, groups, cfg) -> dict:
    """Forward and backward of SFT (Eq. 1) or GDRT (Eq. 5) on one micro-batch in one process, as
    §3 writes it. Returns what a step logs: the loss, L(g) of every group (0 without tokens; Fig.
    6) and Q(g) (0 for SFT). step.train_step logs the same numbers for it (tests/test_train.py)."""
    hidden = model.hidden_states(ids)                                   # (B, T, C) right padding: no mask
    nll = loss.token_nll(model.logits, hidden, ids, mask).nll           # (N,) the target tokens only
    token_group = groups[mask]                                          # (N,) 1..G
    if cfg.method == "gdrt":
        out = loss.gdrt_loss(nll, token_group, cfg.groups, cfg.tau)     # Eq. 5: sum_g Q(g) L(g)
        objective, q = out.loss, out.q                                  # Q = softmax(L / tau), constant
    else:
        objective, q = loss.sft_loss(nll), torch.zeros(cfg.groups)      # Eq. 1: the mean NLL
    objective.backward()
    group_loss = loss.group_sums_and_counts(nll.detach(), token_group, cfg.groups).mean()
    return {"loss": objective.item(), "q": q.cpu(), "group_loss": group_loss.cpu()}


def method_postfix(cfg, log, method_log) -> dict:
    """What the progress bar shows of the method: Q(g) each step, or the run's constants."""
    if METHODS[cfg.method].weighting in GROUP_WEIGHTINGS:
        return {"Q": " ".join(f"{q:.2f}" for q in log["q"].tolist())}
    if "example_weight_min" in method_log:
        return {"w": f"{method_log['example_weight_min']:.2f}..{method_log['example_weight_max']:.2f}"}
    if "single_allowed_token_share" in method_log:
        return {"single": f"{method_log['single_allowed_token_share']:.0%}"}
    return {}


def train(cfg, run: Setup, training: Training, groups: DatasetGroups, state, dist):
    """Steps 4-5 from `state` on: the optimizer steps of every epoch, each epoch validated and
    the best adapter kept. Returns (stopped early, by SIGTERM, the token groups at the end)."""
    out, model, optimizer = Path(cfg.out), run.model, training.optimizer
    # SFT and GDRT on one micro-batch in one process train right here; the baselines, --grad-accum,
    # --loss-scope micro / rank-micro and torchrun go through step.py, with the same loss functions.
    plain = cfg.method in ("sft", "gdrt") and cfg.grad_accum == 1 and cfg.loss_scope == "step" and not dist.enabled
    step_cfg = step.StepConfig(cfg.method, cfg.groups, cfg.tau, cfg.loss_scope, cfg.device)
    # Training time is kept in the checkpoint so that a resumed run reports the whole run's time.
    t, trained_before = time.perf_counter(), state.get("train_and_valid_s", 0.0)

    def checkpoint():
        state["train_and_valid_s"] = trained_before + time.perf_counter() - t
        rank_rng = dist.gather([distributed.rng_state(cfg.device)], dist.world) if dist.enabled else None
        if dist.main:
            save_state(out / "state", model, optimizer, state, training.lora, cfg, rank_rng)
            if run.llara is not None:
                run.llara.save(out / "state")

    # SIGTERM (preemption, a deadline) stops after the current step with a checkpoint: no step lost.
    stopped, sigterm = False, StopOnSigterm(active=not dist.enabled)
    # <out>/steps.jsonl (and TensorBoard): one line per step, appended as training goes.
    step_log = StepLog(out, state["step"], run.examples, optimizer, METHODS[cfg.method].weighting in GROUP_WEIGHTINGS,
                       cfg.tensorboard, active=dist.main)
    with sigterm, step_log:
        for epoch in range(state["epoch"], cfg.epochs):
            if cfg.regroup_every_epoch and epoch > 0:
                groups = regroup_or_restore(run, cfg, state, groups, dist)
            steps = epoch_steps(run.examples, cfg, epoch, dist.world)
            # A run resumed mid-epoch starts at the step after the checkpoint's.
            bar = tqdm(range(state["batch"], len(steps)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       initial=state["batch"], total=len(steps), disable=not dist.main)
            for b in bar:
                if run.llara is not None:   # LLaRA's curriculum: hybrid prompts this step with p = step / total
                    run.llara.start_step(state["step"] + 1, cfg.epochs * len(steps), cfg.seed)
                started = time.perf_counter()
                if plain:
                    ids, mask, token_groups = collate(run.examples, groups.token_groups, steps[b][0],
                                                      training.data.pad_id, cfg.device)     # (B, T) each
                    log = sft_or_gdrt(model, ids, mask, token_groups, cfg)
                else:
                    log = step.train_step(training.net, steps[b], training.data, groups.token_groups, step_cfg, dist)
                if not math.isfinite(log["loss"]):   # stop before a NaN reaches the LoRA weights
                    raise SystemExit(f"loss is {log['loss']} at epoch {epoch + 1}, step {state['step'] + 1}: stopping. "
                                     f"The last good checkpoint is {out / 'state'} (--resume); try a lower --lr.")
                torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_s = time.perf_counter() - started
                state["step"], state["batch"] = state["step"] + 1, b + 1
                if cfg.snapshot_every and state["step"] % cfg.snapshot_every == 0 and dist.main:
                    # The adapter as it is now, for curves over training steps (Fig. 4/9); atomic
                    # per file, so a resumed run rewrites a half-written snapshot whole.
                    save_adapter(model, out / "snapshots" / f"step-{state['step']}", training.lora,
                                 str(run.model_dir))
                    if run.llara is not None:
                        run.llara.save(out / "snapshots" / f"step-{state['step']}")
                # The log of every step lives in the checkpoint, so a resumed run reports all of them.
                state["steps"].append({"step": state["step"], "loss": log["loss"],
                                       "group_loss": log["group_loss"].tolist(), "q": log["q"].tolist(),
                                       **({"hybrid": run.llara.hybrid} if run.llara is not None else {})})
                step_log.write(state["steps"][-1], epoch + 1, steps[b], step_s,
                               elapsed_s=trained_before + time.perf_counter() - t)
                bar.set_postfix(loss=f"{log['loss']:.3f}", **method_postfix(cfg, log, training.method_log))
                stopped = (cfg.max_steps is not None and state["step"] >= cfg.max_steps) or sigterm.requested
                if stopped or state["step"] % cfg.save_every == 0:
                    checkpoint()
                if stopped:
                    break
            if stopped:
                break
            # Step 5: choose on validation (the paper's protocol), never on test.
            if validate(run, groups.item_group, cfg, epoch, state, dist) and dist.main:
                save_adapter(model, out / "best_adapter", training.lora, str(run.model_dir))
                if run.llara is not None:
                    run.llara.save(out / "best_adapter")
            state["epoch"], state["batch"] = epoch + 1, 0
            checkpoint()
    return stopped, sigterm.requested, groups


# ----------------------------------------------------------------------------- steps 5-6: evaluation

def measures(cfg, dataset) -> dict:
    """What `score` computes besides the defaults: the cut-offs (--k) and, with --beyond-accuracy,
    the catalogue's size and each item's popularity phi, its count among the training targets."""
    if not cfg.beyond_accuracy:
        return {"ks": cfg.k}
    return {"ks": cfg.k, "n_items": len(dataset.titles),
            "popularity": metrics.target_popularity(x.target for x in dataset.train)}


def evaluate(run: Setup, interactions, item_group, decoding: Decoding, desc, cfg, dist=distributed.Dist()):
    """Top-K for every user (split across data-parallel ranks, gathered in order on all) + metrics."""
    run.model.eval()                                       # no LoRA dropout while decoding
    if run.llara is not None:                              # LLaRA decodes the hybrid prompt: slots projected
        decoding = dataclasses.replace(decoding, soft_tokens=run.llara.soft_tokens)
    # --compile is for the training step: decoding's cached, ever-changing shapes would only
    # recompile, so compiled blocks run eagerly here (a no-op when nothing is compiled).
    with torch.compiler.set_stance("force_eager"):
        records = recommend(run.model, run.builder, run.trie, interactions, run.dataset.titles, decoding,
                            progress=dist.main, dist=dist)
    run.model.train()
    result = score(records, interactions, run.dataset.titles, item_group, **measures(cfg, run.dataset))
    top1 = [r["topk_item_ids"][0] for r in records if r["topk_item_ids"]]
    result["top1_group_distribution"] = metrics.group_distribution(top1, item_group).tolist()
    if dist.main:
        print(f"{desc}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result, records


def validate(run: Setup, item_group, cfg, epoch, state, dist) -> bool:
    """The metrics on validation after `epoch`, logged in `state`; True when NDCG@5 is the best yet."""
    decoding = Decoding(beams=cfg.beams, top_k=max(10, *cfg.k), batch_size=cfg.eval_batch_size)
    result, _ = evaluate(run, run.dataset.valid, item_group, decoding, f"epoch {epoch + 1} valid", cfg, dist)
    state["epochs"].append({"epoch": epoch + 1, "step": state["step"], "valid": result,
                            "top1_group1_share": result["top1_group_distribution"][0]})
    if state["best"] is None or result["NDCG@5"] > state["best"]["NDCG@5"]:   # ties keep the earlier epoch
        state["best"] = {"epoch": epoch + 1, "NDCG@5": result["NDCG@5"]}
        return True
    return False


def test_best(run: Setup, item_group, cfg, dist):
    """The test split's metrics and per-user records under the best epoch's adapter."""
    dist.barrier()                                          # rank 0 has written best_adapter/
    load_adapter(run.model, Path(cfg.out) / "best_adapter")
    if run.llara is not None:
        run.llara.load(Path(cfg.out) / "best_adapter")
    decoding = d3.decoding(cfg.decoding, cfg.alpha, run.assistant, run.trie.item_ids(), beams=cfg.beams,
                           top_k=max(10, *cfg.k), batch_size=cfg.eval_batch_size)   # lists of 10, or --k's largest
    return evaluate(run, run.dataset.test, item_group, decoding, "test", cfg, dist)


# ----------------------------------------------------------------------------- results

def write_results(cfg, run: Setup, groups: DatasetGroups, state, tested, times, world):
    """The test predictions (one line per user, e.g. for bootstrap intervals), results.json
    (everything a report needs, the config included), the run's figures and the table."""
    out, (test, records), dataset = Path(cfg.out), tested, run.dataset
    files.write_jsonl(out / "test_predictions.jsonl", records)
    target_dist = metrics.group_distribution([x.target for x in dataset.test], groups.item_group).tolist()
    token_group, rel = torch.cat(groups.token_groups), torch.cat(groups.token_relevance)
    results = {
        "config": asdict(cfg),
        "versions": {"nanogdrt": getattr(nanogdrt, "__version__", "0.1.0"), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "relevance_model": ("current model, re-scored every epoch" if cfg.regroup_every_epoch
                            else f"{run.model_dir} before fine-tuning (no adapter)"),
        "dataset": {"name": dataset.name, "source": dataset.source, "items": len(dataset.titles),
                    "train": len(dataset.train), "valid": len(dataset.valid), "test": len(dataset.test),
                    "skipped": dataset.skipped},
        "token_groups": {"counts": torch.bincount(token_group, minlength=cfg.groups + 1)[1:].tolist(),
                         "mean_relevance": [float(rel[token_group == g].mean()) for g in range(1, cfg.groups + 1)]},
        "data_parallel_ranks": world,
        "method": state["method"],
        "best_epoch": state["best"]["epoch"],
        "epochs": state["epochs"],
        "test": test,
        "test_target_group_distribution": target_dist,
        "steps": state["steps"],
        "wall_times": times,
    }
    if cfg.beyond_accuracy:     # what ARP@K and Tail@K count against (nanogdrt/metrics.py)
        phi = measures(cfg, dataset)["popularity"]
        results["beyond_accuracy"] = {"catalogue_items": len(dataset.titles), "popularity": "training-window targets",
                                      "training_windows": len(dataset.train), "items_with_phi": len(phi),
                                      "head_items": len(metrics.head_items(phi))}
    files.write_json(out / "results.json", results)
    plots.run_figures(out, cfg.method, cfg.tau, state["steps"], test["top1_group_distribution"], target_dist)
    print_table(cfg, test, times)


def pause_message(state, stopped: bool, signalled: bool = False) -> str:
    """What a run that ends before its test says: SIGTERM, --max-steps reached, or --no-test."""
    if stopped and signalled:
        return f"stopped by SIGTERM after {state['step']} steps (checkpointed); continue with --resume"
    if stopped:
        return f"stopped after {state['step']} steps (--max-steps); continue with --resume"
    return (f"trained; best valid NDCG@5 {state['best']['NDCG@5']:.4f} at epoch {state['best']['epoch']}. "
            f"Test later: the same command with --resume instead of --no-test")


def print_table(cfg, test, times):
    keys = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]
    print("\n| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    print(f"| {cfg.method.upper()} | " + " | ".join(f"{test[k]:.4f}" for k in keys) + " |")
    if cfg.k != [5, 10] or cfg.beyond_accuracy:   # --k, --beyond-accuracy: one row per cut-off
        names = ["NDCG", "HR", "MGU", "DGU"] + (["Coverage", "ARP", "Tail", "Gini"] if cfg.beyond_accuracy else [])
        print("\n| K | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
        for k in cfg.k:
            print(f"| {k} | " + " | ".join(f"{test[f'{n}@{k}']:.4f}" for n in names) + " |")
    print(f"wall time: {times['total_s']:.0f} s (grouping {times['grouping_s']:.0f} s, "
          f"train+valid {times['train_and_valid_s']:.0f} s, test {times['test_s']:.0f} s); "
          f"results in {cfg.out}/results.json")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    cfg = parse_args(argv, __doc__.split("\n\n")[0])   # every option: nanogdrt/infra/config.py
    # LoRA targets and rank against the model's config.json: before the lock, the data and the model.
    check_lora(cfg.model or ensure_embedded_checkpoint(), cfg.lora_targets, cfg.lora_r)
    dist = distributed.init(cfg.device)                    # torchrun: one rank of N; else rank 0 of 1
    cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, dist))   # cuda -> cuda:<local rank>
    say = print if dist.main else (lambda *args, **kwargs: None)
    if cutoff_warning(cfg.k, cfg.beams):                   # --beams below 10: @10 counts the top --beams only
        say(cutoff_warning(cfg.k, cfg.beams))
    out, times, t0 = Path(cfg.out), {}, time.perf_counter()
    # Before any work: --out writable and locked for this run (a second run is refused), its
    # checkpoint present when resuming, absent otherwise. The lock is held until main() returns.
    lock = claim_run_folder(out, cfg.resume) if dist.main else None   # noqa: F841 (held, not used)
    torch.manual_seed(cfg.seed)                            # LoRA init and dropout follow from --seed

    # Step 1: the data, the base model, the prompt template: each window's prompt and target ids.
    run = load_data_and_model(cfg, say)

    # Steps 2-3: relevance under the model at the start of fine-tuning (no adapter), then groups.
    t = time.perf_counter()
    groups = relevance_groups(run, cfg, dist=dist)
    times["grouping_s"] = time.perf_counter() - t

    # Step 4: LoRA on the frozen model; only its parameters are trained, by the method's loss.
    training = setup_training(cfg, run, groups.item_group, dist, say)
    state = start_or_resume(out, cfg, run.model, training.optimizer, dist, say)
    if cfg.resume and run.llara is not None:
        run.llara.load(out / "state")
    state["method"] = training.method_log                  # recomputed by a resumed run: the same numbers
    out.mkdir(parents=True, exist_ok=True)                 # only now: an existing run was refused above
    run.model.train()

    # Steps 4-5: every step token NLL -> Eq. 5 (or Eq. 1) -> backward -> clip -> AdamW; each epoch
    # validated, the best adapter kept.
    t, trained_before = time.perf_counter(), state.get("train_and_valid_s", 0.0)
    stopped, signalled, groups = train(cfg, run, training, groups, state, dist)
    times["train_and_valid_s"] = state.get("train_and_valid_s", time.perf_counter() - t)
    if stopped or cfg.no_test:                               # the same command with --resume goes on
        return say(pause_message(state, stopped, signalled))

    # Step 6: test the best adapter (chosen on validation above), with --decoding.
    t = time.perf_counter()
    tested = test_best(run, groups.item_group, cfg, dist)
    times["test_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0 + trained_before   # + earlier processes of a resumed run
    if dist.main:
        write_results(cfg, run, groups, state, tested, times, dist.world)


if __name__ == "__main__":
    clean = False
    try:
        main()
        clean = True
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file, line or field
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown(clean)
