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

One module per figure family, each with its definition: ratios.py (Fig. 2/7), item_groups.py
(Fig. 3/4), cooccurrence.py (Fig. 5), group_loss.py (Fig. 6), heatmap.py; inputs.py reads the runs.
This file only wires them: each figure's numbers go into analysis.json under the same keys as always.
"""

import argparse
from pathlib import Path

from nanogdrt import files
from nanogdrt.analysis import cooccurrence, group_loss, heatmap, item_groups, ratios
from nanogdrt.analysis.inputs import AnalyzeConfig, check_adapters, label_runs, load_run, resolve
from nanogdrt.analysis.ratios import PAPER_TASK_RATIOS, XTICKS  # noqa: F401 (experiments/repro/report.py)
from nanogdrt.infra import validate

FIGURES = {"attribution": "fig2_attribution_ratios.png", "groups": "fig3_top1_group_distribution.png",
           "group1_share": "fig4_group1_share_by_epoch.png", "cooccurrence": "fig5_cooccurrence.png",
           "group_loss": "fig6_group_loss.png"}


def analyze(run_dirs, out, cfg: AnalyzeConfig = AnalyzeConfig()) -> dict:
    """Draw every figure into `out` and return (and write) the numbers behind them (analysis.json).

    Every input is checked before the slow work: the attribution definition, the run folders and,
    when attributing, their adapters. Attribution examples are a seeded sample of the full cfg.split
    (not the runs' own test sample)."""
    defs = ratios.definitions(cfg.attribution_defs)
    runs = label_runs([load_run(d) for d in run_dirs])
    if cfg.examples > 0:
        check_adapters(runs)
    inputs = resolve(runs, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": {"runs": [str(r.path) for r in runs], "model": str(inputs.model_dir),
                         "dataset": inputs.dataset, "examples": cfg.examples, "split": cfg.split, "seed": cfg.seed,
                         "min_count": cfg.min_count, "attribution": defs, "beams": cfg.beams},
              "labels": [r.label for r in runs]}
    figures = {}
    if cfg.examples > 0:                                        # Fig. 2 / 7
        result["attribution"] = ratios.figure(inputs, cfg, out / FIGURES["attribution"])
        figures["attribution"] = FIGURES["attribution"]
    if cfg.heatmap_users > 0:                                   # Fig. 1 style, the same users under every model
        heatmap.figure(inputs, cfg, out / "heatmap")
        figures["heatmap"] = "heatmap/heatmap.png"
    if runs:                                                    # Fig. 3, 4 and 6: the runs' results.json
        result["top1_group_distribution"] = item_groups.top1_groups(runs, out / FIGURES["groups"])
        figures["groups"] = FIGURES["groups"]
        result["group1_share_by_epoch"] = item_groups.group1_share(runs, out / FIGURES["group1_share"])
        figures["group1_share"] = FIGURES["group1_share"]
        result["group_loss"] = group_loss.figure(runs, out / FIGURES["group_loss"])
        figures["group_loss"] = FIGURES["group_loss"]
    # Fig. 5: on the training set the runs saw, with or without runs
    result["cooccurrence"] = cooccurrence.figure(inputs.builder, inputs.ds, cfg.min_count,
                                                 out / FIGURES["cooccurrence"])
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
    p.add_argument("--examples", type=validate.number(int, min=0), default=20,
                   help="examples for Fig. 2/7 attribution (0: skip)")
    p.add_argument("--attribution", default="both", choices=["segment", "per-token", "both"],
                   help="Fig. 2/7 definition: the paper's Captum segment ratios on the predicted title, "
                        "our per-token ratios on the ground truth, or both (nanogdrt/attribution.py)")
    p.add_argument("--beams", type=validate.number(int, min=1), default=10,
                   help="beam width of the search whose top-1 title the segment definition attributes (the paper: 10)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split of those examples")
    p.add_argument("--seed", type=validate.number(int, min=0), default=0, help="seed of the example sample")
    p.add_argument("--min-count", type=validate.number(int, min=1), default=5,
                   help="Fig. 5: only target tokens seen this often")
    p.add_argument("--heatmap", type=validate.number(int, min=0), default=0,
                   help="Fig. 1-style token heat maps of N seeded users (heatmap/: PNG, HTML, JSON; "
                        "nanogdrt/analysis/heatmap.py)")
    p.add_argument("--device", type=validate.device, default="cpu", help="cpu | cuda | mps (one this machine has)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="figures", help="folder for the PNG files and analysis.json")
    a = p.parse_args(argv)                        # every range checked here, before any work
    validate.check_output(p, a.out, "folder")
    try:
        analyze(a.runs, a.out, AnalyzeConfig(
            model=a.model, dataset=a.dataset, data_dir=a.data_dir, examples=a.examples, split=a.split, seed=a.seed,
            min_count=a.min_count, device=a.device, dtype=a.dtype, attribution_defs=a.attribution, beams=a.beams,
            heatmap_users=a.heatmap))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"figures and analysis.json in {a.out}/")


if __name__ == "__main__":
    main()
