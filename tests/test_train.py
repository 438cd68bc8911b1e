"""train.py end to end on a tiny random Llama (real tokenizer) and the synthetic data: results,
figures, exact resume after an interruption, determinism, NaN handling, recommend CLI."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import recommend as recommend_cli
from nanogdrt import loss
from nanogdrt.infra import step


@pytest.fixture(autouse=True)
def private_relevance_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def run(train_py, tiny_model_dir):
    """train.py on 24 synthetic windows, 2 epochs, into `out`; `extra` flags win."""
    def run(out, *extra):
        train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--train-samples", "24",
                 "--valid-users", "4", "--test-users", "6", "--epochs", "2", "--batch-size", "4",
                 "--beams", "4", "--eval-batch-size", "4", "--lr", "3e-3", "--out", out, *extra)
    return run


def test_gdrt_run_writes_results_and_figures(run, tmp_path):
    run(tmp_path / "gdrt")
    res = json.loads((tmp_path / "gdrt" / "results.json").read_text())
    assert res["config"]["method"] == "gdrt" and res["config"]["seed"] == 0
    assert {"NDCG@5", "HR@10", "MGU@5", "DGU@10"} <= set(res["test"])
    assert len(res["epochs"]) == 2 and res["best_epoch"] in (1, 2)
    assert len(res["steps"]) == 2 * 6  # 24 windows / batch 4, two epochs
    q = torch.tensor([s["q"] for s in res["steps"]])
    assert torch.allclose(q.sum(1), torch.ones(len(q)), atol=1e-5)  # Q is a distribution each step
    assert sum(res["token_groups"]["counts"]) > 0
    means = res["token_groups"]["mean_relevance"]
    assert means == sorted(means, reverse=True)  # group 1 = highest relevance
    for png in ("top1_group_distribution.png", "group_loss.png", "group_weights.png"):
        assert (tmp_path / "gdrt" / png).stat().st_size > 1000
    assert (tmp_path / "gdrt" / "best_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["gdrt", "sft"])
def test_plain_loop_and_step_py_train_the_same_bits(run, tmp_path, monkeypatch, method):
    """train.py's own loop (token NLL -> gdrt_loss | sft_loss -> backward) and infra/step.py (here
    through --loss-scope micro, which with one micro-batch on one rank is the same scope) give the
    same logged steps, adapter and test metrics, bit for bit."""
    calls, real_train_step = {"n": 0}, step.train_step

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(step, "train_step", counted)
    run(tmp_path / "plain", "--method", method, "--epochs", "1")
    assert calls["n"] == 0                                          # the loop in train.py itself
    run(tmp_path / "step", "--method", method, "--epochs", "1", "--loss-scope", "micro")
    assert calls["n"] == 6                                          # 24 windows / batch 4
    a = json.loads((tmp_path / "plain" / "results.json").read_text())
    b = json.loads((tmp_path / "step" / "results.json").read_text())
    assert a["steps"] == b["steps"] and a["test"] == b["test"] and a["epochs"] == b["epochs"]
    wa = load_file(str(tmp_path / "plain" / "best_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "step" / "best_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_and_resumed_run_equals_uninterrupted(run, tmp_path):
    run(tmp_path / "straight", "--save-every", "2")
    # Interrupted mid-epoch 1 (step 5, last checkpoint at step 4), then resumed twice more.
    run(tmp_path / "broken", "--save-every", "2", "--max-steps", "5")
    assert not (tmp_path / "broken" / "results.json").exists()
    run(tmp_path / "broken", "--save-every", "2", "--max-steps", "9", "--resume")
    run(tmp_path / "broken", "--save-every", "2", "--resume")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"] and a["epochs"] == b["epochs"]
    wa = load_file(str(tmp_path / "straight" / "best_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "broken" / "best_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_results_and_sft_runs(run, tmp_path):
    run(tmp_path / "a", "--method", "sft", "--epochs", "1")
    run(tmp_path / "b", "--method", "sft", "--epochs", "1")
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"]
    assert all(s["q"] == [0.0] * 5 for s in a["steps"])  # SFT has no group weights


def test_sigterm_checkpoints_after_the_current_step_and_resumes_exactly(run, tmp_path, monkeypatch, capsys):
    """SIGTERM (preemption, gpu_protocol's deadline) mid-run: the step in flight finishes, is
    checkpointed, the run stops; resumed, it equals an uninterrupted run. No --save-every checkpoint
    falls before the signal, so nothing but the signal's checkpoint can resume it."""
    run(tmp_path / "straight", "--save-every", "100")
    calls, real_token_nll = {"n": 0}, loss.token_nll

    def term_during_step_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_token_nll(*args)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loss, "token_nll", term_during_step_3)
    run(tmp_path / "broken", "--save-every", "100")
    assert "stopped by SIGTERM after 3 steps" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == before                  # the handler is put back
    state = json.loads((tmp_path / "broken" / "state" / "trainer_state.json").read_text())
    assert state["step"] == 3 and not (tmp_path / "broken" / "results.json").exists()
    monkeypatch.setattr(loss, "token_nll", real_token_nll)
    run(tmp_path / "broken", "--save-every", "100", "--resume")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"] and a["epochs"] == b["epochs"]


def test_existing_run_needs_resume_and_nan_loss_stops_cleanly(run, tmp_path, monkeypatch):
    run(tmp_path / "r", "--max-steps", "2", "--save-every", "1")
    with pytest.raises(SystemExit, match="pass --resume"):
        run(tmp_path / "r")
    # The loss turns NaN at the third step (as after a divergence): the run stops with a clear
    # message and the checkpoint of step 2 stays.
    calls = {"n": 0}
    real_token_nll = loss.token_nll

    def diverging_token_nll(*args):
        calls["n"] += 1
        out = real_token_nll(*args)
        return out._replace(nll=out.nll * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(loss, "token_nll", diverging_token_nll)   # train.py imports it at start
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 3.*last good checkpoint"):
        run(tmp_path / "nan", "--save-every", "1")
    state = json.loads((tmp_path / "nan" / "state" / "trainer_state.json").read_text())
    assert state["step"] == 2 and all(s["loss"] == s["loss"] for s in state["steps"])  # no NaN kept


def test_recommend_cli_writes_one_line_per_user(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "recs.jsonl"
    recommend_cli.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "valid",
                    "--rows", "0:3", "--beams", "4", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == [0, 1, 2]
    assert all(len(r["topk_item_ids"]) == 4 and r["scores"] == sorted(r["scores"], reverse=True) for r in lines)
    assert "NDCG@5" in capsys.readouterr().out


def test_regroup_every_epoch_resumes_exactly(run, tmp_path):
    run(tmp_path / "straight", "--regroup-every-epoch", "--save-every", "2")
    run(tmp_path / "broken", "--regroup-every-epoch", "--save-every", "2", "--max-steps", "9")
    run(tmp_path / "broken", "--regroup-every-epoch", "--save-every", "2", "--resume")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["relevance_model"].startswith("current model")
    assert a["steps"] == b["steps"] and a["test"] == b["test"]


def test_toy_dataset_end_to_end_on_a_tiny_model(train_py, tiny_model_dir, toy_dir, tmp_path):
    """The real Amazon Toys folder through the whole script (the toy template, 11,758 titles)."""
    train_py("--model", tiny_model_dir, "--dataset", "toy", "--data-dir", toy_dir, "--train-samples", "8",
             "--valid-users", "3", "--test-users", "3", "--epochs", "1", "--batch-size", "4", "--beams", "3",
             "--out", tmp_path / "toy")
    res = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert res["dataset"]["items"] == 11758 and res["config"]["train_file"] == "train_1000.csv"
    assert res["dataset"]["train"] == 8 and res["dataset"]["test"] == 3


def test_help_lists_every_option_with_its_default(train_py, capsys):
    train_py("--help")
    text = " ".join(capsys.readouterr().out.split())        # argparse wraps lines
    for expected in ("--dataset DATASET toy | clothing | book | synthetic (embedded, offline) | controlled",
                     "--shortcut SHORTCUT controlled only",
                     "--method {sft,gdrt,msl,msl+gdrt,reweight,group-mean,cft,llara,llara+gdrt}", "--loss-scope {step,micro,rank-micro}", "--grouping {kmeans,quantile}", "--epochs EPOCHS training epochs",
                     "--lora-targets LORA_TARGETS [LORA_TARGETS ...]", "(default: ['q_proj', 'v_proj'])",
                     "--lr LR AdamW learning rate of the LoRA parameters (MSL's recipe: 1e-4", "none) [> 0] (default: 0.0005)",
                     "--regroup-every-epoch re-score", "--no-group-by-length batch examples", "--no-test stop"):
        assert expected in text, expected


@pytest.fixture
def small_run(train_py, tiny_model_dir):
    """train.py on the small synthetic catalogue: 12 windows, 1 epoch of 3 steps (2 x 2 accumulated)."""
    def run(out, *extra):
        train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic-size", "small",
                 "--train-samples", "12", "--valid-users", "3", "--test-users", "3", "--epochs", "1",
                 "--batch-size", "2", "--grad-accum", "2", "--beams", "3", "--eval-batch-size", "3",
                 "--lr", "3e-3", "--out", out, *extra)
        return json.loads((out / "results.json").read_text())
    return run


@pytest.mark.parametrize("method", ["msl", "msl+gdrt", "reweight"])
def test_baseline_methods_run_and_log_what_is_special(small_run, tmp_path, method):
    res = small_run(tmp_path / "run", "--method", method)
    assert res["config"]["method"] == method and len(res["steps"]) == 3
    q = torch.tensor([s["q"] for s in res["steps"]])
    if method == "msl+gdrt":
        assert torch.allclose(q.sum(1), torch.ones(3), atol=1e-5)      # Q(g) logged every step
        assert (tmp_path / "run" / "group_weights.png").is_file()
    else:
        assert q.eq(0).all()
    if method.startswith("msl"):
        share = res["method"]["single_allowed_token_share"]
        assert 0 < share < 1 and res["method"]["tau_msl"] == 4.5
    else:
        info = res["method"]
        assert info["item_groups"] == "IFairLRS popularity" and len(info["group_weights"]) == 5
        assert 0 <= info["example_weight_min"] <= info["example_weight_max"]


def test_reweight_groups_are_ifairlrs_popularity_over_the_whole_training_file(small_run, tmp_path):
    """--reweight-groups popularity (the default): the group weights are IFairLRS's over the popularity
    quintiles of the dataset's whole training split (not the 12-window sample); eq2: Eq. 2's groups."""
    from nanogdrt import grouping, synthetic
    from nanogdrt.baselines.reweight import reweight_group_weights
    from nanogdrt.data import load_dataset
    res = small_run(tmp_path / "pop", "--method", "reweight")
    full = load_dataset("synthetic", synthetic=synthetic.SMALL)
    sample = load_dataset("synthetic", synthetic=synthetic.SMALL, train_samples=12, seed=0).train
    pop = grouping.popularity_groups(full.train, full.titles)
    w = reweight_group_weights([x.history for x in sample], [x.target for x in sample], pop, 5)
    assert res["method"]["group_weights"] == pytest.approx(w.tolist())
    eq2 = small_run(tmp_path / "eq2", "--method", "reweight", "--reweight-groups", "eq2")
    assert eq2["method"]["item_groups"] == "Eq. 2"


def test_group_mean_control_trains_as_gdrt_at_a_huge_tau(small_run, tmp_path):
    """The control (Q fixed uniform) is Eq. 5's tau -> inf limit: GDRT at tau = 1e7 takes the
    same first step to float32 rounding (later steps drift by ~1e-5: Adam's first updates are
    ~sign(grad), which rounding can flip on tiny components), and its logged Q is uniform."""
    ctrl = small_run(tmp_path / "ctrl", "--method", "group-mean")
    gdrt = small_run(tmp_path / "gdrt", "--method", "gdrt", "--tau", "1e7")
    for k, (a, b) in enumerate(zip(ctrl["steps"], gdrt["steps"])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6 if k == 0 else 1e-4)
        assert a["q"] == pytest.approx(b["q"], abs=1e-5)
        present = [x > 0 for x in a["group_loss"]]
        assert a["q"] == pytest.approx([p / sum(present) for p in present])


def test_reweight_with_power_0_is_sft_exactly(small_run, tmp_path):
    sft = small_run(tmp_path / "sft", "--method", "sft")
    flat = small_run(tmp_path / "flat", "--method", "reweight", "--reweight-power", "0")
    assert flat["method"]["example_weight_min"] == flat["method"]["example_weight_max"] == 1.0
    assert flat["steps"] == sft["steps"] and flat["test"] == sft["test"] and flat["epochs"] == sft["epochs"]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_compile_trains_the_same_steps(run, tmp_path):
    """--compile (compiled blocks for training, eager decoding) gives eager's losses step by step."""
    run(tmp_path / "eager", "--method", "sft", "--epochs", "1")
    run(tmp_path / "compiled", "--method", "sft", "--epochs", "1", "--compile")
    a = json.loads((tmp_path / "eager" / "results.json").read_text())
    b = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert b["config"]["compile"] is True and len(a["steps"]) == len(b["steps"]) == 6
    for x, y in zip(a["steps"], b["steps"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)


def test_snapshot_every_saves_the_adapter_of_those_steps(run, tmp_path):
    """--snapshot-every 3 on 2 epochs of 6 steps: snapshots at steps 3, 6, 9, 12 and no other;
    the one at the end of the best epoch is the best adapter, bit for bit; training moves it."""
    run(tmp_path / "snap", "--snapshot-every", "3")
    res = json.loads((tmp_path / "snap" / "results.json").read_text())
    snaps = tmp_path / "snap" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-12", "step-3", "step-6", "step-9"]
    weights = lambda folder: load_file(str(folder / "adapter_model.safetensors"))   # noqa: E731
    best, at_best = weights(tmp_path / "snap" / "best_adapter"), weights(snaps / f"step-{6 * res['best_epoch']}")
    assert best.keys() == at_best.keys() and all(torch.equal(best[k], at_best[k]) for k in best)
    first, last = weights(snaps / "step-3"), weights(snaps / "step-12")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert (snaps / "step-3" / "adapter_config.json").is_file()
    assert res["config"]["snapshot_every"] == 3
