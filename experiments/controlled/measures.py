"""One run's measures in the controlled world (docs/controlled/plan.md, "Metrics"), as one command:

    python -m experiments.controlled.measures --shortcut 0.3 --predictions runs/.../test_predictions.jsonl \
        --adapter runs/.../best_adapter [--snapshots runs/.../snapshots] --out docs/controlled/s0.3/sft-seed0/measures.json
    python -m experiments.controlled.measures --shortcut 0.3 --predictions-out docs/controlled/s0.3/base/... \
        --out docs/controlled/s0.3/base/measures.json          # the base model: decodes the test itself

Per run, on its test users (train.py's test records; the base model decodes the same users):
1. accuracy against the truth: E[NDCG/HR@5,10] over each user's true next-item distribution
   (nanogdrt.controlled.expected_accuracy), divided by the oracle's (oracle-relative, the primary
   accuracy), and the realized NDCG/HR@5,10 on the drawn targets beside the oracle's;
2. the shortcut in the recommendations: the top-1 share of the world's group 1 (the generic line)
   and its excess over the oracle's top-1 share on the same users;
3. MGU/DGU@5,10 (Eq. 2's five groups under the base model, and the world's own two groups);
4. history reliance (nanogdrt.analysis.reliance, derangement seed 0): top-1 changed and overlap@10
   under another user's history and under "N/A"; the oracle's swap top-1 changed as the reference;
5. attribution ratios on the first 50 users, the model's own top-1 as the target: the paper's
   segment ratios and our per-token ratios (nanogdrt.attribution);
6. with --snapshots, the top-1 generic share of each saved adapter on the first 64 users, the base
   model at step 0 (the paper's Fig. 4/9).
Layer: above rules.py; report.py reads what it writes.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from experiments.controlled.settings import ATTRIBUTION_USERS, BEAMS, CURVE_USERS, DERANGEMENT_SEED, WORLD_SEED
from nanogdrt import attribution, controlled, files, metrics, relevance
from nanogdrt.analysis.reliance import compare_topk, history_reliance, swapped
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.controlled import ControlledConfig
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import load_adapter
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import Decoding, recommend
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


def top1_share(world, ranked) -> float:
    """Share of users (with a list) whose first item is one of the world's group 1."""
    top1 = [items[0] for items in ranked if items]
    generic = set(world.generic)
    return sum(i in generic for i in top1) / max(len(top1), 1)


def list_measures(world, users, ranked, eq2_groups) -> dict:
    """Everything of one set of ranked lists that needs no model: expected and realized accuracy,
    the top-1 generic share, MGU/DGU under both group splits."""
    targets, histories = [x.target for x in users], [x.history for x in users]
    fairness = {}
    for name, groups, n in (("eq2", eq2_groups, 5), ("world", controlled.world_groups(world), controlled.WORLD_GROUPS)):
        fairness[name] = {}
        for k in (5, 10):
            fairness[name][f"MGU@{k}"], fairness[name][f"DGU@{k}"] = metrics.group_unfairness(
                ranked, histories, groups, k, n)
    return {"expected": controlled.expected_accuracy(world, users, ranked),
            "realized": metrics.evaluate(ranked, targets, histories, titles=world.titles),
            "top1_generic_share": top1_share(world, ranked), "fairness": fairness}


def oracle_measures(world, users, eq2_groups) -> dict:
    """The oracle's lists on the same users, and its swap top-1 changed (the reliance the truth asks)."""
    ranked = controlled.oracle_topk(world, users)
    swap = compare_topk(ranked, controlled.oracle_topk(world, swapped(users, DERANGEMENT_SEED)), 10)
    return {**list_measures(world, users, ranked, eq2_groups), "swap_top1_changed": swap.top1_changed}


def attribution_ratios(model, builder, users, ranked, titles) -> dict:
    """Both definitions on the users' own top-1 titles (nanogdrt.attribution's docstring)."""
    seg, tok = [], []
    for x, items in zip(users, ranked):
        history, predicted = [titles[i] for i in x.history], titles[items[0]]
        seg.append(attribution.segment_attribution(model, builder, history, predicted))
        tok.append(attribution.attribute(model, builder.build(history, predicted), builder.tokenizer,
                                         all_prefixes=False))
    s, c = attribution.segment_ratios(seg), attribution.context_ratios(tok)
    return {"users": len(seg), "segment": {k: v for k, v in s._asdict().items() if k != "per_example"},
            "per_token": {"task_ratio": c.task_ratio, "prefix_ratio": c.prefix_ratio}}


def curve(model, builder, trie, world, users, snapshots: Path, base_ranked, decoding) -> dict:
    """Top-1 generic share at step 0 (the base model's lists) and after each saved adapter."""
    steps, share = [0], [top1_share(world, base_ranked)]
    for snap in sorted(snapshots.glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        load_adapter(model, snap)
        ranked = [r["topk_item_ids"] for r in recommend(model, builder, trie, users, world.titles, decoding)]
        steps.append(int(snap.name.split("-")[1]))
        share.append(top1_share(world, ranked))
    return {"users": len(users), "steps": steps, "top1_generic_share": share}


def read_records(path, ds) -> list[dict]:
    records = [json.loads(x) for x in Path(path).read_text().splitlines()]
    rows = {x.row for x in ds.test}
    if not records or any(r["row"] not in rows for r in records):
        raise SystemExit(f"error: {path}: not the test records of this world's test split")
    return records


def measure(a) -> dict:
    start = time.perf_counter()
    world = controlled.generate(ControlledConfig(seed=a.world_seed, shortcut=a.shortcut))
    ds = load_dataset("controlled", controlled=world.config, test_samples=a.test_users, seed=a.seed)
    records = read_records(a.predictions, ds) if a.predictions else None   # bad input: before the model
    model_dir = Path(a.model) if a.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir).eval()
    builder = PromptBuilder(Tokenizer(model_dir), "controlled")
    trie, decoding = Trie.from_titles(ds.titles, builder), Decoding(beams=a.beams)
    eq2 = relevance.dataset_item_groups(model, builder, ds, progress=False)   # base model, cached
    by_row = {x.row: x for x in ds.test}
    users = [by_row[r["row"]] for r in records] if records else list(ds.test)
    out = {"shortcut": a.shortcut, "world_seed": a.world_seed, "seed": a.seed, "adapter": a.adapter}
    with torch.no_grad():
        base_ranked = None
        if records is None or a.snapshots:               # the base model's own lists (step 0 of a curve)
            n = len(users) if records is None else a.curve_users
            base = recommend(model, builder, trie, users[:n], ds.titles, decoding)
            base_ranked = [r["topk_item_ids"] for r in base]
            if records is None:
                records = [{k: v for k, v in r.items() if k != "prompt_ids"} for r in base]
                files.write_jsonl(a.predictions_out, records)
        if a.snapshots:
            out["curve"] = curve(model, builder, trie, world, users[:a.curve_users], Path(a.snapshots),
                                 base_ranked[:a.curve_users], decoding)
        if a.adapter:
            load_adapter(model, a.adapter)
        model.eval()
        ranked = [r["topk_item_ids"] for r in records]
        out.update(users=len(users), **list_measures(world, users, ranked, eq2))
        out["oracle"] = oracle_measures(world, users, eq2)
        out["relative"] = {f"E[{k}]": v / out["oracle"]["expected"][k] for k, v in out["expected"].items()}
        out["excess"] = out["top1_generic_share"] - out["oracle"]["top1_generic_share"]
        rel = history_reliance(model, builder, trie, users, ds.titles, decoding, DERANGEMENT_SEED, true_topk=ranked)
        out["reliance"] = {k: {"top1_changed": r.top1_changed, "overlap": r.overlap} for k, r in rel.items()}
        first = [(x, items) for x, items in zip(users, ranked) if items][:a.attribution_users]
        out["attribution"] = attribution_ratios(model, builder, [x for x, _ in first], [i for _, i in first],
                                                ds.titles)
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shortcut", type=float, required=True)
    p.add_argument("--world-seed", type=int, default=WORLD_SEED)
    p.add_argument("--seed", type=int, default=0, help="the run's training seed (its test users when --test-users)")
    p.add_argument("--test-users", type=int, default=None, help="as train.py's (default: the whole test split)")
    p.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="the run's LoRA adapter (none: the base model)")
    p.add_argument("--predictions", default=None, help="the run's test_predictions.jsonl (none: decode)")
    p.add_argument("--predictions-out", default=None, help="where the base model's decoded lists go")
    p.add_argument("--snapshots", default=None, help="train.py's snapshots/ folder: the top-1 curve")
    p.add_argument("--curve-users", type=int, default=CURVE_USERS)
    p.add_argument("--attribution-users", type=int, default=ATTRIBUTION_USERS)
    p.add_argument("--beams", type=int, default=BEAMS)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not a.predictions and not a.predictions_out:
        raise SystemExit("error: give --predictions (a trained run's) or --predictions-out (the base model decodes)")
    for path in (a.adapter, a.predictions, a.snapshots):
        if path and not Path(path).exists():
            raise SystemExit(f"error: {path} does not exist")
    out = measure(a)
    files.write_json(a.out, out)
    print(f"{a.out}: E[NDCG@10] {out['expected']['NDCG@10']:.4f} ({out['relative']['E[NDCG@10]']:.3f} of the "
          f"oracle), top-1 generic {out['top1_generic_share']:.3f} (excess {out['excess']:+.3f}), swap top-1 "
          f"changed {out['reliance']['swap']['top1_changed']:.3f} (oracle {out['oracle']['swap_top1_changed']:.3f}); "
          f"{out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
