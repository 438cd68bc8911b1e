"""The figures of §2.2 and §4.3: does a model lean on auxiliary tokens, and does GDRT stop it?

    python -m nanogdrt.analysis.analyze --dataset synthetic --runs runs/synthetic-sft runs/synthetic-gdrt
    python -m nanogdrt.analysis.analyze --runs runs/toy-sft runs/toy-gdrt --examples 50 --out figures/toy

Given the base model and any number of train.py run folders (results.json + best_adapter/), this
writes to --out (default figures/):

    fig2_attribution_ratios.png     Fig. 2 / 7: attribution of the task description and of the
                                    title's first token, each over the interaction tokens, for the
                                    base model (no adapter) and each run's best adapter, on
                                    --examples seeded examples; one panel per --attribution
                                    definition (nanogdrt/attribution.py): "segment (paper)", the
                                    paper's Captum ratios on the top-1 title of constrained beam
                                    search (--beams), with the paper's Toy numbers beside them, and
                                    "per-token (ours)" on the ground-truth title
    fig3_top1_group_distribution.png Fig. 3 / 8: item groups of the top-1 recommendations vs the
                                    test targets (results.json: test.top1_group_distribution,
                                    test_target_group_distribution)
    fig4_group1_share_by_epoch.png  Fig. 4 / 9: share of top-1 recommendations in item group 1
                                    (most relevant to auxiliary tokens), per epoch on validation
    fig5_cooccurrence.png           Fig. 5: co-occurrence rates of token pairs in the training set
    fig6_group_loss.png             Fig. 6: training loss by token group (results.json steps)
    heatmap/                        with --heatmap N: Fig. 1-style token heat maps of N seeded users
                                    under the base model and every run (nanogdrt/analysis/heatmap.py)
    analysis.json                   every number drawn, written atomically

Fig. 5, the definition. The paper's point: target tokens co-occur with auxiliary tokens far more
reliably than with interaction tokens, so an NLL-minimising model learns to predict from the former.
Every training example n contributes its target tokens y_t (the quoted title and EOS, the tokens
the loss trains on). For a target occurrence (n, t), its context tokens of each type are the set of
distinct ids in

    task         the task description (head + tail of the prompt)
    prefix       the already generated part of the target, y_<t
    interaction  the history titles

A pair (c, y) of a type co-occurs once per target occurrence of y whose context of that type holds
c. Two rates per pair, each read in one direction:

    P(c | y) = #co-occurrences(c, y) / #occurrences(y)          "given_target"
        how reliably c is present when the model is trained to produce y (1: every time);
    P(y | c) = #co-occurrences(c, y) / #occurrences with c in that context   "given_context"
        how well c predicts y, i.e. how useful c is as a shortcut to y.

Fig. 5 shows, per type, the mean of each rate over the distinct pairs of that type whose c and y
are each counted at least `min_count` times (default 5; a token seen once makes every pair it is
in look certain). Task tokens are in every prompt, so P(c | y) = 1 for all task pairs while
P(y | c) is just y's frequency: they carry the prior over titles. Prefix tokens are the title
itself, so they predict its next tokens well. Reported as measured, whatever the data shows.
"""

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nanogdrt import attribution, files
from nanogdrt.analysis import plots
from nanogdrt.infra import validate
from nanogdrt.batches import make_examples
from nanogdrt.grouping import N_ITEM_GROUPS
from nanogdrt.prompt import PromptIds

PAIR_TYPES = ("task", "prefix", "interaction")
DEFINITIONS = {"segment": "segment (paper)", "per-token": "per-token (ours)"}
XTICKS = {"segment": ("task description (all auxiliary text)\nvs all interactions, predicted title",
                      "first generated token (the quote)\nvs all interactions, rest of the title"),
          "per-token": ("task text per token\nvs history per token, true title",
                        "first title token\nvs history per token, rest of the title")}
# The paper's auxiliary : interaction ratio (§2.2, Fig. 2, Toy): "about 1:1" before fine-tuning
# and 4.69:1 after SFT. No other value is given in its text; Fig. 7 (GDRT) is drawn without numbers.
PAPER_TASK_RATIOS = {"toy": {"base (no fine-tuning)": 1.0, "SFT": 4.69}}
FIGURES = {"attribution": "fig2_attribution_ratios.png", "groups": "fig3_top1_group_distribution.png",
           "group1_share": "fig4_group1_share_by_epoch.png", "cooccurrence": "fig5_cooccurrence.png",
           "group_loss": "fig6_group_loss.png"}


# ----------------------------------------------------------------------------- runs

class Run(NamedTuple):
    path: Path
    label: str         # "SFT", "GDRT" (+ the folder name when two runs share a method)
    config: dict       # the run's resolved RunConfig
    results: dict      # its results.json


def load_run(path) -> Run:
    """Read <path>/results.json; every problem names the file it comes from."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} not found (expected the --out folder of a train.py run)")
    file = path / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: did the train.py run finish? (an interrupted run "
                                f"writes it only after `--resume` completes)")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    for key in ("config", "epochs", "test", "test_target_group_distribution", "steps"):
        if key not in results:
            raise ValueError(f"{file}: missing key {key!r} (not a train.py results.json?)")
    return Run(path, results["config"].get("method", "run").upper(), results["config"], results)


def label_runs(runs: list[Run]) -> list[Run]:
    """Method names as labels; runs that share a method are told apart by their folder names."""
    methods = [r.label for r in runs]
    return [r._replace(label=f"{r.label} ({r.path.name})") if methods.count(r.label) > 1 else r for r in runs]


def agreed(runs: list[Run], key: str, given, default):
    """A setting given on the command line, else the one all runs share, else the default."""
    if given is not None:
        return given
    values = {r.config.get(key) for r in runs}
    if len(values) > 1:
        raise ValueError(f"the runs disagree on {key}: "
                         + ", ".join(f"{r.path} has {r.config.get(key)!r}" for r in runs)
                         + (f"; pass --{key.replace('_', '-')} to choose" if key in ("model", "dataset", "data_dir")
                            else "; analyse runs of one training set together"))
    return values.pop() if values and None not in values else default


# ----------------------------------------------------------------------------- Fig. 5

def cooccurrence_counts(examples: list[PromptIds]):
    """Counts over all target occurrences (docstring): per type, {(c, y): co-occurrences} and
    {c: occurrences whose context holds c}; and {y: occurrences of y as a target token}."""
    pairs, n_context = ({k: Counter() for k in PAIR_TYPES} for _ in range(2))
    n_target = Counter()
    for p in examples:
        t0, t1 = p.target
        task = {p.ids[i] for s, e in p.task for i in range(s, e)}
        interaction = {p.ids[i] for s, e in p.items for i in range(s, e)}
        target = p.ids[t0:t1]
        for t, y in enumerate(target):
            n_target[y] += 1
            for kind, context in (("task", task), ("prefix", set(target[:t])), ("interaction", interaction)):
                n_context[kind].update(context)
                pairs[kind].update((c, y) for c in context)
    return pairs, n_context, n_target


def cooccurrence_rates(examples: list[PromptIds], min_count: int = 5) -> dict:
    """Per pair type, over its distinct pairs (c, y) with c and y each seen >= min_count times:
    mean / median of P(c | y) ("given_target") and of P(y | c) ("given_context"), and the count."""
    pairs, n_context, n_target = cooccurrence_counts(examples)
    out = {}
    for kind in PAIR_TYPES:
        kept = [(n, c, y) for (c, y), n in pairs[kind].items()
                if n_target[y] >= min_count and n_context[kind][c] >= min_count]
        given_target = np.array([n / n_target[y] for n, c, y in kept])
        given_context = np.array([n / n_context[kind][c] for n, c, y in kept])
        out[kind] = {"pairs": len(kept)}
        for name, rates in (("given_target", given_target), ("given_context", given_context)):
            out[kind][name] = {"mean": float(rates.mean()) if kept else float("nan"),
                               "median": float(np.median(rates)) if kept else float("nan")}
    return out


# ----------------------------------------------------------------------------- Fig. 2 / 7

def per_token_ratios(model, builder, interactions, titles) -> dict:
    """attribution.context_ratios ("per-token (ours)", ground-truth titles), with the mean terms."""
    attrs = [attribution.attribute(model, builder.for_interaction(x, titles, with_target=True),
                                   builder.tokenizer, all_prefixes=False) for x in interactions]
    r = attribution.context_ratios(attrs)
    terms = np.array([list(t) for t in r.per_example])                 # (N, 4)
    return {"task_ratio": r.task_ratio, "prefix_ratio": r.prefix_ratio,
            "mean_terms": dict(zip(attribution.RatioTerms._fields, terms.mean(0).tolist())),
            "per_example": [t._asdict() for t in r.per_example]}


def segment_ratios(model, builder, interactions, titles, trie, beams=10) -> dict:
    """attribution.segment_ratios ("segment (paper)") on each example's predicted item: the top-1
    title of this model's constrained beam search (nanogdrt.recommend.recommend)."""
    from nanogdrt.recommend import Decoding, recommend

    records = recommend(model, builder, trie, interactions, titles, Decoding(beams=beams, top_k=1))
    predicted = [r["topk_item_ids"][0] for r in records]
    attrs = [attribution.segment_attribution(model, builder, [titles[i] for i in x.history], titles[item])
             for x, item in zip(interactions, predicted)]
    r = attribution.segment_ratios(attrs)
    return r._asdict() | {"per_example": [t._asdict() for t in r.per_example], "predicted_item_ids": predicted}


def load_model(model_dir, adapter, device, dtype):
    from nanogdrt.llama import Llama
    from nanogdrt.lora import load_adapter

    model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)   # LoRA layers are created on the base weights' device
    return model.eval()               # eval: no LoRA dropout


# ----------------------------------------------------------------------------- everything

def attribution_panels(attribution: dict) -> list[dict]:
    """Fig. 2/7's panels (plots.attribution_ratios) from analysis.json's "attribution" entry, so
    the figure can be redrawn from the saved numbers without recomputing them."""
    per_model, paper = attribution["models"], (attribution["paper"] or {}).get("task_ratio", {})
    panels = []
    for d in attribution["definitions"]:
        panel = {"title": DEFINITIONS[d], "xticks": XTICKS[d],
                 "bars": {k: (v[d]["task_ratio"], v[d]["prefix_ratio"]) for k, v in per_model.items()}}
        if d == "segment":
            panel["dots"] = {k: (v[d]["task_ratio_mean"], v[d]["prefix_ratio_mean"]) for k, v in per_model.items()}
            panel["paper"] = {k: (v, None) for k, v in paper.items() if k in per_model}
        panels.append(panel)
    return panels


def analyze(run_dirs, out, model=None, dataset=None, data_dir=None, examples=20, split="test",
            seed=0, min_count=5, device="cpu", dtype="float32", attribution_defs="both", beams=10,
            heatmap_users=0) -> dict:
    """Draw every figure into `out` and return (and write) the numbers behind them.

    Attribution examples are a seeded sample of the full `split` (not the runs' own test sample).
    attribution_defs: "segment" | "per-token" | "both" (nanogdrt/attribution.py's two definitions);
    beams: beam width of the search whose top-1 title the segment definition attributes;
    heatmap_users: Fig. 1-style token heat maps of this many seeded users (nanogdrt/analysis/heatmap.py)."""
    if attribution_defs not in ("segment", "per-token", "both"):
        raise ValueError(f"attribution definition {attribution_defs!r}: expected segment, per-token or both")
    defs = list(DEFINITIONS) if attribution_defs == "both" else [attribution_defs]
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.data import load_dataset
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer

    runs = label_runs([load_run(d) for d in run_dirs])
    if examples > 0:  # fail before any slow work if an adapter is missing
        for r in runs:
            if not (r.path / "best_adapter" / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"{r.path / 'best_adapter' / 'adapter_model.safetensors'} not found")
    model_dir = Path(agreed(runs, "model", model, None) or ensure_embedded_checkpoint())
    name = agreed(runs, "dataset", dataset, "synthetic")
    data_dir = agreed(runs, "data_dir", data_dir, None)
    # The training set the runs saw (same file, sample and seed as train.py), for Fig. 5.
    train_cfg = {k: agreed(runs, k, None, None) for k in ("train_file", "train_samples")}
    ds = load_dataset(name, data_dir=data_dir, train_file=train_cfg["train_file"],
                      train_samples=train_cfg["train_samples"], seed=agreed(runs, "seed", None, 0))
    builder = PromptBuilder(Tokenizer(model_dir), name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    result = {"config": {"runs": [str(r.path) for r in runs], "model": str(model_dir), "dataset": name,
                         "examples": examples, "split": split, "seed": seed, "min_count": min_count,
                         "attribution": defs, "beams": beams},
              "labels": [r.label for r in runs]}

    if examples > 0:
        pool = getattr(ds, split)
        rows = sorted(random.Random(f"{seed}:analyze:{split}").sample(range(len(pool)), min(examples, len(pool))))
        chosen = [pool[i] for i in rows]
        models = {"base (no fine-tuning)": None} | {r.label: r.path / "best_adapter" for r in runs}
        trie = None
        if "segment" in defs:
            from nanogdrt.trie import Trie
            trie = Trie.from_titles(ds.titles, builder)
        per_model = {}
        for label, adapter in models.items():
            m = load_model(model_dir, adapter, device, getattr(torch, dtype))
            per_model[label] = {}
            if "segment" in defs:
                per_model[label]["segment"] = segment_ratios(m, builder, chosen, ds.titles, trie, beams)
            if "per-token" in defs:
                per_model[label]["per-token"] = per_token_ratios(m, builder, chosen, ds.titles)
            print(f"{label}: " + "; ".join(f"{DEFINITIONS[d]}: task ratio {v['task_ratio']:.3f}, prefix ratio "
                                           f"{v['prefix_ratio']:.3f}" for d, v in per_model[label].items()))
        paper = PAPER_TASK_RATIOS.get(name, {})
        result["attribution"] = {
            "split": split, "rows": rows, "definitions": {d: DEFINITIONS[d] for d in defs}, "models": per_model,
            "paper": {"dataset": name, "task_ratio": paper,
                      "source": "GDRT §2.2 / Fig. 2 (Toy): auxiliary vs interaction attribution about 1:1 "
                                "before fine-tuning, 4.69:1 after SFT (Captum feature ablation, refs [34, 47])"}
            if paper else None}
        plots.attribution_ratios(attribution_panels(result["attribution"]), out / FIGURES["attribution"],
                                 len(rows), split)
        figures["attribution"] = FIGURES["attribution"]

    if heatmap_users > 0:   # the same users under the base model and every run's adapter
        from nanogdrt.analysis import heatmap
        pool = getattr(ds, split)
        picked = random.Random(f"{seed}:heatmap:{split}").sample(range(len(pool)), min(heatmap_users, len(pool)))
        models = {"base (no fine-tuning)": load_model(model_dir, None, device, getattr(torch, dtype))}
        models |= {r.label: load_model(model_dir, r.path / "best_adapter", device, getattr(torch, dtype)) for r in runs}
        heatmap.draw(heatmap.heatmaps(models, builder, [pool[i] for i in picked], ds.titles), out / "heatmap")
        figures["heatmap"] = "heatmap/heatmap.png"

    if runs:
        target_dists = {r.label: r.results["test_target_group_distribution"] for r in runs}
        same = all(d == target_dists[runs[0].label] for d in target_dists.values())
        bars = ({"test targets": target_dists[runs[0].label]} if same
                else {f"test targets ({k})": d for k, d in target_dists.items()})
        bars |= {f"{r.label} top-1": r.results["test"]["top1_group_distribution"] for r in runs}
        result["top1_group_distribution"] = bars
        plots.group_distribution(bars, out / FIGURES["groups"],
                                 title="Item groups of the top-1 recommendations vs the test targets")
        figures["groups"] = FIGURES["groups"]

        curves = {r.label: ([e["epoch"] for e in r.results["epochs"]],
                            [e["top1_group1_share"] for e in r.results["epochs"]]) for r in runs}
        result["group1_share_by_epoch"] = {k: {"epoch": x, "share": y} for k, (x, y) in curves.items()}
        reference = (target_dists[runs[0].label][0], "group-1 share of the test targets") if same else None
        plots.epoch_curves(curves, out / FIGURES["group1_share"],
                           "share of top-1 recommendations\nin item group 1 (validation)",
                           "Top-1 recommendations from the item group most predictable\n"
                           f"from auxiliary tokens (group 1 of {N_ITEM_GROUPS}), after each epoch", reference)
        figures["group1_share"] = FIGURES["group1_share"]

        # A group absent from a step's batch was logged as 0: it is missing, not a zero loss.
        panels = {r.label: ([s["step"] for s in r.results["steps"]],
                            [[v if v != 0 else float("nan") for v in s["group_loss"]] for s in r.results["steps"]])
                  for r in runs}
        result["group_loss"] = {k: {"step": x, "group_loss": y} for k, (x, y) in panels.items()}
        window = max(1, max(len(x) for x, _ in panels.values()) // 50)
        plots.group_loss_panels(panels, out / FIGURES["group_loss"], window)
        figures["group_loss"] = FIGURES["group_loss"]

    train_examples = make_examples(builder, ds.train, ds.titles)
    rates = cooccurrence_rates(train_examples, min_count)
    result["cooccurrence"] = {"definition": "per type, mean / median over distinct (context token c, target "
                              "token y) pairs, c and y each counted >= min_count times, of P(c | y) and P(y | c) "
                              "over target-token occurrences (nanogdrt/analysis/analyze.py docstring)",
                              "train_examples": len(train_examples), "types": rates}
    plots.cooccurrence_bars({k: (v["given_target"]["mean"], v["given_context"]["mean"]) for k, v in rates.items()},
                            {k: v["pairs"] for k, v in rates.items()}, out / FIGURES["cooccurrence"],
                            len(train_examples), min_count)
    figures["cooccurrence"] = FIGURES["cooccurrence"]

    result["figures"] = figures
    files.write_json(out / "analysis.json", result)   # strict JSON: a NaN ratio is null
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="train.py run folders (results.json, best_adapter/)")
    p.add_argument("--model", default=None, help="base model folder (default: the runs' config.model, else "
                                                 "the embedded SmolLM2-135M)")
    p.add_argument("--dataset", default=None, help="toy | clothing | book | synthetic (default: the runs')")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the runs')")
    p.add_argument("--examples", type=validate.number(int, min=0), default=20, help="examples for Fig. 2/7 attribution (0: skip)")
    p.add_argument("--attribution", default="both", choices=["segment", "per-token", "both"],
                   help="Fig. 2/7 definition: the paper's Captum segment ratios on the predicted title, "
                        "our per-token ratios on the ground truth, or both (nanogdrt/attribution.py)")
    p.add_argument("--beams", type=validate.number(int, min=1), default=10, help="beam width of the search whose top-1 title the "
                                                         "segment definition attributes (the paper: 10)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split of those examples")
    p.add_argument("--seed", type=validate.number(int, min=0), default=0, help="seed of the example sample")
    p.add_argument("--min-count", type=validate.number(int, min=1), default=5, help="Fig. 5: only target tokens seen this often")
    p.add_argument("--heatmap", type=validate.number(int, min=0), default=0, help="Fig. 1-style token heat maps of N seeded users "
                                                          "(heatmap/: PNG, HTML, JSON; nanogdrt/analysis/heatmap.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="figures", help="folder for the PNG files and analysis.json")
    a = p.parse_args(argv)                        # every range checked here, before any work
    validate.check_output(p, a.out, "folder")
    try:
        analyze(a.runs, a.out, a.model, a.dataset, a.data_dir, a.examples, a.split, a.seed, a.min_count,
                a.device, a.dtype, a.attribution, a.beams, a.heatmap)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"figures and analysis.json in {a.out}/")


if __name__ == "__main__":
    main()
