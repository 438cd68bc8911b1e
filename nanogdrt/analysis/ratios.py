"""Fig. 2 / Fig. 7 (GDRT §2.2, §4.3): how much does a model lean on auxiliary tokens over interactions?

For a seeded sample of a split, the base model (no adapter) and each run's best adapter are
attributed under one or both definitions of nanogdrt/attribution.py:

    segment (paper)    Captum feature ablation of whole segments (task description, the title's
                       first generated token) over all interaction tokens, on the top-1 title of
                       this model's constrained beam search (nanogdrt.recommend.recommend)
    per-token (ours)   the same comparison per token, on the ground-truth title

The paper's Toy ratios (about 1:1 before fine-tuning, 4.69:1 after SFT) are drawn beside ours.
"""

import random

import numpy as np

from nanogdrt import attribution
from nanogdrt.analysis import plots
from nanogdrt.analysis.inputs import AnalyzeConfig, Inputs, load_model

DEFINITIONS = {"segment": "segment (paper)", "per-token": "per-token (ours)"}
XTICKS = {"segment": ("task description (all auxiliary text)\nvs all interactions, predicted title",
                      "first generated token (the quote)\nvs all interactions, rest of the title"),
          "per-token": ("task text per token\nvs history per token, true title",
                        "first title token\nvs history per token, rest of the title")}
# The paper's auxiliary : interaction ratio (§2.2, Fig. 2, Toy): "about 1:1" before fine-tuning
# and 4.69:1 after SFT. No other value is given in its text; Fig. 7 (GDRT) is drawn without numbers.
PAPER_TASK_RATIOS = {"toy": {"base (no fine-tuning)": 1.0, "SFT": 4.69}}
PAPER_SOURCE = ("GDRT §2.2 / Fig. 2 (Toy): auxiliary vs interaction attribution about 1:1 "
                "before fine-tuning, 4.69:1 after SFT (Captum feature ablation, refs [34, 47])")


def definitions(which: str) -> list[str]:
    """"segment" | "per-token" | "both" -> the definitions to compute, in DEFINITIONS' order."""
    if which not in ("segment", "per-token", "both"):
        raise ValueError(f"attribution definition {which!r}: expected segment, per-token or both")
    return list(DEFINITIONS) if which == "both" else [which]


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


def figure(inputs: Inputs, cfg: AnalyzeConfig, path) -> dict:
    """Fig. 2/7 into `path`; returns analysis.json's "attribution" entry. The examples are a seeded
    sample of the full cfg.split (not the runs' own test sample); one model is loaded at a time."""
    defs, ds, builder = definitions(cfg.attribution_defs), inputs.ds, inputs.builder
    pool = getattr(ds, cfg.split)
    rows = sorted(random.Random(f"{cfg.seed}:analyze:{cfg.split}").sample(range(len(pool)),
                                                                        min(cfg.examples, len(pool))))
    chosen = [pool[i] for i in rows]
    trie = None
    if "segment" in defs:
        from nanogdrt.trie import Trie
        trie = Trie.from_titles(ds.titles, builder)
    per_model = {}
    for label, adapter in inputs.adapters().items():
        m = load_model(inputs.model_dir, adapter, cfg.device, cfg.dtype)
        per_model[label] = {}
        if "segment" in defs:
            per_model[label]["segment"] = segment_ratios(m, builder, chosen, ds.titles, trie, cfg.beams)
        if "per-token" in defs:
            per_model[label]["per-token"] = per_token_ratios(m, builder, chosen, ds.titles)
        print(f"{label}: " + "; ".join(f"{DEFINITIONS[d]}: task ratio {v['task_ratio']:.3f}, prefix ratio "
                                       f"{v['prefix_ratio']:.3f}" for d, v in per_model[label].items()))
    paper = PAPER_TASK_RATIOS.get(inputs.dataset, {})
    entry = {"split": cfg.split, "rows": rows, "definitions": {d: DEFINITIONS[d] for d in defs}, "models": per_model,
             "paper": {"dataset": inputs.dataset, "task_ratio": paper, "source": PAPER_SOURCE} if paper else None}
    plots.attribution_ratios(attribution_panels(entry), path, len(rows), cfg.split)
    return entry
