"""The reproduction's figures, from docs/repro/ (PNG + the same numbers in JSON, into --figures).

    analyze/      nanogdrt.analysis.analyze on SFT and the chosen GDRT: Fig. 2/7 under both attribution
                  definitions, Fig. 3/8, 4/9, 5, 6, and Fig. 1-style token heat maps (3 users);
                  kept while those two adapters and --examples are unchanged (analysis.json)
    fig3_rows_top1_groups.png   top-1 item groups of every row beside the test targets
    fig10_sensitivity_G.png / fig11_sensitivity_tau.png   the GDRT grid against the SFT line
    fig11_sensitivity_tau_test_DGU5.png   the same for fairness, with SFT's seed range and our
                                control (Q fixed uniform, the tau -> inf limit) as a dotted line
    q_effective_groups.png      exp(H(Q)) per step of every GDRT run
    group_weight_vs_fairness.png   test DGU@5 of every SFT / GDRT / control run against the share
                                of its loss weight on the last token group (robust.weight_points)
    msl_softmax_DGU5.png        MSL, SFT and GDRT decoded with each softmax and length normalisation
                                (experiments/repro/normaliser.py), test DGU@5 with 95% intervals
    figures.json                all of the above numbers, and the token groups' composition
Definitions: nanogdrt/stats.py's docstring. Layer: above the sections (robust.py, normaliser.py);
report.py runs it (`python -m experiments.repro.report figures ...`).
"""

import json
import shutil
from pathlib import Path

import numpy as np

from experiments.repro.data import Rows, dataset_of, load_model, read_item_groups, top1_items
from experiments.repro.normaliser import SOFTMAX, decode_folders
from experiments.repro.robust import weight_points
from experiments.repro.rows import best_valid, gdrt_row, parse_grid, row_names, sha256
from nanogdrt import files, metrics, relevance
from nanogdrt.analysis import plots
from nanogdrt.analysis.analyze import AnalyzeConfig, analyze
from nanogdrt.batches import make_examples
from nanogdrt.data import load_dataset
from nanogdrt.prompt import PromptBuilder
from nanogdrt.stats import group_composition, interval, q_entropy, weights
from nanogdrt.synthetic import config_for


def analyze_runs(a, labels, out: Path, users_file: Path, item_group, ds) -> list[Path]:
    """train.py-shaped run folders for nanogdrt.analysis.analyze: the row's train_results.json with its
    test replaced by the decode on the shared users, and its adapter as best_adapter/."""
    index = json.loads(users_file.read_text())["index"]
    folders = []
    for label in ("SFT", "GDRT"):
        if label not in labels:
            continue
        src, dst = Path(a.docs) / labels[label], out / labels[label]
        results = json.loads((src / "train_results.json").read_text())
        records = [json.loads(x) for x in (src / "test_predictions.jsonl").read_text().splitlines()]
        by_row = {x.row: x for x in ds.test}
        top1 = [r["topk_item_ids"][0] for r in records if r["topk_item_ids"]]
        results["test"] = {"users": len(records),
                           "top1_group_distribution": metrics.group_distribution(top1, item_group).tolist()}
        results["test_target_group_distribution"] = metrics.group_distribution(
            [ds.test[i].target for i in index[:len(records)]], item_group).tolist()
        assert {by_row[r["row"]].row for r in records} <= {ds.test[i].row for i in index}
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src / "adapter", dst / "best_adapter")
        files.write_json(dst / "results.json", results)
        folders.append(dst)
    return folders


def sensitivity(a, docs: Path, rows, sft_valid, sft_test, figs: Path) -> dict:
    """Fig. 10/11: validation and test NDCG@5 over the grid against SFT; and test DGU@5 over tau
    against SFT (seed 0, and its range over the tested seeds) and the uniform-Q control."""
    grid = parse_grid(a.grid)
    numbers = {}
    for g, t in grid:
        f = docs / gdrt_row(g, t)
        if (f / "train_results.json").exists():
            test = {"test NDCG@5": None, "test DGU@5": None}
            if (f / "test_predictions.jsonl").exists():
                c = rows.point(f.name)
                test = {"test NDCG@5": c["NDCG@5"], "test DGU@5": c["DGU@5"]}
            numbers[f"{g}:{t:g}"] = {"G": g, "tau": t, "valid NDCG@5": best_valid(f / "train_results.json")["NDCG@5"],
                                     **test}
    tested = lambda f: (f / "test_predictions.jsonl").exists()   # noqa: E731
    sft_dgu = [rows.point(f.name)["DGU@5"]
               for f in sorted(docs.glob("sft-s*")) if tested(f)]
    controls = {f"uniform Q, G={json.loads((f / 'train_results.json').read_text())['config']['groups']} (control)":
                rows.point(f.name)["DGU@5"]
                for f in sorted(docs.glob("groupmean-G*-s0")) if tested(f)}
    for split, key, sft in (("valid", "valid NDCG@5", sft_valid), ("test", "test NDCG@5", sft_test),
                            ("test", "test DGU@5", sft_dgu[0] if sft_dgu else None)):
        pts = [v for v in numbers.values() if v[key] is not None]
        if not pts:
            continue
        by_tau = {f"tau={t:g}": ([p["G"] for p in pts if p["tau"] == t], [p[key] for p in pts if p["tau"] == t])
                  for t in sorted({p["tau"] for p in pts})}
        by_g = {f"G={g}": ([p["tau"] for p in pts if p["G"] == g], [p[key] for p in pts if p["G"] == g])
                for g in sorted({p["G"] for p in pts})}
        if key == "test DGU@5":   # the fairness view (lower = fairer): tau, with the control
            plots.sensitivity(by_g, sft, figs / "fig11_sensitivity_tau_test_DGU5.png", "tau", "test DGU@5 (lower = fairer)",
                              "GDRT sensitivity to tau: fairness (test, seed 0)", log_x=True, refs=controls,
                              sft_band=(min(sft_dgu), max(sft_dgu)) if len(sft_dgu) > 1 else None)
            continue
        plots.sensitivity(by_tau, sft, figs / f"fig10_sensitivity_G_{split}.png", "G (token groups)", key,
                          f"GDRT sensitivity to G ({split})")
        plots.sensitivity(by_g, sft, figs / f"fig11_sensitivity_tau_{split}.png", "tau", key,
                          f"GDRT sensitivity to tau ({split})", log_x=True)
    return {"grid": numbers, "SFT valid NDCG@5": sft_valid, "SFT test NDCG@5": sft_test,
            "SFT test DGU@5 per seed": sft_dgu, "control test DGU@5": controls}


def composition(a, labels, docs, ds_name, data_dir) -> list[dict] | None:
    """The chosen GDRT run's token groups, rebuilt as train.py built them (Eq. 3 under the base model,
    cached; the run's training sample, G and seed), by position in the target."""
    if "GDRT" not in labels:
        return None
    cfg = json.loads((docs / labels["GDRT"] / "train_results.json").read_text())["config"]
    ds = load_dataset(ds_name, data_dir=data_dir, train_file=cfg["train_file"], train_samples=cfg["train_samples"],
                      seed=cfg["seed"], synthetic=config_for(ds_name, cfg["synthetic_size"]),
                      skip_bad=cfg.get("skip_bad", False))
    _, model, tokenizer = load_model(cfg["model"], device=a.device)
    builder = PromptBuilder(tokenizer, ds_name)
    groups = relevance.dataset_groups(model, builder, ds, cfg["groups"], cfg["grouping"], cfg["seed"]).token_groups
    return group_composition(make_examples(builder, ds.train, ds.titles), groups, cfg["groups"], tokenizer)


def softmax_figure(a, docs, rows, labels, figs) -> dict | None:
    """The diagnose phase at a glance: test DGU@5 of MSL, SFT and GDRT under each decoding, with 95%
    bootstrap intervals (each row on its own users)."""
    folders, groups = decode_folders(docs, labels), {}
    for (softmax, lp) in (("vocab", 1), ("vocab", 0), ("allowed", 1), ("allowed", 0)):
        cells = {}
        for label, decodes in folders.items():
            if (softmax, lp) in decodes:
                u = rows.users(decodes[(softmax, lp)])
                cells[label] = interval(u.table(weights(len(u.rows), a.bootstrap, 0))["DGU@5"])
        if cells:
            lineage = " (the lineage's)" if (softmax, lp) == ("vocab", 1) else ""
            groups[f"{SOFTMAX[softmax]} softmax\nlp {lp}{lineage}"] = cells
    if len(groups) < 2:
        return None
    plots.interval_bars(groups, figs / "msl_softmax_DGU5.png", "test DGU@5 (lower = fairer)",
                        "MSL, SFT and GDRT under each decoding softmax (our diagnostic)")
    return {k.replace("\n", ", "): v for k, v in groups.items()}


def figures(a):
    docs, figs = Path(a.docs), Path(a.figures)
    figs.mkdir(parents=True, exist_ok=True)
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size, a.skip_bad)
    item_group = read_item_groups(docs)
    labels = row_names(docs, a.grid)
    numbers = {"rows": labels}

    # Fig. 3/8 for every row, on each row's own users (the targets of the first N of the draw).
    index = json.loads((docs / "test_users.json").read_text())["index"]
    bars = {"test targets": metrics.group_distribution([ds.test[i].target for i in index], item_group).tolist()}
    for label, folder in labels.items():
        bars[f"{label} top-1"] = metrics.group_distribution(top1_items(docs, folder), item_group).tolist()
    plots.group_distribution(bars, figs / "fig3_rows_top1_groups.png")
    numbers["top1_group_distribution"] = bars

    sft_results = docs / "sft-s0" / "train_results.json"
    sft_valid = best_valid(sft_results)["NDCG@5"] if sft_results.exists() else None
    loaded = Rows(docs, ds.test, ds.titles, item_group)
    sft_test = loaded.point("sft-s0")["NDCG@5"] if "SFT" in labels else None
    numbers["sensitivity"] = sensitivity(a, docs, loaded, sft_valid, sft_test, figs)

    curves, groups = {}, {}
    for f in sorted(docs.glob("gdrt-*")) + sorted(docs.glob("msl-gdrt-*")):
        if (f / "train_results.json").exists():
            steps = json.loads((f / "train_results.json").read_text())["steps"]
            curves[f.name] = ([s["step"] for s in steps], q_entropy(steps))
            groups[f.name] = len(steps[0]["q"])                      # the run's G
    if curves:
        plots.effective_groups(curves, groups, figs / "q_effective_groups.png")
        numbers["q_effective_groups"] = {k: {"step": x, "exp_H_Q": y, "mean": float(np.nanmean(y))}
                                         for k, (x, y) in curves.items()}
    pts = weight_points(a, docs, loaded)
    if pts:
        G = parse_grid(a.robust_gdrt)[0][0]
        plots.labelled_scatter([{"x": p["weight"], "y": p["DGU@5"], "kind": p["kind"].split(" tau")[0],
                                 "label": p["run"]} for p in pts], figs / "group_weight_vs_fairness.png",
                               f"share of the loss weight on token group {G} (mean over steps)",
                               "test DGU@5 (lower = fairer)", f"Test fairness against the weight on token group {G} "
                               f"(dashed: uniform, 1/{G})", reference=1 / G)
        numbers["group_weight_vs_fairness"] = pts
    numbers["group_composition"] = composition(a, labels, docs, a.dataset, a.data_dir)
    numbers["msl_softmax_DGU5"] = softmax_figure(a, docs, loaded, labels, figs)

    # nanogdrt.analysis.analyze is most of this stage's time (attribution of --examples users under three
    # models); it depends on the SFT and GDRT adapters only, so it is kept while they are unchanged.
    inputs, marker = analyze_inputs(a, labels), figs / "analysis.json"
    if analyze_kept(figs, inputs):
        print("analyze: SFT and GDRT adapters unchanged since the last draw; its figures are kept", flush=True)
    else:
        runs = analyze_runs(a, labels, Path(a.runs) / "analyze", docs / "test_users.json", item_group, ds)
        if runs:
            analyze(runs, figs / "analyze", AnalyzeConfig(model=a.model, dataset=a.dataset, data_dir=a.data_dir,
                                                          examples=a.examples, device=a.device, heatmap_users=3))
    files.write_json(figs / "figures.json", numbers)
    files.write_json(marker, {"figures": "analyze/analysis.json", "rows": labels, "tested": tested_rows(docs),
                              "analyze_inputs": inputs})


def tested_rows(docs: Path) -> list[str]:
    """Every docs/repro folder with test predictions: the figures stage is redrawn when it changes
    (a new seed or control moves the dose figure and Fig. 11 without changing the report's rows)."""
    return sorted(f.parent.name for f in docs.glob("*/test_predictions.jsonl"))


def analyze_kept(figs: Path, inputs: dict) -> bool:
    """True when the committed analyze/ output in `figs` was made from `inputs` (analyze_inputs:
    the SFT and GDRT adapters and --examples that the figures stage would use now)."""
    marker = figs / "analysis.json"
    return (marker.exists() and (figs / "analyze" / "analysis.json").exists()
            and json.loads(marker.read_text()).get("analyze_inputs") == inputs)


def analyze_inputs(a, labels) -> dict:
    """What nanogdrt.analysis.analyze's output depends on: the SFT and GDRT folders and their adapters'
    checksums, and the number of examples."""
    docs = Path(a.docs)
    return {"examples": a.examples, **{label: [labels[label], sha256(docs / labels[label] / "adapter" /
                                                                      "adapter_model.safetensors")]
                                       for label in ("SFT", "GDRT") if label in labels}}
