"""experiments/gpu on CPU: the tiny random Llama and a small Toy-format folder cut from the
synthetic data. A run stopped by its budget, packed, unpacked and resumed ends with the same
adapters, validation and test lists as an uninterrupted one; pack/unpack round-trip and check
what they carry; status; stage skipping; the chunk arithmetic; the kill at the deadline."""

import contextlib
import io
import json
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import recommend
from experiments.gpu import plan as gpu_plan
from experiments.gpu import protocol as gpu_protocol
from experiments.gpu import report as gpu_report
from experiments.gpu import transfer as gpu_transfer
from nanogdrt.stats import TABLE_KEYS

PLAN = ["--train-file", "train_small.csv", "--train-samples", "24", "--epochs", "2", "--batch-size", "4",
        "--lr", "3e-3", "--grid", "2:0.5,3:1.0", "--valid-users", "4", "--agree-users", "4", "--dtype", "float32",
        "--test-chunk", "4", "--beams", "4", "--eval-batch-size", "4", "--save-every", "2"]
RUNS = ["sft", "gdrt-G2-tau0.5", "gdrt-G3-tau1.0"]


@pytest.fixture(scope="module")
def toy_like(tmp_path_factory):
    """id2name.json + train_small.csv / valid.csv / test.csv (item_ids only), from the synthetic data."""
    from nanogdrt.data import load_dataset

    ds = load_dataset("synthetic")
    splits = {"train_small.csv": ds.train[:24], "valid.csv": ds.valid[:8], "test.csv": ds.test[:6]}
    folder = tmp_path_factory.mktemp("toy-like")
    items = sorted({i for rows in splits.values() for x in rows for i in [*x.history, x.target]})
    (folder / "id2name.json").write_text(json.dumps({str(i): ds.titles[i] for i in items}))
    for name, rows in splits.items():
        (folder / name).write_text("item_ids\n" + "".join(f'"{[*x.history, x.target]}"\n' for x in rows))
    return folder


class InProcess:
    """gpu_protocol.invoke without a new Python per chunk (each would spend seconds importing torch)."""

    def __init__(self, train_py, mp):
        self.calls, self.train_py, self.mp = [], train_py, mp

    def __call__(self, argv, env, stop_at):
        self.calls.append(argv[1:])
        start, out = time.time(), io.StringIO()
        self.mp.setenv("NANOGDRT_CACHE", env["NANOGDRT_CACHE"])   # read by nanogdrt.relevance at each call
        with contextlib.redirect_stdout(out):
            if argv[1] == "train.py":
                self.train_py(*argv[2:])
            else:
                assert argv[1] == "recommend.py"
                recommend.main(argv[2:])
        return 0, False, time.time() - start, out.getvalue().splitlines()[-60:]


@pytest.fixture()
def fake_invoke(monkeypatch, train_py):
    fake = InProcess(train_py, monkeypatch)               # $NANOGDRT_CACHE restored afterwards
    monkeypatch.setattr(gpu_protocol, "invoke", fake)
    return fake


def run(state, toy, model, *extra, source=None):
    args = ["run", "--state-dir", str(state), "--data-dir", str(toy), "--model", str(model), "--device", "cpu",
            "--budget-s", "100000", *extra]
    gpu_protocol.main(args + (["--from", str(source)] if source else []))


def init(state, *extra):
    gpu_protocol.main(["init", "--state-dir", str(state), *PLAN, *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, toy_like, train_py):
    """One uninterrupted protocol."""
    state = tmp_path_factory.mktemp("straight") / "state"
    with pytest.MonkeyPatch.context() as mp:
        fake = InProcess(train_py, mp)
        mp.setattr(gpu_protocol, "invoke", fake)
        init(state)
        run(state, toy_like, tiny_model_dir)
    return state, fake.calls


def test_uninterrupted_run_does_every_stage(straight):
    state, calls = straight
    plan = json.loads((state / "plan.json").read_text())
    progress = json.loads((state / "progress.json").read_text())
    assert all(gpu_plan.is_done(state, progress, s) for s in gpu_plan.stage_names(plan))
    assert progress["selection"]["run"] in RUNS[1:] and progress["dtype"] == "float32"
    assert sum(c[0] == "train.py" for c in calls) == 3                      # each run in one chunk here
    assert sum("--rows" in c for c in calls) == 3 * 2                        # 6 test rows in chunks of 4
    for name in ["base", progress["selection"]["run"], "sft"]:
        records = gpu_plan.read_jsonl_gz(state / name / "test_predictions.jsonl.gz")
        assert [r["row"] for r in records] == list(range(6)) and all(len(r["topk_item_ids"]) == 4 for r in records)
        assert {"NDCG@5", "MGU@5"} <= set(json.loads((state / name / "test_metrics.json").read_text()))
    for name in RUNS:                                                        # optimizer state pruned
        assert not (state / name / "state").exists() and (state / name / "best_adapter").is_dir()
    assert "all stages done" in "\n".join(gpu_plan.status_lines(state))


def _trained(state, name):
    st = json.loads(__import__("gzip").open(state / name / "trainer_state.json.gz", "rt").read())
    return {k: st[k] for k in ("step", "epochs", "best", "steps")}


def test_budget_stop_pack_unpack_resume_equals_uninterrupted(straight, tmp_path, tiny_model_dir, toy_like,
                                                             fake_invoke, capsys):
    repo_state, device_state = tmp_path / "repo" / "state", tmp_path / "device" / "state"
    init(repo_state)
    # Call 1: stops inside SFT's first epoch (7 of 12 steps; checkpoints every 2).
    run(device_state, toy_like, tiny_model_dir, "--max-train-steps", "7", source=repo_state)
    assert "stopped: train:sft" in capsys.readouterr().out
    assert gpu_plan.train_state(device_state / "sft")["step"] == 7
    status = "\n".join(gpu_plan.status_lines(device_state))
    assert "[done] groups" in status and "[done] base-test" in status
    assert "step 7/12, 1/2 epochs validated" in status and "starting at train:sft" in status
    files = gpu_transfer.pack(device_state, tmp_path / "out", part_bytes=20_000)  # force several parts
    assert 3 <= len(files) <= 8 and all(f.parent == tmp_path / "out" for f in files)
    gpu_transfer.unpack(tmp_path / "out", repo_state)
    # Call 2, on a fresh machine: starts from the unpacked state and finishes the protocol.
    run(tmp_path / "fresh" / "state", toy_like, tiny_model_dir, source=repo_state)
    done, (ref, _) = tmp_path / "fresh" / "state", straight
    for name in RUNS:
        assert _trained(done, name) == _trained(ref, name)
        a = load_file(str(done / name / "best_adapter" / "adapter_model.safetensors"))
        b = load_file(str(ref / name / "best_adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sel = json.loads((ref / "progress.json").read_text())["selection"]
    assert json.loads((done / "progress.json").read_text())["selection"] == sel
    for name in ["base", "sft", sel["run"]]:
        assert (gpu_plan.read_jsonl_gz(done / name / "test_predictions.jsonl.gz")
                == gpu_plan.read_jsonl_gz(ref / name / "test_predictions.jsonl.gz"))
    assert (done / "item_groups.json").read_text() == (ref / "item_groups.json").read_text()


def test_done_and_skipped_stages_are_not_run(straight, tmp_path, tiny_model_dir, toy_like, fake_invoke):
    state, _ = straight
    before = json.loads((state / "progress.json").read_text())["generation"]
    run(state, toy_like, tiny_model_dir)                                     # everything done: nothing runs
    assert fake_invoke.calls == []
    assert json.loads((state / "progress.json").read_text())["generation"] == before + 1
    fresh = tmp_path / "state"
    init(fresh)
    run(fresh, toy_like, tiny_model_dir, "--skip", "base-test", "--max-train-steps", "0")
    progress = json.loads((fresh / "progress.json").read_text())
    assert fake_invoke.calls == [] and (fresh / "item_groups.json").exists()
    assert not gpu_plan.is_done(fresh, progress, "base-test") and progress["calls"][-1]["finished"] == ["agree", "groups"]
    assert "[todo] base-test" in "\n".join(gpu_plan.status_lines(fresh))


def test_pack_unpack_round_trip_and_checks(straight, tmp_path):
    state, _ = straight
    files = gpu_transfer.pack(state, tmp_path / "out", log=state / "plan.json", part_bytes=30_000)
    assert len(files) <= gpu_transfer.RETURN_FILES and (tmp_path / "out" / "run.log").exists()
    target = gpu_transfer.unpack(tmp_path / "out", tmp_path / "back")
    def tree(d):
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert tree(target) == tree(state)
    (target / "progress.json").write_text(json.dumps({"generation": 10**6}))  # a newer state is not overwritten
    with pytest.raises(SystemExit, match="older"):
        gpu_transfer.unpack(tmp_path / "out", target)
    part = next(p for p in files if ".00" in p.name)
    part.write_bytes(part.read_bytes()[:-1] + b"x")
    with pytest.raises(SystemExit, match="sha256"):
        gpu_transfer.unpack(tmp_path / "out", tmp_path / "again", force=True)
    with pytest.raises(SystemExit, match="parts"):
        gpu_transfer.pack(state, tmp_path / "small", part_bytes=1000)        # > 8 files: refused


def test_plan_chunk_stops_inside_the_time_and_around_validations():
    # 10 steps per epoch, 3 epochs, 1 step/s, validation 5 s.
    assert gpu_plan.plan_chunk(0, 0, 10, 3, 1.0, 5.0, 1000) is None                   # everything fits
    assert gpu_plan.plan_chunk(0, 0, 10, 3, 1.0, 5.0, 7.5) == 7                       # mid-epoch
    assert gpu_plan.plan_chunk(0, 0, 10, 3, 1.0, 5.0, 12) == 10                       # stop before validating
    assert gpu_plan.plan_chunk(0, 0, 10, 3, 1.0, 5.0, 16) == 11                       # validate, 1 step on
    assert gpu_plan.plan_chunk(10, 0, 10, 3, 1.0, 5.0, 5) == 11                       # the owed validation
    assert gpu_plan.plan_chunk(10, 0, 10, 3, 1.0, 5.0, 4) == -1
    assert gpu_plan.plan_chunk(30, 2, 10, 3, 1.0, 5.0, 6) is None                     # last validation
    assert gpu_plan.plan_chunk(3, 0, 10, 3, 1.0, 5.0, 1000, cap=4) == 7               # step cap
    assert gpu_plan.plan_chunk(3, 0, 10, 3, 1.0, 5.0, 0.5) == -1


def test_a_process_past_the_deadline_is_killed():
    start = time.time()
    rc, killed, seconds, tail = gpu_protocol.invoke([sys.executable, "-c", "print('hi', flush=True); "
                                                     "import time; time.sleep(60)"], None, time.time() + 3)
    assert killed and rc != 0 and tail == ["hi"] and time.time() - start < 30


def test_device_calls_fit_the_tool():
    calls = gpu_transfer.device_calls(3)
    assert [c["carry"] for c in calls] == [[".devpayload/1"], [".devpayload/2"], [".devpayload/3"], []]
    assert all(len(c["command"]) < 2000 for c in calls)
    assert "setup" in calls[2]["command"] and "pack" in calls[2]["command"] and "$OUT" in calls[2]["command"]
    assert all("--compile" in c["command"] for c in calls[2:])   # BENCHMARKS.md: 2.2-2.5x on an H200


def test_compile_reaches_train_py_with_its_own_rate(straight):
    state, _ = straight
    plain = gpu_protocol.Run(state, "data", "model", "cuda", deadline=0)
    compiled = gpu_protocol.Run(state, "data", "model", "cuda", deadline=0, compile=True)
    assert "--compile" not in plain.train_argv("sft", "sft")
    assert compiled.train_argv("gdrt-G5-tau0.5", "gdrt", 5, 0.5)[-5:] == ["--compile", "--groups", "5", "--tau", "0.5"]
    assert (plain.steps_key, compiled.steps_key) == ("steps_per_s", "steps_per_s:compile")


def test_list_agreement_counts_same_lists_top1_and_overlap():
    a = [{"row": 0, "topk_item_ids": [1, 2, 3]}, {"row": 1, "topk_item_ids": [4, 5, 6]}]
    b = [{"row": 0, "topk_item_ids": [1, 2, 3]}, {"row": 1, "topk_item_ids": [5, 4, 9]}]
    assert gpu_plan.list_agreement(a, b) == {"users": 2, "same_lists": 0.5, "same_top1": 0.5,
                                             "overlap@10": pytest.approx((1 + 2 / 3) / 2)}


def test_report_has_table_validation_and_stage_times(straight, toy_like, capsys):
    state, _ = straight
    gpu_report.report(state, toy_like, n_boot=20)
    text = (state / "report.md").read_text()
    chosen = json.loads((state / "progress.json").read_text())["selection"]["run"]
    for row in ("| base model |", "| SFT |", f"| GDRT ({chosen[5:]}) |", "| GDRT - SFT |", f"| {chosen} (chosen) |",
                "| train:sft |", "| test:gdrt |"):
        assert row in text
    table = json.loads((state / "report.json").read_text())["table"]
    assert set(table) == {"base model", "SFT", "GDRT", "GDRT - SFT"}
    assert "In progress" not in text


def test_report_of_a_protocol_in_progress_shows_the_rows_tested_so_far(straight, toy_like, tmp_path):
    state = tmp_path / "partial"
    shutil.copytree(straight[0], state)
    progress = json.loads((state / "progress.json").read_text())
    chosen = progress.pop("selection")["run"]
    (state / "progress.json").write_text(json.dumps(progress))
    for name in ("sft", chosen):   # as after base-test, with training under way
        (state / name / "test_predictions.jsonl.gz").unlink()
    (state / chosen / "trainer_state.json.gz").unlink()
    gpu_report.report(state, toy_like, n_boot=20)
    text = (state / "report.md").read_text()
    assert "**In progress**" in text and "select" in text and "| base model |" in text
    assert "| SFT |" not in text and "| GDRT" not in text and f"| {chosen}" not in text.split("Wall time")[0]
    assert set(json.loads((state / "report.json").read_text())["table"]) == {"base model"}


def test_report_bootstrap_keeps_the_rows_and_gdrt_minus_sft_only():
    """{name: (records, by_row)} -> the rows and GDRT - SFT (not base model - SFT)."""
    def users(n, hit_rate, seed):
        rng = np.random.default_rng(seed)
        records, by_row = [], {}
        for u in range(n):
            items = [int(x) for x in rng.choice(50, 10, replace=False)]
            target = items[int(rng.integers(0, 10))] if rng.random() < hit_rate else 99
            by_row[u] = SimpleNamespace(row=u, target=target, history=[int(x) for x in rng.choice(50, 4)])
            records.append({"row": u, "topk_item_ids": items})
        return records, by_row
    titles, groups = {i: f"item {i}" for i in range(100)}, {i: 1 + i % 5 for i in range(100)}
    models = {"base model": users(30, 0.1, 3), "SFT": users(30, 0.3, 0), "GDRT": users(30, 0.6, 1)}
    table = gpu_report.bootstrap(models, titles, groups, n_boot=20, seed=0)
    assert list(table) == ["base model", "SFT", "GDRT", "GDRT - SFT"]
    assert set(table["SFT"]) == set(TABLE_KEYS) and len(table["SFT"]["NDCG@5"]) == 3
