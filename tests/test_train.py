"""train.py end to end on a tiny random Llama (real tokenizer) and the synthetic data: results,
figures, exact resume after an interruption, determinism, NaN handling, recommend CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from nanogdrt import recommend


@pytest.fixture(autouse=True)
def private_relevance_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "RELEVANCE_CACHE", tmp_path / "cache")


def run(model_dir, out, *extra):
    args = ["--model", str(model_dir), "--dataset", "synthetic", "--train-samples", "24",
            "--valid-users", "4", "--test-users", "6", "--epochs", "2", "--batch-size", "4",
            "--beams", "4", "--eval-batch-size", "4", "--lr", "3e-3", "--out", str(out), *extra]
    return train.main(args)


def test_gdrt_run_writes_results_and_figures(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "gdrt")
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


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "straight", "--save-every", "2")
    # Interrupted mid-epoch 1 (step 5, last checkpoint at step 4), then resumed twice more.
    run(tiny_model_dir, tmp_path / "broken", "--save-every", "2", "--max-steps", "5")
    assert not (tmp_path / "broken" / "results.json").exists()
    run(tiny_model_dir, tmp_path / "broken", "--save-every", "2", "--max-steps", "9", "--resume")
    run(tiny_model_dir, tmp_path / "broken", "--save-every", "2", "--resume")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"] and a["epochs"] == b["epochs"]
    wa = load_file(str(tmp_path / "straight" / "best_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "broken" / "best_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_results_and_sft_runs(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "a", "--method", "sft", "--epochs", "1")
    run(tiny_model_dir, tmp_path / "b", "--method", "sft", "--epochs", "1")
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"]
    assert all(s["q"] == [0.0] * 5 for s in a["steps"])  # SFT has no group weights


def test_existing_run_needs_resume_and_nan_loss_stops_cleanly(tiny_model_dir, tmp_path, monkeypatch):
    run(tiny_model_dir, tmp_path / "r", "--max-steps", "2", "--save-every", "1")
    with pytest.raises(SystemExit, match="pass --resume"):
        run(tiny_model_dir, tmp_path / "r")
    # The loss turns NaN at the third step (as after a divergence): the run stops with a clear
    # message and the checkpoint of step 2 stays.
    calls = {"n": 0}
    real_token_nll = train.token_nll

    def diverging_token_nll(*args):
        calls["n"] += 1
        out = real_token_nll(*args)
        return out._replace(nll=out.nll * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(train, "token_nll", diverging_token_nll)
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 3.*last good checkpoint"):
        run(tiny_model_dir, tmp_path / "nan", "--save-every", "1")
    state = json.loads((tmp_path / "nan" / "state" / "trainer_state.json").read_text())
    assert state["step"] == 2 and all(s["loss"] == s["loss"] for s in state["steps"])  # no NaN kept


def test_recommend_cli_writes_one_line_per_user(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recommend, "RELEVANCE_CACHE", tmp_path / "cache")
    out = tmp_path / "recs.jsonl"
    recommend.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "valid",
                    "--rows", "0:3", "--beams", "4", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == [0, 1, 2]
    assert all(len(r["topk_item_ids"]) == 4 and r["scores"] == sorted(r["scores"], reverse=True) for r in lines)
    assert "NDCG@5" in capsys.readouterr().out


def test_regroup_every_epoch_resumes_exactly(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "straight", "--regroup-every-epoch", "--save-every", "2")
    run(tiny_model_dir, tmp_path / "broken", "--regroup-every-epoch", "--save-every", "2", "--max-steps", "9")
    run(tiny_model_dir, tmp_path / "broken", "--regroup-every-epoch", "--save-every", "2", "--resume")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["relevance_model"].startswith("current model")
    assert a["steps"] == b["steps"] and a["test"] == b["test"]


def test_toy_dataset_end_to_end_on_a_tiny_model(tiny_model_dir, toy_dir, tmp_path):
    """The real Amazon Toys folder through the whole script (the toy template, 11,758 titles)."""
    train.main(["--model", str(tiny_model_dir), "--dataset", "toy", "--data-dir", str(toy_dir),
                "--train-samples", "8", "--valid-users", "3", "--test-users", "3", "--epochs", "1",
                "--batch-size", "4", "--beams", "3", "--out", str(tmp_path / "toy")])
    res = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert res["dataset"]["items"] == 11758 and res["config"]["train_file"] == "train_1000.csv"
    assert res["dataset"]["train"] == 8 and res["dataset"]["test"] == 3


def test_length_grouped_batches_cover_every_example_once_and_cut_padding():
    lengths = [int(x) for x in torch.randint(20, 400, (403,), generator=torch.Generator().manual_seed(1))]
    plain = train.epoch_batches(len(lengths), 8, seed=0, epoch=0)
    grouped = train.epoch_batches(len(lengths), 8, seed=0, epoch=0, lengths=lengths)
    assert grouped == train.epoch_batches(len(lengths), 8, seed=0, epoch=0, lengths=lengths)   # resumable
    assert grouped != train.epoch_batches(len(lengths), 8, seed=0, epoch=1, lengths=lengths)
    assert sorted(sum(grouped, [])) == list(range(len(lengths)))
    assert max(map(len, grouped)) == 8 and sum(len(b) < 8 for b in grouped) == 1
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
