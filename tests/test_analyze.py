"""nanogdrt.analysis.analyze on a tiny random Llama (real tokenizer) and two real train.py runs (SFT, GDRT):
every figure and number is written; Fig. 5's rates checked by hand; Fig. 2's ratios equal
attribution.segment_ratios (on the top-1 title of recommend) and attribution.context_ratios
computed directly; --attribution picks the definitions; missing inputs fail naming the path."""

import json
import math
import shutil

import matplotlib.image
import numpy as np
import pytest

from nanogdrt import attribution
from nanogdrt.analysis import analyze, plots
from nanogdrt.analysis.analyze import FIGURES, AnalyzeConfig
from nanogdrt.analysis.cooccurrence import cooccurrence_rates
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptIds


@pytest.fixture(scope="module")
def runs(train_py, tiny_model_dir, tmp_path_factory):
    """Two finished train.py runs on 24 synthetic windows: SFT (1 epoch) and GDRT (2 epochs)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGDRT_CACHE", str(root / "cache"))
        for method, epochs in (("sft", "1"), ("gdrt", "2")):
            train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--train-samples", "24",
                     "--valid-users", "4", "--test-users", "6", "--epochs", epochs, "--batch-size", "4",
                     "--beams", "4", "--eval-batch-size", "4", "--lr", "3e-3", "--method", method,
                     "--out", root / method)
    return root / "sft", root / "gdrt"


def test_cooccurrence_rates_by_hand():
    # Two examples: task ids {1, 2, 3}; histories {10, 11} and {11, 12}; targets [20 21 0], [20 22 0].
    a = PromptIds([1, 2, 10, 11, 3, 20, 21, 0], [(0, 2), (4, 5)], (2, 4), [(2, 4)], (5, 8))
    b = PromptIds([1, 2, 11, 12, 3, 20, 22, 0], [(0, 2), (4, 5)], (2, 4), [(2, 4)], (5, 8))
    r = cooccurrence_rates([a, b], min_count=1)
    # task: 3 ids x 4 targets; each task id is in all 6 target contexts; P(y|c) = (2+1+1+2)/6 / 4.
    assert r["task"] == {"pairs": 12, "given_target": {"mean": 1.0, "median": 1.0},
                         "given_context": pytest.approx({"mean": 0.25, "median": 0.25})}
    # prefix pairs (count): (20,21) 1, (20,0) 2, (21,0) 1, (20,22) 1, (22,0) 1; #y: 20:2 21:1 22:1 0:2;
    # #c in a prefix: 20:4, 21:1, 22:1.
    #   P(c|y) = 1, 1, 1/2, 1, 1/2 -> mean 0.8;  P(y|c) = 1/4, 2/4, 1, 1/4, 1 -> mean 0.6
    assert r["prefix"]["pairs"] == 5
    assert r["prefix"]["given_target"]["mean"] == pytest.approx(0.8)
    assert r["prefix"]["given_context"]["mean"] == pytest.approx(0.6)
    # interaction: 10 pairs; #c: 10:3, 11:6, 12:3. P(c|y) sums to 8 -> 0.8; P(y|c) sums to 3 -> 0.3.
    assert r["interaction"]["pairs"] == 10
    assert r["interaction"]["given_target"]["mean"] == pytest.approx(0.8)
    assert r["interaction"]["given_context"]["mean"] == pytest.approx(0.3)
    # min_count=2 keeps y in {20, 0} and c seen twice: prefix keeps only (20, 0): 2/2 and 2/4.
    r2 = cooccurrence_rates([a, b], min_count=2)
    assert r2["prefix"]["pairs"] == 1
    assert r2["prefix"]["given_target"]["mean"] == 1.0 and r2["prefix"]["given_context"]["mean"] == 0.5
    # interaction: every history id is in >= 3 target contexts, so only y decides: (c, 20), (c, 0)
    # for c in 10, 11, 12; P(c|y) = 1/2, 1/2, 1, 1, 1/2, 1/2 -> mean 2/3.
    assert r2["interaction"]["pairs"] == 6
    assert r2["interaction"]["given_target"]["mean"] == pytest.approx(2 / 3)


def non_trivial_png(path):
    img = matplotlib.image.imread(path)[..., :3]            # (H, W, 3) in [0, 1]
    ink = (img < 0.9).any(-1).mean()                         # share of non-white pixels
    return path.stat().st_size > 10_000 and img.shape[0] > 300 and 0.02 < ink < 0.6 and img.std() > 0.05


def test_analyze_writes_every_figure_and_the_numbers(runs, tiny_model_dir, tmp_path, capsys):
    sft, gdrt = runs
    out = tmp_path / "figures"
    analyze.main(["--runs", str(sft), str(gdrt), "--examples", "3", "--min-count", "2", "--out", str(out)])
    assert "figures and analysis.json" in capsys.readouterr().out
    for name in FIGURES.values():
        assert non_trivial_png(out / name), name
    res = json.loads((out / "analysis.json").read_text())   # strict JSON: NaN became null
    assert res["labels"] == ["SFT", "GDRT"] and set(res["figures"]) == set(FIGURES)
    assert res["config"]["model"] == str(tiny_model_dir) and res["config"]["dataset"] == "synthetic"
    assert not list(out.glob(".*.tmp"))                       # the atomic write left nothing behind

    results = {k: json.loads((d / "results.json").read_text()) for k, d in (("SFT", sft), ("GDRT", gdrt))}
    assert res["top1_group_distribution"]["test targets"] == results["SFT"]["test_target_group_distribution"]
    for label, r in results.items():
        assert res["top1_group_distribution"][f"{label} top-1"] == r["test"]["top1_group_distribution"]
        assert res["group1_share_by_epoch"][label]["share"] == [e["top1_group1_share"] for e in r["epochs"]]
        logged = res["group_loss"][label]["group_loss"]
        assert len(logged) == len(r["steps"])
        for row, step in zip(logged, r["steps"]):  # a group absent from a step: null, else the logged loss
            assert row == [None if v == 0 else v for v in step["group_loss"]]
    assert len(res["group1_share_by_epoch"]["GDRT"]["epoch"]) == 2

    # Fig. 2: the base model's ratios are attribution's on the same rows, both definitions.
    att = res["attribution"]
    assert set(att["models"]) == {"base (no fine-tuning)", "SFT", "GDRT"} and len(att["rows"]) == 3
    assert att["definitions"] == {"segment": "segment (paper)", "per-token": "per-token (ours)"}
    assert att["paper"] is None                               # the paper's numbers are for Toy only
    from nanogdrt.data import load_dataset
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.recommend import Decoding, recommend
    from nanogdrt.trie import Trie
    from nanogdrt.tokenizer import Tokenizer

    ds = load_dataset("synthetic")
    builder = PromptBuilder(Tokenizer(tiny_model_dir), "synthetic")
    model = Llama.from_pretrained(tiny_model_dir).eval()
    chosen = [ds.test[r] for r in att["rows"]]
    direct = attribution.context_ratios([attribution.attribute(
        model, builder.build([ds.titles[i] for i in x.history], ds.titles[x.target]), builder.tokenizer)
        for x in chosen])
    base = att["models"]["base (no fine-tuning)"]
    assert base["per-token"]["task_ratio"] == pytest.approx(direct.task_ratio, rel=1e-4)
    assert base["per-token"]["prefix_ratio"] == pytest.approx(direct.prefix_ratio, rel=1e-4)
    top1 = [r["topk_item_ids"][0] for r in recommend(model, builder, Trie.from_titles(ds.titles, builder), chosen,
                                                     ds.titles, Decoding(beams=10, top_k=1))]
    assert base["segment"]["predicted_item_ids"] == top1
    seg = attribution.segment_ratios([attribution.segment_attribution(
        model, builder, [ds.titles[i] for i in x.history], ds.titles[item]) for x, item in zip(chosen, top1)])
    for key in ("task_ratio", "task_ratio_mean", "instruction_ratio", "prefix_ratio", "prefix_ratio_mean"):
        assert base["segment"][key] == pytest.approx(getattr(seg, key), rel=1e-4), key
    # The trained adapters change the model, so their attributions differ from the base model's.
    assert att["models"]["SFT"]["per-token"]["per_example"] != base["per-token"]["per_example"]
    assert att["models"]["SFT"]["segment"]["per_example"] != base["segment"]["per_example"]

    co = res["cooccurrence"]
    assert co["train_examples"] == 24 and co["types"]["task"]["given_target"]["mean"] == 1.0
    for kind in ("prefix", "interaction"):
        assert co["types"][kind]["pairs"] > 0
        assert 0 < co["types"][kind]["given_context"]["mean"] <= 1 and math.isfinite(
            co["types"][kind]["given_target"]["mean"])


def test_base_model_only_and_no_attribution(tiny_model_dir, tmp_path):
    """No runs: Fig. 2 for the base model and Fig. 5 only; --examples 0 skips the attribution."""
    res = analyze.analyze([], tmp_path / "a", AnalyzeConfig(model=str(tiny_model_dir), examples=2, min_count=1))
    assert set(res["figures"]) == {"attribution", "cooccurrence"}
    assert list(res["attribution"]["models"]) == ["base (no fine-tuning)"]
    assert set(res["attribution"]["models"]["base (no fine-tuning)"]) == {"segment", "per-token"}
    assert non_trivial_png(tmp_path / "a" / FIGURES["attribution"])
    for only in ("segment", "per-token"):
        res = analyze.analyze([], tmp_path / only, AnalyzeConfig(model=str(tiny_model_dir), examples=2,
                                                                 min_count=1, attribution_defs=only, beams=4))
        assert set(res["attribution"]["models"]["base (no fine-tuning)"]) == {only}
        assert non_trivial_png(tmp_path / only / FIGURES["attribution"])
    with pytest.raises(ValueError, match="attribution definition 'paper'"):
        analyze.analyze([], tmp_path / "c", AnalyzeConfig(model=str(tiny_model_dir), examples=2,
                                                          attribution_defs="paper"))
    res = analyze.analyze([], tmp_path / "b", AnalyzeConfig(model=str(tiny_model_dir), examples=0, min_count=1))
    assert set(res["figures"]) == {"cooccurrence"} and "attribution" not in res
    assert np.isfinite(res["cooccurrence"]["types"]["prefix"]["given_target"]["mean"])


def test_missing_inputs_name_the_path(runs, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit, match=f"error: run folder {missing} not found"):
        analyze.main(["--runs", str(missing), "--out", str(tmp_path / "o")])
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"{empty / 'results.json'} not found"):
        analyze.main(["--runs", str(empty), "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "results.json").write_text('{"config": {}}')
    with pytest.raises(SystemExit, match=f"{broken / 'results.json'}: missing key 'epochs'"):
        analyze.main(["--runs", str(broken), "--out", str(tmp_path / "o")])
    no_adapter = tmp_path / "no-adapter"
    shutil.copytree(runs[0], no_adapter, ignore=shutil.ignore_patterns("best_adapter"))
    with pytest.raises(SystemExit, match=f"{no_adapter / 'best_adapter' / 'adapter_model.safetensors'} not found"):
        analyze.main(["--runs", str(no_adapter), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "analysis.json").exists()


def test_toy_reports_the_papers_numbers(tiny_model_dir, toy_dir, tmp_path):
    """On Toy, analysis.json and Fig. 2 carry the paper's ratios beside ours (base model only here)."""
    res = analyze.analyze([], tmp_path, AnalyzeConfig(model=str(tiny_model_dir), dataset="toy", data_dir=str(toy_dir),
                                                      examples=2, min_count=5, attribution_defs="segment", beams=4))
    paper = res["attribution"]["paper"]
    assert paper["dataset"] == "toy" and paper["task_ratio"] == {"base (no fine-tuning)": 1.0, "SFT": 4.69}
    assert non_trivial_png(tmp_path / FIGURES["attribution"])


def test_fig2_axis_fits_bars_and_stars_not_an_outlier_dot(tmp_path):
    """One per-example mean of -20.5 (a tiny interaction drop) must not squash the bars: the axis
    spans the bars, the paper's stars and 1, and the dot is drawn at the edge."""
    panel = {"title": "segment", "xticks": ("task", "prefix"),
             "bars": {"base": (0.30, 0.20), "SFT": (0.30, 0.19)},
             "dots": {"base": (-20.5, 0.25), "SFT": (0.31, 0.18)},
             "paper": {"SFT": (4.69, None)}}
    lo, hi = plots._ratio_axis(panel)
    assert lo == 0.0 and 4.69 < hi < 6.0
    plots.attribution_ratios([panel], tmp_path / "fig2.png", n_examples=100, split="test")
    assert (tmp_path / "fig2.png").stat().st_size > 1000


def test_moving_average_and_effective_groups_panels(tmp_path):
    smooth, w = plots.moving_average([1, 2, 3, 4, 5], 2)
    np.testing.assert_allclose(smooth, [1.5, 2.5, 3.5, 4.5])
    assert w == 2 and plots.moving_average([1, 3], 10)[0].tolist() == [2.0]   # shorter: the whole series
    steps = list(range(1, 31))
    curves = {"g2": (steps, [1.0 + (s % 2) for s in steps]), "g5": (steps, [4.0] * 30), "g5b": (steps, [1.0] * 30)}
    plots.effective_groups(curves, {"g2": 2, "g5": 5, "g5b": 5}, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000
    plots.group_distribution({f"row {i}": [0.2] * 5 for i in range(10)}, tmp_path / "bars.png")   # legend outside
    assert (tmp_path / "bars.png").stat().st_size > 1000
