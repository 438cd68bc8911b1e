"""SPRec [22] (Gao et al., WWW 2025, "SPRec: Leveraging Self-Play to Debias Preference Alignment for
Large Language Model-based Recommendations"), a baseline of Table 2: self-play DPO after SFT.

    python -m nanogdrt.baselines.sprec --from-adapter runs/toy-sft/best_adapter --dataset toy \
        --data-dir ../shared/data/toy --iterations 2 --out runs/toy-sprec

It starts from an SFT adapter (train.py --method sft), as the code starts from its SFT model. Each
iteration t = 1..N, from the model M(t-1) it starts with:
  1. a seeded sample of --windows training windows (seed, t);
  2. negatives: M(t-1) decodes every window's prompt by trie-constrained beam search
     (--negative-beams); the rejected title is its best title that is not the target;
  3. one SFT epoch on those windows (Eq. 1, the target tokens): M'(t);
  4. one DPO epoch (nanogdrt/baselines/dpo.py, Eq. 7) on (prompt, true title, rejected title)
     against M'(t) frozen, the model at the start of this epoch: M(t);
  5. validation NDCG@5 of M(t); the best iteration's adapter is kept in best_adapter/.
The best adapter is then tested as train.py tests its best epoch; results.json and
test_predictions.jsonl have train.py's shape (an iteration stands where train.py has an epoch),
so `nanogdrt.analysis.compare` reads the run beside SFT and GDRT. Each phase has its own fresh
AdamW, as each phase of the code is a new HF Trainer.

What the code does (RegionCh/SPRec, commit ad60171; file and lines):
  shell/SPRec.sh   starts from the SFT adapter (L9); each iteration (L22): data_generate.py with
                   the current adapter (L37-47, L44), sft.py from it for 1 epoch (L52-65, L63),
                   whose adapter becomes current (L67), then dpo.py from it (L76-88, L81), whose
                   adapter becomes current (L90). lr 2e-5 for both (L5); 2,048 training and 256
                   DPO validation windows per iteration (L2); the iteration count is an argument.
  data_generate.py samples train + valid + 500 windows with random.sample, unseeded (L38, L103);
                   greedy decoding, 128 new tokens at most (L63-91); the DPO prompt is instruction
                   + input, without the template (L134); chosen = the true response (L135);
                   rejected = the first quoted string of the generation + "\\n" (L136-141), windows
                   without one skipped (L139-140). SFT trains on the first 2,048 (L104).
  dpo.py           the reference = the base model + the adapter the phase starts from (L93-102);
                   beta 0.1 (L126). sft.py: the loss covers the whole text, prompt included
                   (SFTTrainer with a formatting_func and no completion-only collator, L140-148).
docs/baselines.md lists where we depart (the negatives, the template, the loss span, the sizes).
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

from nanogdrt import files, metrics, relevance, synthetic
from nanogdrt.baselines import dpo
from nanogdrt.baselines.methods import TargetLoss
from nanogdrt.batches import epoch_batches, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.infra import step, validate
from nanogdrt.infra.config import DATASET_DEFAULTS
from nanogdrt.infra.resume import claim_run_folder
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, check_adapter, load_adapter, lora_parameters, save_adapter
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import Decoding, recommend, score
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie

# The code's values (SPRec.sh), for the record in results.json and --help.
OFFICIAL = {"windows": 2048, "dpo_valid_windows": 256, "lr": 2e-5, "beta": dpo.BETA,
            "sft_batch": "4 per device x 4 accumulation", "dpo_batch": "2 per device x 4 accumulation",
            "warmup_steps": 20, "negative_decoding": "greedy, unconstrained, 128 new tokens"}


class Run(NamedTuple):
    """What every phase reads: the data, the model (with its LoRA adapter) and how to decode."""
    dataset: object            # nanogdrt.data.RecDataset
    model: Llama
    builder: PromptBuilder
    trie: Trie
    item_group: dict           # Eq. 2's item groups under the base model (MGU/DGU)
    pad_id: int
    lora: LoRAConfig           # the SFT adapter's, for the adapters saved
    model_dir: Path


# ----------------------------------------------------------------------------- one iteration

def sample_windows(train, n: int, seed: int, iteration: int) -> list:
    """A seeded sample of n training windows for `iteration` (all of them when n >= len(train))."""
    g = torch.Generator().manual_seed(seed * 1000 + iteration)
    return [train[i] for i in torch.randperm(len(train), generator=g)[:n].tolist()]


def first_other_title(ranked: list[int], target: int, titles) -> int | None:
    """The best-ranked item whose title is not the target's (titles, not ids: several ids share one
    title in Toy), or None when every ranked title is the target's."""
    return next((i for i in ranked if titles[i] != titles[target]), None)


def rejected_items(run: Run, windows, beams: int, batch_size: int) -> tuple[list[int | None], int]:
    """Step 2: each window's rejected item, the model's own best catalogue title that is not the
    target (no dropout while decoding), and how many windows the model ranked the target first."""
    run.model.eval()
    records = recommend(run.model, run.builder, run.trie, windows, run.dataset.titles,
                        Decoding(beams=beams, top_k=beams, batch_size=batch_size))
    run.model.train()
    titles = run.dataset.titles
    hits = sum(1 for r, x in zip(records, windows) if r["topk_item_ids"] and
               titles[r["topk_item_ids"][0]] == titles[x.target])
    return [first_other_title(r["topk_item_ids"], x.target, titles) for r, x in zip(records, windows)], hits


def optimizer_step(run: Run, loss: float, clip: float, optimizer, where: str):
    """Clip and step, unless the loss is not finite: then stop before a NaN reaches the adapter."""
    if not math.isfinite(loss):
        raise SystemExit(f"loss is {loss} at {where}: stopping (no adapter of this iteration is kept); "
                         f"try a lower --lr")
    torch.nn.utils.clip_grad_norm_(lora_parameters(run.model), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sft_epoch(run: Run, examples, args, iteration: int, log: list):
    """Step 3: one epoch of Eq. 1 on `examples` (step.train_step, the loss train.py's SFT uses)."""
    net = TargetLoss(run.model)
    data = step.StepData(examples, None, None, run.pad_id)
    one_group = [torch.ones(e - s, dtype=torch.long) for s, e in (ex.target for ex in examples)]
    cfg = step.StepConfig("sft", 1, 1.0, "step", args.device)
    optimizer = torch.optim.AdamW(lora_parameters(run.model), lr=args.lr, weight_decay=0.0)
    run.model.train()                                         # LoRA dropout on, as in the code's SFT
    lengths = [len(ex.ids) for ex in examples]
    for batch in epoch_batches(len(examples), args.batch_size, args.seed, 2 * iteration, lengths):
        out = step.train_step(net, [batch], data, one_group, cfg)
        optimizer_step(run, out["loss"], args.clip, optimizer, f"iteration {iteration}, SFT step {len(log) + 1}")
        log.append({"iteration": iteration, "phase": "sft", "step": len(log) + 1, "loss": out["loss"]})


def dpo_epoch(run: Run, chosen, rejected, args, iteration: int, log: list) -> torch.Tensor:
    """Step 4: one epoch of DPO (Eq. 7) against the model as it is now, frozen: its log-probs of
    every pair are computed once, before the first step (dpo.py says why that is exact). Returns
    them, (n, 2): the reference's log pi_ref of each chosen and rejected title."""
    net = TargetLoss(run.model)
    ref = dpo.reference_log_probs(net, chosen, rejected, args.dpo_batch_size, run.pad_id, args.device)
    optimizer = torch.optim.AdamW(lora_parameters(run.model), lr=args.lr, weight_decay=0.0)
    run.model.eval()                                          # trl disables dropout for DPO
    lengths = [max(len(c.ids), len(r.ids)) for c, r in zip(chosen, rejected)]
    for batch in epoch_batches(len(chosen), args.dpo_batch_size, args.seed, 2 * iteration + 1, lengths):
        pc, pr = dpo.pair_log_probs(net, chosen, rejected, batch, run.pad_id, args.device)
        out = dpo.dpo_loss(pc, pr, ref[batch, 0].to(pc.device), ref[batch, 1].to(pc.device), args.beta)
        out.loss.backward()
        optimizer_step(run, out.loss.item(), args.clip, optimizer, f"iteration {iteration}, DPO step {len(log) + 1}")
        log.append({"iteration": iteration, "phase": "dpo", "step": len(log) + 1, "loss": out.loss.item(),
                    "margin": out.margin.mean().item(), "accuracy": (out.margin > 0).float().mean().item()})
    run.model.train()
    return ref


def iteration(run: Run, args, t: int, log: list, out: Path) -> dict:
    """Steps 1-4 of iteration t; the pairs go to <out>/pairs/it-<t>.jsonl. Returns its record."""
    times, clock = {}, time.perf_counter()
    windows = sample_windows(run.dataset.train, args.windows, args.seed, t)
    negatives, top1_hits = rejected_items(run, windows, args.negative_beams, args.eval_batch_size)
    kept = [(x, neg) for x, neg in zip(windows, negatives) if neg is not None]
    files.write_jsonl(out / "pairs" / f"it-{t}.jsonl", [{"row": x.row, "target_item_id": x.target,
                                                         "rejected_item_id": neg} for x, neg in kept])
    times["negatives_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    titles = run.dataset.titles
    sft_epoch(run, make_examples(run.builder, windows, titles), args, t, log)
    times["sft_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    chosen = make_examples(run.builder, [x for x, _ in kept], titles)
    rejected = make_examples(run.builder, [replace(x, target=neg) for x, neg in kept], titles)
    if kept:
        dpo_epoch(run, chosen, rejected, args, t, log)
    times["dpo_s"] = time.perf_counter() - clock
    return {"iteration": t, "windows": len(windows), "pairs": len(kept), "no_negative": len(windows) - len(kept),
            "top1_is_target": top1_hits, "seconds": times}


# ----------------------------------------------------------------------------- evaluation and results

def evaluate(run: Run, interactions, args, desc: str):
    """Top-K of every user by constrained beam search (train.py's evaluation) and the metrics."""
    run.model.eval()
    records = recommend(run.model, run.builder, run.trie, interactions, run.dataset.titles,
                        Decoding(beams=args.beams, batch_size=args.eval_batch_size), progress=True)
    run.model.train()
    result = score(records, interactions, run.dataset.titles, run.item_group)
    top1 = [r["topk_item_ids"][0] for r in records if r["topk_item_ids"]]
    result["top1_group_distribution"] = metrics.group_distribution(top1, run.item_group).tolist()
    print(f"{desc}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result, records


def versions() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def write_results(args, run: Run, log: dict, tested, times: dict):
    """test_predictions.jsonl and results.json, in train.py's shape."""
    out, (test, records), ds = Path(args.out), tested, run.dataset
    files.write_jsonl(out / "test_predictions.jsonl", records)
    results = {
        "config": vars(args), "versions": versions(),
        "dataset": {"name": ds.name, "source": ds.source, "items": len(ds.titles), "train": len(ds.train),
                    "valid": len(ds.valid), "test": len(ds.test), "skipped": ds.skipped},
        "method": log["method"], "best_epoch": log["best"]["epoch"], "epochs": log["epochs"],
        "test": test,
        "test_target_group_distribution": metrics.group_distribution([x.target for x in ds.test],
                                                                     run.item_group).tolist(),
        "steps": log["steps"], "wall_times": times,
    }
    files.write_json(out / "results.json", results)
    keys = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]
    print("\n| method | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    print("| SPRec | " + " | ".join(f"{test[k]:.4f}" for k in keys) + " |")
    print(f"wall time {times['total_s']:.0f} s; results in {out}/results.json")


# ----------------------------------------------------------------------------- the command line

def _parser() -> argparse.ArgumentParser:
    N = validate.number
    p = argparse.ArgumentParser(
        prog="python -m nanogdrt.baselines.sprec", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="SPRec: from an SFT adapter, iterations of (the model's own top title as the rejected "
                    "answer, one SFT epoch, one DPO epoch); the iteration is chosen on validation NDCG@5, "
                    "then tested. The defaults are REDUCED to fit a CPU (the code's values in brackets).")
    p.add_argument("--from-adapter", required=True,
                   help="the SFT adapter to start from (a train.py --method sft run's best_adapter/)")
    p.add_argument("--dataset", default="synthetic", choices=["toy", "clothing", "book", "synthetic"])
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    p.add_argument("--train-file", default=None, help="which train*.csv of the folder (toy: train_1000.csv, "
                                                      "as train.py)")
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"], help="synthetic only, as train.py")
    p.add_argument("--model", default=None, help="Hugging Face Llama folder (default: embedded SmolLM2-135M)")
    p.add_argument("--iterations", type=N(int, min=1), default=2,
                   help="self-play iterations (reduced; SPRec.sh takes the count as an argument)")
    p.add_argument("--windows", type=N(int, min=1), default=256,
                   help="training windows sampled per iteration (reduced; the code: 2,048 + 256 for DPO validation)")
    p.add_argument("--negative-beams", type=N(int, min=2), default=2,
                   help="beam width that decodes the rejected titles: its best title that is not the target "
                        "(>= 2 so that one exists; the code: greedy, unconstrained)")
    p.add_argument("--beta", type=N(float, above=0), default=dpo.BETA, help="DPO's beta (the code's)")
    p.add_argument("--lr", type=N(float, above=0), default=OFFICIAL["lr"],
                   help="AdamW learning rate of both phases (the code's, without its 20-step warm-up)")
    p.add_argument("--batch-size", type=N(int, min=1), default=8, help="windows per SFT step [4 x 4 accumulation]")
    p.add_argument("--dpo-batch-size", type=N(int, min=1), default=4, help="pairs per DPO step [2 x 4 accumulation]")
    p.add_argument("--clip", type=N(float, above=0), default=1.0, help="gradient-norm clip (HF's default)")
    p.add_argument("--valid-users", type=N(int, min=1), default=None, help="seeded validation sample (default: "
                                                                           "train.py's per dataset)")
    p.add_argument("--test-users", type=N(int, min=1), default=None, help="seeded test sample (default: "
                                                                          "train.py's per dataset)")
    p.add_argument("--beams", type=N(int, min=1), default=10, help="beam width of validation and test (the paper's)")
    p.add_argument("--eval-batch-size", type=N(int, min=1), default=32, help="users decoded at once")
    p.add_argument("--seed", type=N(int, min=0), default=0, help="seed of the samples, batches and dropout")
    p.add_argument("--device", type=validate.device, default="cpu", help="cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-sprec)")
    return p


def sft_run_config(adapter) -> dict | None:
    """The config of the train.py run that wrote `adapter` (its results.json beside it), if any."""
    for name in ("results.json", "train_results.json"):
        f = Path(adapter).parent / name
        if f.is_file():
            try:
                return json.loads(f.read_text()).get("config")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{f}: not a train.py results.json") from None
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked before any work: ranges, --out writable, the adapter readable and trained
    on this base model and (when its run's results.json is beside it) on this dataset."""
    p = _parser()
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS.get(args.dataset, {}).items():
        if key in ("train_file", "valid_users", "test_users") and getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"runs/{args.dataset}-sprec"
    args.method = "sprec"                                 # results.json "config" names the row
    validate.check_output(p, args.out, "folder")
    try:
        check_adapter(args.from_adapter, args.model or ensure_embedded_checkpoint())
        sft = sft_run_config(args.from_adapter)
    except (OSError, ValueError) as e:
        p.error(f"--from-adapter {args.from_adapter}: {e}")
    if sft and sft.get("dataset") not in (None, args.dataset):
        p.error(f"--from-adapter {args.from_adapter}: its run trained on {sft['dataset']!r}, --dataset is "
                f"{args.dataset!r}")
    return args


def load(args) -> Run:
    """The data, the base model (Eq. 2's item groups are scored under it, as train.py does), then
    the SFT adapter on it."""
    ds = load_dataset(args.dataset, data_dir=args.data_dir, train_file=args.train_file,
                      valid_samples=args.valid_users, test_samples=args.test_users, seed=args.seed,
                      synthetic=synthetic.config_for(args.dataset, args.synthetic_size))
    model_dir = Path(args.model) if args.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = Tokenizer(model_dir)
    builder = PromptBuilder(tokenizer, ds.name)
    item_group = relevance.dataset_item_groups(model, builder, ds)          # before the adapter
    lora = load_adapter(model, args.from_adapter)
    model.to(args.device)
    print(f"{ds.name}: {len(ds.titles)} items, {len(ds.train)} train / {len(ds.valid)} valid / {len(ds.test)} "
          f"test windows; SPRec from {args.from_adapter}, {args.iterations} iteration(s) of {args.windows} windows")
    return Run(ds, model, builder, Trie.from_titles(ds.titles, builder), item_group, tokenizer.pad_id, lora,
               model_dir)


def self_play(run: Run, args) -> dict:
    """Iterations 1..N, each validated; the best adapter (NDCG@5, ties keep the earlier) is saved."""
    out = Path(args.out)
    start, _ = evaluate(run, run.dataset.valid, args, "start (the SFT adapter) valid")
    log = {"steps": [], "epochs": [], "best": None,
           "method": {"name": "SPRec", "from_adapter": str(args.from_adapter),
                      "sft_run_config": sft_run_config(args.from_adapter), "start_valid": start,
                      "lora": asdict(run.lora), "official": OFFICIAL, "iterations": []}}
    for t in range(1, args.iterations + 1):
        record = iteration(run, args, t, log["steps"], out)
        clock = time.perf_counter()
        result, _ = evaluate(run, run.dataset.valid, args, f"iteration {t} valid")
        record["seconds"]["valid_s"] = time.perf_counter() - clock
        log["method"]["iterations"].append(record)
        log["epochs"].append({"epoch": t, "step": len(log["steps"]), "valid": result,
                              "top1_group1_share": result["top1_group_distribution"][0]})
        if log["best"] is None or result["NDCG@5"] > log["best"]["NDCG@5"]:
            log["best"] = {"epoch": t, "NDCG@5": result["NDCG@5"]}
            save_adapter(run.model, out / "best_adapter", run.lora, str(run.model_dir))
        s = record["seconds"]
        print(f"iteration {t}: {record['pairs']} pairs ({record['top1_is_target']} windows ranked the target "
              f"first); negatives {s['negatives_s']:.0f} s, SFT {s['sft_s']:.0f} s, DPO {s['dpo_s']:.0f} s")
    return log


def main(argv=None):
    args = parse_args(argv)                                # every flag checked, before any work
    out, t0 = Path(args.out), time.perf_counter()
    lock = claim_run_folder(out, resume=False)             # noqa: F841 (held until main returns)
    if (out / "results.json").exists() or (out / "best_adapter").exists():
        lock.release()
        raise SystemExit(f"{out} holds a finished or partial SPRec run: choose another --out")
    torch.manual_seed(args.seed)                           # LoRA dropout follows from --seed
    run = load(args)
    times, clock = {"load_s": time.perf_counter() - t0}, time.perf_counter()
    log = self_play(run, args)
    times["train_and_valid_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    load_adapter(run.model, out / "best_adapter")
    tested = evaluate(run, run.dataset.test, args, f"test (iteration {log['best']['epoch']})")
    times["test_s"] = time.perf_counter() - clock
    times["total_s"] = time.perf_counter() - t0
    write_results(args, run, log, tested, times)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: the message names the file, line or field
        sys.exit(f"error: {e}")
