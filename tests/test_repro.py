"""experiments/repro and nanogdrt/stats.py: the report's arithmetic against direct computations, and the staged run end
to end on a tiny random Llama and the small synthetic data (stages run, outputs land in the row
folders with checksums, finished stages are skipped, --only/--stages/--max-minutes select)."""

import argparse
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from experiments.repro import normaliser, report, robust
from experiments.repro.data import load_model
from experiments.repro.rows import chosen, gdrt_row, msl_row, parse_grid, sha256
from experiments.repro.runner import main as repro_main
from nanogdrt import files, metrics, stats

ROOT = Path(__file__).resolve().parent.parent


def _users(n, hit_rate, seed):
    rng = np.random.default_rng(seed)
    records, by_row = [], {}
    for u in range(n):
        items = [int(x) for x in rng.choice(50, 10, replace=False)]
        target = items[int(rng.integers(0, 10))] if rng.random() < hit_rate else 99
        by_row[u] = SimpleNamespace(row=u, target=target, history=[int(x) for x in rng.choice(50, 4)])
        records.append({"row": u, "topk_item_ids": items})
    return records, by_row


TITLES = {i: f"item {i}" for i in range(100)}
GROUPS = {i: 1 + i % 5 for i in range(100)}


def test_bootstrap_point_is_the_metric_and_paired_difference_resolves_a_real_gap():
    (sft_rec, by_row), (gdrt_rec, by_row2) = _users(150, 0.3, 0), _users(150, 0.6, 1)
    sft = stats.Users(sft_rec, by_row, TITLES, GROUPS)
    gdrt = stats.Users(gdrt_rec, by_row2, TITLES, GROUPS)
    table = stats.bootstrap({"SFT": sft, "GDRT": gdrt}, "SFT", B=300)
    for name, (rec, rows) in (("SFT", (sft_rec, by_row)), ("GDRT", (gdrt_rec, by_row2))):
        direct = metrics.evaluate([r["topk_item_ids"] for r in rec], [rows[r["row"]].target for r in rec],
                                  [rows[r["row"]].history for r in rec], item_group=GROUPS, titles=TITLES)
        for k in stats.TABLE_KEYS:
            v, lo, hi = table[name][k]
            assert v == pytest.approx(direct[k], abs=1e-12) and lo <= v <= hi
    d = table["GDRT - SFT"]["HR@10"]
    assert d[1] > 0 and stats.verdict(d, "HR@10") == "reproduced"
    same = stats.paired(sft, sft, 50, 0)
    assert all(same[k] == (0.0, 0.0, 0.0) for k in stats.TABLE_KEYS)
    assert stats.verdict((0.1, -0.2, -0.05), "DGU@5") == "reproduced"       # lower is better
    assert stats.verdict((0.1, 0.05, 0.2), "DGU@5") == "not reproduced"
    assert stats.verdict((0.0, -0.1, 0.1), "NDCG@5") == "not resolved at this scale"


def test_resample_weights_equal_metrics_of_the_resampled_users():
    rec, by_row = _users(40, 0.5, 2)
    u = stats.Users(rec, by_row, TITLES, GROUPS)
    w = stats.weights(40, 3, seed=1)
    t = u.table(w)
    for b in range(1, 4):
        idx = np.repeat(np.arange(40), w[b].astype(int))
        direct = metrics.evaluate([rec[i]["topk_item_ids"] for i in idx], [by_row[i].target for i in idx],
                                  [by_row[i].history for i in idx], item_group=GROUPS, titles=TITLES)
        for k in stats.TABLE_KEYS:
            assert t[k][b] == pytest.approx(direct[k], abs=1e-12)


def test_q_entropy_and_group_composition(tiny_model_dir):
    eff = stats.q_entropy([{"q": [0.25] * 4}, {"q": [1.0, 0, 0, 0]}, {"q": [0.5, 0.5, 0, 0]}])
    assert eff == pytest.approx([4.0, 1.0, 2.0])
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer
    tok = Tokenizer(tiny_model_dir)
    b = PromptBuilder(tok, "synthetic")
    x = SimpleNamespace(history=[1, 2], target=3, row=0)
    p = b.for_interaction(x, {1: "Red Ball", 2: "Blue Car", 3: "Toy Robot Deluxe"}, with_target=True)
    n = p.target[1] - p.target[0]
    comp = stats.group_composition([p], [torch.ones(n, dtype=torch.long)], 2, tok)
    shares = {k: v for k, v in comp[0].items() if k not in ("group", "tokens", "top_tokens")}
    assert comp[0]["tokens"] == n and comp[1]["tokens"] == 0 and sum(shares.values()) == pytest.approx(1)
    assert shares["EOS"] == pytest.approx(1 / n, abs=1e-4) and shares["first title token"] == pytest.approx(1 / n, abs=1e-4)
    counts = Counter(list(p.ids[p.target[0]:p.target[1]]))     # the target's own tokens, most frequent first
    top = comp[0]["top_tokens"]
    assert [share for _, share in top] == pytest.approx([c / n for _, c in counts.most_common(8)], abs=1e-4)
    assert {t for t, _ in top} <= {tok.decode([i]) or "<EOS>" for i in counts} and comp[1]["top_tokens"] == []
    assert "<EOS>" in {t for t, _ in top}                           # the special token, named
    assert stats.token_cell(' a|b') == '" a\\|b"'


def test_q_summary_reads_q_and_the_loss_spread_against_tau():
    steps = [{"q": [0.0, 0.02, 0.98, 0.0], "group_loss": [0.0, 3.0, 5.0, 0.0]},      # groups 1, 4 absent
             {"q": [0.2, 0.3, 0.5, 0.0], "group_loss": [1.0, 1.5, 2.0, 0.0]}]
    q = stats.q_summary(steps, tau=0.5)
    assert q["loss_spread"] == pytest.approx((2.0 + 1.0) / 2)      # max - min over the present groups only
    assert q["spread_over_tau"] == pytest.approx(3.0) and q["max_q"] == pytest.approx(0.74)
    assert q["one_hot_share"] == 0.5 and q["top_group"] == 3 and q["top_group_share"] == 1.0
    assert q["exp_H_Q"] == pytest.approx(np.mean(stats.q_entropy(steps)))


def test_welch_interval_against_scipy_and_the_seed_verdict():
    import scipy.stats
    gdrt, sft = [0.148, 0.139, 0.151], [0.268, 0.214, 0.255]
    d, lo, hi = stats.welch_interval(gdrt, sft)
    ref = scipy.stats.ttest_ind(gdrt, sft, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(gdrt) - np.mean(sft)) and (lo, hi) == pytest.approx((ref.low, ref.high))
    seeds = {"SFT": [{k: 0.0 for k in stats.TABLE_KEYS} | {"DGU@5": x} for x in sft],
             "GDRT": [{k: 0.0 for k in stats.TABLE_KEYS} | {"DGU@5": x} for x in gdrt]}
    row = robust.seed_verdicts(seeds)[0]
    assert f"reproduced (-0.0997 [{lo:+.4f}, {hi:+.4f}])" in row   # lower DGU@5 is better
    assert robust.seed_verdicts({"SFT": seeds["SFT"], "GDRT": seeds["GDRT"][:1]}) == []   # one seed: no spread
    seeds[robust.CONTROL] = seeds["SFT"]                # any pair of rows: A - B, Welch
    flipped = robust.seed_differences(seeds, "SFT", "GDRT")["DGU@5"]
    assert flipped == pytest.approx((-d, -hi, -lo))
    table = "\n".join(robust.seeds_section(argparse.Namespace(robust_gdrt="5:0.5"), seeds))
    assert "| GDRT - SFT | seed means |" in table and f"| {robust.CONTROL} - SFT | seed means |" in table
    assert stats.effect_word((-0.10, -0.14, -0.06), "DGU@5") == "helps"          # lower is better
    assert stats.effect_word((-0.01, -0.02, -0.005), "NDCG@10") == "hurts"
    assert stats.effect_word((0.01, -0.01, 0.02), "NDCG@10") == "no resolved difference"


def test_spearman_against_scipy_and_the_weight_on_a_group():
    import scipy.stats
    x, y = [0.1, 0.1, 0.2, 0.36, 0.54, 0.77], [0.27, 0.21, 0.21, 0.16, 0.15, 0.15]   # ties in both
    assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    sft = {"steps": [{"q": [0, 0, 0]}] * 2, "token_groups": {"counts": [6, 3, 1]}}       # token mean: N_g / N
    assert stats.group_weight(sft, 3) == pytest.approx(0.1)
    gdrt = {"steps": [{"q": [0.1, 0.2, 0.7]}, {"q": [0.3, 0.2, 0.5]}], "token_groups": {"counts": [6, 3, 1]}}
    assert stats.group_weight(gdrt, 3) == pytest.approx(0.6)                      # mean Q(g) over steps


def test_paper_size_reading_by_the_sign_of_the_paper_change():
    read = report.size_reading
    assert read(0.004, -0.004, 0.002) == "outside: ours is smaller"      # a gain the interval excludes
    assert read(0.004, 0.005, 0.009) == "outside: ours is larger"
    assert read(0.004, 0.001, 0.009).startswith("inside")
    assert read(-0.09, -0.14, -0.10) == "outside: ours is larger"        # a drop (DGU@5) beyond the paper's
    assert read(-0.09, -0.05, 0.01) == "outside: ours is smaller"
    assert read(-0.09, -0.15, -0.03).startswith("inside")


def test_grid_spec_is_checked():
    assert parse_grid("5:0.5,2:1") == [(5, 0.5), (2, 1.0)]
    with pytest.raises(SystemExit, match="--grid"):
        parse_grid("5-0.5")


def test_one_selection_rule_for_every_chosen_row(tmp_path):
    """stats.choose is the one selection rule (the GDRT grid, the MSL taus, the GPU protocol), and
    chosen the one place the reproduction applies it: NDCG@5, ties broken by NDCG@10 then HR@10;
    on a full tie the first row."""
    a, b = {"NDCG@5": 0.1, "NDCG@10": 0.2, "HR@10": 0.3}, {"NDCG@5": 0.1, "NDCG@10": 0.3, "HR@10": 0.0}
    assert stats.choose({"a": a, "b": b}) == "b" and stats.choose({"a": a, "c": dict(a)}) == "a"
    assert chosen(tmp_path, [gdrt_row(5, 0.5)]) is None                 # nothing trained yet
    for row, valid in (("msl-tau1-s0", a), ("msl-tau4.5-s0", b)):
        (tmp_path / row).mkdir()
        files.write_json(tmp_path / row / "train_results.json", {"best_epoch": 2, "epochs": [
            {"epoch": 1, "valid": {k: 1.0 for k in valid}}, {"epoch": 2, "valid": valid}]})
    assert chosen(tmp_path, [msl_row(1), msl_row(4.5)]) == "msl-tau4.5-s0"


@pytest.fixture(scope="module")
def staged(tiny_model_dir, tmp_path_factory):
    """Arguments of a tiny reproduction: synthetic small, 1 seed, one grid point."""
    tmp = tmp_path_factory.mktemp("repro")
    return tmp, ["--dataset", "synthetic", "--synthetic-size", "small", "--model", str(tiny_model_dir),
                 "--train-file", "", "--train-samples", "16", "--epochs", "1", "--valid-users", "4",
                 "--test-users", "6", "--other-test-users", "4", "--seeds", "1", "--grid", "5:0.5",
                 "--robust-gdrt", "5:0.5", "--msl-taus", "4.5", "--examples", "2", "--bootstrap", "50", "--control-seeds", "1",
                 "--train-extra", "--batch-size 8 --beams 3",
                 "--docs", str(tmp / "docs"), "--runs", str(tmp / "runs"), "--figures", str(tmp / "figs"),
                 "--results", str(tmp / "results.md")]


def test_stages_run_collect_checksum_and_skip(staged, capsys):
    tmp, args = staged
    repro_main(args + ["--max-minutes", "0.001"])            # nothing fits: nothing runs
    assert "does not fit" in capsys.readouterr().out and not (tmp / "docs" / "manifest.json").exists()
    repro_main(args + ["--stages", "data,robust,report"])
    docs = tmp / "docs"
    users = json.loads((docs / "test_users.json").read_text())
    for row, n in (("sft-s0", 6), ("gdrt-G5-tau0.5-s0", 6), ("base", 4)):
        lines = (docs / row / "test_predictions.jsonl").read_text().splitlines()
        assert [json.loads(x)["row"] for x in lines] == users["rows"][:n]    # the first n of one draw
    manifest = json.loads((docs / "manifest.json").read_text())
    adapter = docs / "sft-s0" / "adapter" / "adapter_model.safetensors"
    assert manifest["train:sft-s0"]["sha256"]["sft-s0/adapter/adapter_model.safetensors"] == sha256(adapter)
    assert "--method sft" in manifest["train:sft-s0"]["command"] and manifest["test:base"]["seconds"] > 0
    train = json.loads((docs / "gdrt-G5-tau0.5-s0" / "train_results.json").read_text())
    assert train["config"]["groups"] == 5 and train["config"]["train_samples"] == 16
    report = (tmp / "results.md").read_text()
    for needle in ("| SFT (sft-s0) | 6 |", "| GDRT (gdrt-G5-tau0.5-s0) | 6 |", "GDRT - SFT", "| GDRT beats SFT |",
                   "| 5 | 0.5 |", "train:sft-s0", "## Setup", "## What GDRT trains on", "Why Q goes one-hot",
                   "The paper's effect size at our scale", "| NDCG@10 | 0.0158 -> 0.0203 | +28.5% |",
                   "## Item groups and title length", "| test targets (the same users) |", "GDRT's top-1 titles minus SFT's"):
        assert needle in report
    capsys.readouterr()
    repro_main(args + ["--stages", "data,robust"])            # everything done: all skipped
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 6 and "===" not in out.replace("done, skipped", "").replace("=== ", "", 6)
    assert json.loads((docs / "manifest.json").read_text()) == manifest
    repro_main(args + ["--list", "--only", "train:*"])
    listed = capsys.readouterr().out
    assert "done  robust     train:sft-s0" in listed and "todo  sweep      train:gdrt" not in listed   # grid: G5 only
    assert "todo  sweep      train:groupmean-G5-s0" in listed
    assert "todo  baselines  train:msl-tau4.5-s0" in listed


def test_commit_makes_one_commit_per_finished_stage(staged, tmp_path):
    import subprocess
    _, args = staged
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "other.txt").write_text("a user's uncommitted work\n")
    own = args[:args.index("--docs")] + ["--docs", str(repo / "docs"), "--runs", str(tmp_path / "runs"),
                                         "--figures", str(repo / "figs"), "--results", str(repo / "results.md")]
    repro_main(own + ["--only", "groups", "--commit"])
    log = git("log", "--format=%s")
    assert log.startswith("Reproduction: stage groups (") and log.count("\n") == 1
    assert "docs/item_groups.json" in git("ls-files") and "other.txt" not in git("ls-files")   # outputs only
    repro_main(own + ["--only", "groups", "--commit"])          # done: skipped, no second commit
    assert git("log", "--format=%s").count("\n") == 1
    with pytest.raises(SystemExit, match="--commit: .* is not inside a git work tree"):
        repro_main(own[:own.index("--docs")] + ["--docs", str(tmp_path / "nogit" / "docs"), "--only", "groups",
                                                 "--commit"])


def test_control_row_trains_uniform_q_and_is_reported_against_gdrt(staged):
    """Our control (group-mean: GDRT's groups, Q = 1/G) runs as its own row and the report pairs
    it with GDRT of the same G on the same users."""
    tmp, args = staged
    repro_main(args + ["--stages", "data,robust"])            # skipped when the test above ran
    repro_main(args + ["--only", "train:groupmean-*,test:groupmean-*,report"])
    docs = tmp / "docs"
    train = json.loads((docs / "groupmean-G5-s0" / "train_results.json").read_text())
    assert train["config"]["method"] == "group-mean" and train["config"]["groups"] == 5
    for step in train["steps"]:
        present = [x > 0 for x in step["group_loss"]]
        assert step["q"] == pytest.approx([p / sum(present) for p in present])
    report = (tmp / "results.md").read_text()
    assert "| 5 | inf: uniform Q (control) |" in report and "our addition, not the paper's" in report
    assert "| gdrt-G5-tau0.5-s0 - groupmean-G5-s0 | 4 |" in report   # paired on the 4 users both have
    assert "## Dose and response: the weight on token group 5" in report
    assert "| groupmean-G5-s0 (uniform Q (control)) | 0.20 |" in report


def test_sasrec_stage(staged):
    tmp, args = staged
    repro_main(args + ["--only", "sasrec", "--sasrec-extra", "--epochs 1 --hidden 8"])
    docs = tmp / "docs"
    assert (docs / "sasrec" / "results.json").exists() and (docs / "sasrec" / "test_predictions.jsonl").exists()


def test_figures(staged, capsys):
    tmp, args = staged
    repro_main(args + ["--only", "figures"])
    figs = tmp / "figs"
    numbers = json.loads((figs / "figures.json").read_text())
    assert numbers["sensitivity"]["grid"]["5:0.5"]["G"] == 5 and "SFT top-1" in numbers["top1_group_distribution"]
    comp = numbers["group_composition"]
    assert len(comp) == 5 and sum(g["tokens"] for g in comp) > 0
    assert numbers["q_effective_groups"]["gdrt-G5-tau0.5-s0"]["mean"] <= 5 + 1e-9
    assert numbers["sensitivity"]["grid"]["5:0.5"]["test DGU@5"] is not None
    for png in ("fig3_rows_top1_groups.png", "fig10_sensitivity_G_valid.png", "fig11_sensitivity_tau_test.png",
                "fig11_sensitivity_tau_test_DGU5.png", "group_weight_vs_fairness.png",
                "q_effective_groups.png", "analyze/fig2_attribution_ratios.png", "analyze/heatmap/heatmap.html"):
        assert (figs / png).stat().st_size > 500, png
    # A new tested folder redraws the figures; analyze (the slow part) is kept while SFT's and GDRT's
    # adapters are unchanged, and redone when one changes.
    marker = json.loads((figs / "analysis.json").read_text())
    assert marker["tested"] == sorted(p.parent.name for p in (tmp / "docs").glob("*/test_predictions.jsonl"))
    analysis = figs / "analyze" / "analysis.json"
    before = analysis.stat().st_mtime_ns
    files.write_json(figs / "analysis.json", {**marker, "tested": []})
    capsys.readouterr()
    repro_main(args + ["--list", "--only", "figures"])
    assert "todo  figures    figures                      ~    2 min" in capsys.readouterr().out   # analyze kept
    repro_main(args + ["--only", "figures"])
    assert analysis.stat().st_mtime_ns == before
    assert json.loads((figs / "analysis.json").read_text())["tested"] == marker["tested"]
    files.write_json(figs / "analysis.json", {**marker, "tested": [], "analyze_inputs": {}})
    repro_main(args + ["--only", "figures"])
    assert analysis.stat().st_mtime_ns != before


def test_forced_share_counts_single_continuations_per_item_group():
    """Titles (EOS = 2) a: [5, 6, 2], b: [5, 7, 2], c: [8, 2]: the root has children 5 and 8, after
    5 come 6 or 7, every other prefix has one continuation (EOS). a and b: 1 of 3 positions
    forced; c: 1 of 2."""
    from nanogdrt.trie import Trie
    trie = Trie.from_token_ids({10: [5, 6, 2], 11: [5, 7, 2], 12: [8, 2]}, eos_id=2)
    share = normaliser.forced_share(trie, {10: 1, 11: 2, 12: 2})
    assert share == pytest.approx({1: 1 / 3, 2: (1 / 3 + 1 / 2) / 2})


def test_allowed_mass_against_one_forward_per_target_position(tiny_model_dir):
    """allowed_mass (batched, right-padded, teacher-forced) against a forward pass per target
    position, with each allowed set found by listing the titles that share the prefix."""
    from nanogdrt.llama import Llama
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer
    from nanogdrt.trie import Trie
    model = Llama.from_pretrained(tiny_model_dir).eval()
    builder = PromptBuilder(Tokenizer(tiny_model_dir), "synthetic")
    titles = {1: "Red Ball", 2: "Red Ball Deluxe", 3: "Red Car", 4: "Blue Car", 5: "Toy Robot Deluxe"}
    users = [SimpleNamespace(history=[1, 2], target=3, row=7), SimpleNamespace(history=[4], target=5, row=8),
             SimpleNamespace(history=[3, 5, 4], target=2, row=9)]
    got = normaliser.allowed_mass(model, builder, Trie.from_titles(titles, builder), users, titles, batch_size=2)
    targets = [builder.target_ids(t) for t in titles.values()]
    assert got["rows"] == [7, 8, 9]
    for u, x in enumerate(users):
        ex = builder.for_interaction(x, titles, with_target=True)
        y = ex.ids[ex.target[0]:ex.target[1]]
        sums = {"forced": 0.0, "branching": 0.0}
        for j in range(len(y)):
            allowed = sorted({t[j] for t in targets if len(t) > j and list(t[:j]) == y[:j]})
            with torch.no_grad():
                logp = model.logits(model.hidden_states(torch.tensor([ex.ids[:ex.target[0] + j]])))[0, -1].log_softmax(-1)
            sums["forced" if len(allowed) == 1 else "branching"] += float(logp[allowed].logsumexp(-1))
        assert got["forced"][u] == pytest.approx(sums["forced"], abs=1e-4)
        assert got["branching"][u] == pytest.approx(sums["branching"], abs=1e-4)
        assert got["n_forced"][u] + got["n_branching"][u] == len(y)


def test_mass_command_names_a_missing_adapter_before_any_work(tmp_path):
    users = tmp_path / "test_users.json"
    users.write_text('{"index": [0]}')
    with pytest.raises(SystemExit, match="nosuch/adapter does not exist"):
        normaliser.main(["mass", "--dataset", "synthetic", "--docs", str(tmp_path), "--rows", "base,nosuch",
                               "--users-file", str(users), "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_normaliser_diagnostic_decodes_msl_and_sft_and_is_reported(staged):
    """Phase diagnose: the chosen MSL row, SFT and the chosen GDRT row decoded with --normaliser
    allowed and/or --length-penalty 0 into their own folders, on the same users; the report pairs
    each with its vocabulary-softmax decode, and MSL and GDRT with SFT under each decoding."""
    tmp, args = staged
    repro_main(args + ["--stages", "data,robust"])            # skipped when the tests above ran
    repro_main(args + ["--only", "train:msl-tau4.5-s0,test:msl,test:msl-allowed,test:sft-allowed,"
                                 "test:msl-lp0,test:msl-allowed-lp0,test:sft-allowed-lp0,test:gdrt-allowed-lp0,"
                                 "mass,figures,report"])
    docs = tmp / "docs"
    manifest = json.loads((docs / "manifest.json").read_text())
    for row, source, options in (("msl-allowed", "msl-tau4.5-s0", "--normaliser allowed"),
                                 ("sft-allowed", "sft-s0", "--normaliser allowed"),
                                 ("msl-lp0", "msl-tau4.5-s0", "--length-penalty 0"),
                                 ("sft-allowed-lp0", "sft-s0", "--normaliser allowed --length-penalty 0")):
        command = manifest[f"test:{row}"]["command"]
        assert f"--adapter {docs / source / 'adapter'} {options} --out" in command
        rows = lambda f: [json.loads(x)["row"] for x in (docs / f / "test_predictions.jsonl").read_text().splitlines()]  # noqa: E731
        assert rows(row) == rows(source)[:len(rows(row))] and len(rows(row)) == 4
    report = (tmp / "results.md").read_text()
    assert "## Why MSL is the least fair LLM row: the decoding's softmax" in report
    assert "| forced positions |" in report and "| MSL (msl-tau4.5-s0) | vocabulary | 1 |" in report
    assert "| SFT (sft-allowed-lp0) | allowed tokens | 0 |" in report and "| MSL, lp 0: allowed - vocabulary |" in report
    for contrast in ("MSL - SFT", "GDRT - SFT"):
        assert f"| {contrast}, allowed tokens softmax, lp 0 |" in report
    command = manifest["test:gdrt-allowed-lp0"]["command"]
    assert "gdrt-G5-tau0.5-s0/adapter --normaliser allowed --length-penalty 0" in command
    mass = json.loads((docs / "allowed_mass.json").read_text())
    assert list(mass["models"]) == ["base", "sft-s0", "msl-tau4.5-s0"] and mass["users"] == 4
    assert "| msl-tau4.5-s0 | forced |" in report
    drawn = json.loads((tmp / "figs" / "figures.json").read_text())["msl_softmax_DGU5"]
    assert set(drawn["allowed tokens softmax, lp 0"]) == {"MSL", "SFT", "GDRT"} and "vocabulary softmax, lp 0" in drawn
    assert (tmp / "figs" / "msl_softmax_DGU5.png").stat().st_size > 500 and "msl_softmax_DGU5.png" in report


# ----------------------------------------------------------------------------- shipped adapters

SHIPPED = sorted(p.parent.parent.name for p in (ROOT / "docs" / "repro").glob("*/adapter/adapter_model.safetensors"))
CHECK_USERS = 20


# The rows README's summary names are loaded and re-decoded; every other committed adapter has its
# checksum checked only (each re-decode costs ~30 s of CI, and the grid ships a dozen adapters).
HEADLINE = [r for r in ("sft-s0", "gdrt-G5-tau0.5-s0") if r in SHIPPED]


def test_every_shipped_adapter_matches_its_manifest_checksum():
    docs = ROOT / "docs" / "repro"
    manifest = json.loads((docs / "manifest.json").read_text())
    for row in SHIPPED:
        sums = manifest["train:" + row]["sha256"]
        for f in sorted((docs / row / "adapter").iterdir()):
            assert sums[f"{row}/adapter/{f.name}"] == sha256(f), f


@pytest.mark.parametrize("row", HEADLINE or [pytest.param(None, marks=pytest.mark.skip("no committed adapters"))])
def test_shipped_adapter_checksum_peft_and_metrics(row, smollm_dir, toy_dir):
    """A committed adapter: its sha256 is the manifest's, PEFT loads it (same logits as ours, 1e-4),
    and its metrics on the first 20 recorded test users equal the ones recorded with it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from nanogdrt.data import load_dataset
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.recommend import recommend
    from nanogdrt.trie import Trie

    docs = ROOT / "docs" / "repro"
    manifest = json.loads((docs / "manifest.json").read_text())["train:" + row]["sha256"]
    for f in sorted((docs / row / "adapter").iterdir()):
        assert manifest[f"{row}/adapter/{f.name}"] == sha256(f), f

    _, model, tok = load_model(smollm_dir, docs / row / "adapter")
    ds = load_dataset("toy", data_dir=toy_dir)
    builder = PromptBuilder(tok, "toy")
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, docs / row / "adapter").eval()
    ids = torch.tensor(builder.for_interaction(ds.test[0], ds.titles, with_target=True).ids)[None]
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(ids)), ref(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)

    pred = docs / row / "test_predictions.jsonl"
    if not pred.exists():
        return
    recorded = [json.loads(x) for x in pred.read_text().splitlines()[:CHECK_USERS]]
    by_row = {x.row: x for x in ds.test}
    users = [by_row[r["row"]] for r in recorded]
    again = recommend(model, builder, Trie.from_titles(ds.titles, builder), users, ds.titles)

    def scores(recs):
        return metrics.evaluate([r["topk_item_ids"] for r in recs], [x.target for x in users],
                                [x.history for x in users], titles=ds.titles)
    assert scores(again) == scores(recorded)
