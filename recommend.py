"""Recommend with constrained beam search for a model (+ optional LoRA adapter) on a data split.

    python recommend.py --dataset toy --split test --users 100 --out recs.jsonl
    python recommend.py --dataset synthetic --adapter runs/gdrt/best_adapter --out recs.jsonl
    python recommend.py --decoding d3 ...                    # D3 (nanogdrt/baselines/d3.py)
    python recommend.py --adapter runs/llara/best_adapter --sasrec DIR ...   # LLaRA (baselines/llara.py)
    torchrun --nproc_per_node=2 recommend.py ...             # users split across ranks, gathered

Writes one JSON line per user (row index in the split, the prompt ids decoded from, the target,
the top-K item ids and their scores) and prints the metrics (nanogdrt/recommend.py).
"""

import argparse
import dataclasses
import time

import torch

from nanogdrt import files, metrics, relevance, synthetic
from nanogdrt.baselines import d3, llara, sasrec
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.infra import distributed, validate
from nanogdrt.llama import Llama
from nanogdrt.lora import check_adapter, load_adapter
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import recommend, score
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


def parse_rows(spec: str) -> slice:
    """--rows START:END (either may be left out): 0 <= START <= END. An argparse type, so a bad
    value is refused at start-up with the flag's name."""
    try:
        start, end = (int(s) if s else None for s in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected START:END, e.g. 0:100") from None
    if (start is not None and start < 0) or (end is not None and end < 0):
        raise argparse.ArgumentTypeError(f"{spec!r}: START and END must be >= 0")
    if start is not None and end is not None and start >= end:
        raise argparse.ArgumentTypeError(f"{spec!r}: START must be < END (no rows otherwise)")
    return slice(start, end)


def main(argv=None):
    p = argparse.ArgumentParser(description="Recommend with constrained beam search and print metrics.")
    p.add_argument("--model", default=None, help="Hugging Face Llama folder (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="PEFT/nanogdrt LoRA adapter folder (default: base model)")
    p.add_argument("--dataset", default="synthetic", help="toy | clothing | book | synthetic | controlled, or the name of "
                   "your own folder (with --data-dir; docs/data_format.md)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"],
                   help="synthetic only: full (2,000 items) or small (120 items), as train.py's")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--users", type=validate.number(int, min=1), default=None, help="evaluate a seeded sample of N users")
    g.add_argument("--rows", type=parse_rows, default=None, help="evaluate rows START:END of the split")
    p.add_argument("--seed", type=validate.number(int, min=0), default=0, help="seed of the --users sample")
    p.add_argument("--beams", type=validate.number(int, min=1), default=10, help="beam width (the paper: 10)")
    p.add_argument("--batch-size", type=validate.number(int, min=1), default=32, help="users decoded at once (slots refilled as users finish)")
    p.add_argument("--length-penalty", type=validate.number(float), default=None,
                   help="score = sum log p / len^lp (default: cbs 1.0, the paper lineage; d3 0.0, a plain sum)")
    p.add_argument("--decoding", default="cbs", choices=d3.DECODINGS,
                   help="cbs: constrained beam search; d3: Bao et al. 2024 (nanogdrt/baselines/d3.py)")
    p.add_argument("--assistant", type=validate.checked(d3.assistant_problem), default=None, help="d3: SASRec folder (python -m nanogdrt.baselines.sasrec) for alpha > 0")
    p.add_argument("--alpha", type=validate.number(float, min=0, max=1), default=0.0,
                   help="d3: step score (1 - alpha) log p_LM + alpha log p_assistant (D3's code: 0)")
    p.add_argument("--ghost-threshold", type=validate.number(float, above=0), default=d3.GHOST_THRESHOLD,
                   help="d3: tokens with p_LM above this are ghost tokens (counted; out of the length)")
    p.add_argument("--normaliser", default="vocab", choices=d3.NORMALISERS,
                   help="each step's softmax: over the whole vocabulary (transformers', the lineage's) or over "
                        "the trie's allowed tokens only (what MSL's loss trains; a diagnostic)")
    p.add_argument("--sasrec", type=validate.checked(d3.assistant_problem), default=None,
                   help="LLaRA: the run's SASRec folder; the --adapter folder holds the projector of its item slots")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", type=validate.device, default="cpu", help="cpu | cuda | mps (one this machine has)")
    p.add_argument("--no-fairness", action="store_true", help="skip item groups (MGU/DGU)")
    p.add_argument("--k", type=validate.number(int, min=1), nargs="+", default=[5, 10],
                   help="cut-offs K of the metrics @K; each <= --beams (the lists' length), except the standard 5 "
                        "and 10, kept with a warning")
    p.add_argument("--beyond-accuracy", action="store_true",
                   help="also Coverage@K, ARP@K, Tail@K and Gini@K (nanogdrt/metrics.py; popularity: the targets of "
                        "the dataset's training windows)")
    p.add_argument("--out", required=True, help="JSON-lines file to write")
    args = p.parse_args(argv)                     # every range checked here, before any work
    validate.check_output(p, args.out, "file")
    if args.sasrec and not args.adapter:
        p.error("--sasrec (LLaRA) needs the run's --adapter folder, which holds the projector")
    args.k = sorted(set(args.k))
    validate.check_cutoffs(args.k, args.beams)
    model_dir = args.model or ensure_embedded_checkpoint()
    if args.adapter:                              # its kind and base model, before data and model
        check_adapter(args.adapter, model_dir)
    dist = distributed.init(args.device)          # under torchrun: this rank's share of the users
    args.device = distributed.rank_device(args.device, dist)
    if validate.cutoff_warning(args.k, args.beams) and dist.main:
        print(validate.cutoff_warning(args.k, args.beams))

    kwargs = {f"{args.split}_samples": args.users}
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed,
                           synthetic=synthetic.config_for(args.dataset, args.synthetic_size), **kwargs)
    interactions = getattr(dataset, args.split)
    if args.rows:
        interactions = interactions[args.rows]
        if not interactions:
            raise SystemExit(f"error: --rows selects no row ({args.split} has "
                             f"{len(getattr(dataset, args.split))} rows)")
    rec = llara.load_sasrec(args.sasrec, dataset.titles, args.device) if args.sasrec else None   # before the LLM
    model = Llama.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    builder = (PromptBuilder(Tokenizer(model_dir), dataset.template) if rec is None
               else llara.HybridPromptBuilder(Tokenizer(model_dir), dataset.template))
    item_group = None
    if not args.no_fairness:  # groups come from the base model, before any adapter
        item_group = relevance.dataset_item_groups(model, builder, dataset, shard=dist)
    if args.adapter:
        load_adapter(model, args.adapter)
        model.eval()
    assistant = sasrec.load(args.assistant, device=args.device) if args.assistant else None
    trie = Trie.from_titles(dataset.titles, builder)
    decoding = d3.decoding(args.decoding, args.alpha, assistant, trie.item_ids(), args.ghost_threshold,
                           args.normaliser, args.length_penalty, beams=args.beams, top_k=max(10, *args.k),
                           batch_size=args.batch_size)   # lists of 10 items, or of --k's largest
    if rec is not None:                           # LLaRA: the hybrid prompt, its slots projected
        soft = llara.LLaRA(rec, model.config.hidden_size, builder.placeholder).to(args.device)
        soft.load(args.adapter)
        decoding = dataclasses.replace(decoding, soft_tokens=soft.soft_tokens)
    start = time.perf_counter()
    records = recommend(model, builder, trie, interactions, dataset.titles, decoding, progress=True, dist=dist)
    seconds = time.perf_counter() - start
    if not dist.main:
        return
    files.write_jsonl(args.out, records)
    beyond = ({"n_items": len(dataset.titles), "popularity": metrics.target_popularity(x.target for x in dataset.train)}
              if args.beyond_accuracy else {})
    result = score(records, interactions, dataset.titles, item_group, ks=args.k, **beyond)
    print(f"{len(records)} users of {args.dataset}/{args.split} in {seconds:.1f} s "
          f"({seconds / max(len(records), 1):.3f} s/user) -> {args.out}")
    print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))


if __name__ == "__main__":
    clean = False
    try:
        main()
        clean = True
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file, line or field
        raise SystemExit(f"error: {e}") from None
    finally:
        distributed.shutdown(clean)
