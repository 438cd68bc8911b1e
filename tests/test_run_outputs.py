"""What a run writes besides its model: the metrics at --k and --beyond-accuracy (checked against
metrics.evaluate on the saved predictions), steps.jsonl (one line per optimizer step, continued by
--resume), TensorBoard's events, and the start-up refusals of these flags. On a tiny random Llama and
the small synthetic catalogue: seconds per run."""

import json
import sys

import pytest
import torch

import recommend as recommend_cli
from nanogdrt import loss, metrics, relevance, synthetic
from nanogdrt.batches import make_examples
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer

STEP_FIELDS = ["step", "epoch", "loss", "group_loss", "q", "lr", "tokens", "tokens_per_s", "elapsed_s"]
DEFAULT_TEST_KEYS = ["NDCG@5", "HR@5", "NDCG@10", "HR@10", "MGU@5", "DGU@5", "MGU@10", "DGU@10",
                     "top1_group_distribution"]


@pytest.fixture(autouse=True)
def private_relevance_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def run(train_py, tiny_model_dir):
    """train.py on 12 windows of the small catalogue, 2 epochs of 3 steps, into `out`; `extra` flags win."""
    def run(out, *extra):
        train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic-size", "small",
                 "--train-samples", "12", "--valid-users", "3", "--test-users", "6", "--epochs", "2",
                 "--batch-size", "4", "--beams", "4", "--eval-batch-size", "6", "--lr", "3e-3", "--out", out, *extra)
        return json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    return run


def small_dataset():
    """The run fixture's data, loaded as train.py loads it."""
    return load_dataset("synthetic", train_samples=12, valid_samples=3, test_samples=6, seed=0,
                        synthetic=synthetic.SMALL)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_model_load(monkeypatch):
    """Any model load fails loudly: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(Llama, "from_pretrained", refuse)


# ----------------------------------------------------------------------------- --k, --beyond-accuracy

def test_k_and_beyond_accuracy_equal_metrics_evaluate_on_the_predictions(run, tmp_path, tiny_model_dir, capsys):
    res = run(tmp_path / "r", "--k", "20", "1", "10", "5", "--beams", "20", "--beyond-accuracy", "--epochs", "1")
    assert res["config"]["k"] == [1, 5, 10, 20]                   # sorted
    names = ["NDCG", "HR", "MGU", "DGU", "Coverage", "ARP", "Tail", "Gini"]
    assert {f"{n}@{k}" for n in names for k in (1, 5, 10, 20)} <= set(res["test"])
    # The reference: metrics.evaluate on the saved lists, with the item groups of the base model
    # (relevance cache) and phi counted here from the training windows' targets.
    ds = small_dataset()
    records = read_lines(tmp_path / "r" / "test_predictions.jsonl")
    by_row = {x.row: x for x in ds.test}
    assert [r["row"] for r in records] == [x.row for x in ds.test]
    model = Llama.from_pretrained(tiny_model_dir, dtype=torch.float32)
    item_group = relevance.dataset_item_groups(model, PromptBuilder(Tokenizer(tiny_model_dir), "synthetic"), ds,
                                               progress=False)
    phi = {}
    for x in ds.train:
        phi[x.target] = phi.get(x.target, 0) + 1
    expected = metrics.evaluate([r["topk_item_ids"] for r in records], [by_row[r["row"]].target for r in records],
                                [by_row[r["row"]].history for r in records], item_group=item_group, titles=ds.titles,
                                ks=(1, 5, 10, 20), popularity=phi, n_items=len(ds.titles))
    assert {k: v for k, v in res["test"].items() if k != "top1_group_distribution"} == expected
    assert max(len(r["topk_item_ids"]) for r in records) == 20
    assert res["beyond_accuracy"]["catalogue_items"] == len(ds.titles) == 120
    assert res["beyond_accuracy"]["training_windows"] == 12 and res["beyond_accuracy"]["items_with_phi"] == len(phi)
    # The table: the default one, then one row per cut-off.
    out = capsys.readouterr().out
    assert "| K | NDCG | HR | MGU | DGU | Coverage | ARP | Tail | Gini |" in out
    for k in (1, 5, 10, 20):
        assert f"| {k} | " + " | ".join(f"{res['test'][f'{n}@{k}']:.4f}" for n in names) + " |" in out


def test_default_table_and_results_keys_are_unchanged(run, tmp_path, capsys):
    res = run(tmp_path / "r", "--epochs", "1")
    assert list(res["test"]) == DEFAULT_TEST_KEYS and "beyond_accuracy" not in res
    assert list(res["epochs"][0]["valid"]) == DEFAULT_TEST_KEYS
    assert res["config"]["k"] == [5, 10] and res["config"]["beyond_accuracy"] is False
    out = capsys.readouterr().out.splitlines()
    assert "warning: --beams 4: the lists hold at most 4 items, so @5, @10 count only the top 4 " \
           "(--beams >= 10 for all of them)" in out
    head = out.index("| method | NDCG@5 | NDCG@10 | HR@5 | HR@10 | MGU@5 | DGU@5 |")
    cells = [f"{res['test'][k]:.4f}" for k in ("NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5")]
    assert out[head + 1:head + 3] == ["|---|---|---|---|---|---|---|", "| GDRT | " + " | ".join(cells) + " |"]
    assert out[head + 3].startswith("wall time: ") and len(out) == head + 4   # no second table


@pytest.mark.parametrize("flags, message", [
    (["--k", "1", "10"], "--k 1 10: must include 5 (validation selects on NDCG@5"),
    (["--k", "5", "10", "12", "--beams", "10"], "--k 12: above --beams 10: the lists hold at most 10 items"),
    (["--k", "0", "5", "10"], "--k 0: must be >= 1"),
])
def test_bad_k_is_refused_in_one_line_before_any_model_loads(run, tmp_path, monkeypatch, flags, message):
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "r", *flags)
    assert str(e.value.code).startswith("error: " + message) and "\n" not in str(e.value.code)
    assert not (tmp_path / "r").exists()


def test_recommend_cli_k_and_beyond_accuracy(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "recs.jsonl"
    recommend_cli.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "valid",
                        "--rows", "0:3", "--beams", "4", "--k", "4", "2", "--beyond-accuracy", "--no-fairness",
                        "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()[-1]
    ds = load_dataset("synthetic")
    records = read_lines(out)
    xs = ds.valid[0:3]
    phi = {}
    for x in ds.train:
        phi[x.target] = phi.get(x.target, 0) + 1
    expected = metrics.evaluate([r["topk_item_ids"] for r in records], [x.target for x in xs], [x.history for x in xs],
                                titles=ds.titles, ks=(2, 4), popularity=phi, n_items=len(ds.titles))
    assert printed == "  ".join(f"{k} {v:.4f}" for k, v in expected.items())
    assert "Coverage@2" in printed and "NDCG@5" not in printed
    no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"^--k 6: above --beams 4: the lists hold at most 4 items"):
        recommend_cli.main(["--model", str(tiny_model_dir), "--beams", "4", "--k", "2", "5", "6", "--out", str(out)])


# ----------------------------------------------------------------------------- steps.jsonl, --tensorboard

def test_steps_jsonl_has_one_line_per_step_with_the_logged_numbers(run, tmp_path, tiny_model_dir):
    res = run(tmp_path / "r")
    lines = read_lines(tmp_path / "r" / "steps.jsonl")
    assert [x["step"] for x in lines] == list(range(1, 7)) and [x["epoch"] for x in lines] == [1] * 3 + [2] * 3
    assert all(list(x) == STEP_FIELDS for x in lines)
    for x, s in zip(lines, res["steps"], strict=True):      # results.json's record, not a second computation
        assert (x["step"], x["loss"], x["group_loss"], x["q"]) == (s["step"], s["loss"], s["group_loss"], s["q"])
    # Each epoch sees every training window once: its tokens are the windows' non-padding tokens.
    examples = make_examples(PromptBuilder(Tokenizer(tiny_model_dir), "synthetic"), small_dataset().train,
                             small_dataset().titles)
    total = sum(len(ex.ids) for ex in examples)
    assert [sum(x["tokens"] for x in lines if x["epoch"] == e) for e in (1, 2)] == [total, total]
    assert all(x["lr"] == 3e-3 and x["tokens_per_s"] > 0 for x in lines)
    elapsed = [x["elapsed_s"] for x in lines]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= res["wall_times"]["train_and_valid_s"]


def test_steps_jsonl_leaves_q_out_for_methods_without_group_weights(run, tmp_path):
    res = run(tmp_path / "r", "--method", "sft", "--epochs", "1")
    lines = read_lines(tmp_path / "r" / "steps.jsonl")
    assert all("q" not in x for x in lines) and [x["loss"] for x in lines] == [s["loss"] for s in res["steps"]]


def test_resumed_run_continues_steps_jsonl_without_repeating_a_step(run, tmp_path, monkeypatch):
    """A crash at step 5 (NaN loss) after the checkpoint of step 3 (the end of epoch 1), with a line
    cut short: the resumed run drops the line of step 4 and the broken one, runs steps 4..6 again
    and logs each step once."""
    calls, real_token_nll = {"n": 0}, loss.token_nll

    def nan_at_step_5(*args):
        calls["n"] += 1
        out = real_token_nll(*args)
        return out._replace(nll=out.nll * float("nan")) if calls["n"] == 5 else out

    monkeypatch.setattr(loss, "token_nll", nan_at_step_5)
    with pytest.raises(SystemExit, match="loss is nan"):
        run(tmp_path / "r")
    log = tmp_path / "r" / "steps.jsonl"
    assert [x["step"] for x in read_lines(log)] == [1, 2, 3, 4]          # logged, though not all checkpointed
    with open(log, "a") as f:
        f.write('{"step": 5, "epoch": 2, "lo')                            # a write cut short
    monkeypatch.setattr(loss, "token_nll", real_token_nll)
    res = run(tmp_path / "r", "--resume")
    lines = read_lines(log)
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert [x["loss"] for x in lines] == [s["loss"] for s in res["steps"]]


def test_tensorboard_writes_the_same_scalars(run, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls, real_token_nll = {"n": 0}, loss.token_nll

    def nan_at_step_5(*args):
        calls["n"] += 1
        out = real_token_nll(*args)
        return out._replace(nll=out.nll * float("nan")) if calls["n"] == 5 else out

    monkeypatch.setattr(loss, "token_nll", nan_at_step_5)             # step 4 is logged twice: purged once
    with pytest.raises(SystemExit, match="loss is nan"):
        run(tmp_path / "r", "--tensorboard")
    monkeypatch.setattr(loss, "token_nll", real_token_nll)
    run(tmp_path / "r", "--tensorboard", "--resume")
    assert len(list((tmp_path / "r").glob("events.out.tfevents.*"))) == 2   # one per process
    events = EventAccumulator(str(tmp_path / "r"))
    events.Reload()
    lines = read_lines(tmp_path / "r" / "steps.jsonl")
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == [x["step"] for x in lines] == list(range(1, 7))
    assert [e.value for e in loss_events] == pytest.approx([x["loss"] for x in lines], rel=1e-6)
    for g in (1, 5):
        assert [e.value for e in events.Scalars(f"train/q/g{g}")] == pytest.approx([x["q"][g - 1] for x in lines],
                                                                                 rel=1e-6, abs=1e-12)
    assert {"train/group_loss/g1", "train/lr", "train/tokens_per_s", "train/elapsed_s"} <= set(events.Tags()["scalars"])


def test_tensorboard_without_the_extra_is_one_line_before_any_model_loads(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)              # as if it were not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "r", "--tensorboard")
    assert str(e.value.code) == ('error: --tensorboard: needs the tensorboard package, an optional extra: '
                                 'pip install -e ".[tensorboard]"')
    assert not (tmp_path / "r").exists()
