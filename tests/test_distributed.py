"""Data parallelism (torchrun + DDP, gloo on CPU): two ranks with a per-rank batch of 2 must train
and evaluate exactly like one process with a batch of 4 (the same global batch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanogdrt.infra.distributed import Dist
from nanogdrt.loss import gdrt_loss, group_sums_and_counts, sft_loss

ROOT = Path(__file__).resolve().parent.parent


def test_shard_gather_and_split_batch_cover_every_item_once():
    items = list(range(11))
    for world in (1, 2, 3, 4):
        shards = [Dist(r, world).shard(items) for r in range(world)]
        assert sorted(sum(shards, [])) == items
        back = [None] * len(items)
        for r, s in enumerate(shards):
            back[r::world] = s
        assert back == items
        for n in (1, 3, 8):
            slices = [Dist(r, world).split_batch(items[:n]) for r in range(world)]
            assert sum(slices, []) == items[:n]                       # contiguous, in order
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_reduced_losses_equal_the_global_batch_loss():
    """What the all-reduce buys: summing per-rank group sums/counts before the softmax gives the
    global batch's loss and Q(g) (each rank's share, summed), where averaging per-rank losses
    would not."""
    torch.manual_seed(0)
    nll, groups = torch.rand(30) * 5, torch.randint(1, 4, (30,))
    shards = [slice(0, 7), slice(7, 30)]                                 # unequal token counts
    whole = gdrt_loss(nll, groups, 3, 0.5)
    parts = [gdrt_loss(nll[s], groups[s], 3, 0.5) for s in shards]
    reduced = group_sums_and_counts(nll[shards[0]], groups[shards[0]], 3) + \
        group_sums_and_counts(nll[shards[1]], groups[shards[1]], 3)      # the all-reduce (SUM)
    shares = [gdrt_loss(nll[s], groups[s], 3, 0.5, scope=reduced) for s in shards]
    assert all(torch.allclose(p.q, whole.q, atol=1e-7) for p in shares)
    assert torch.allclose(sum(p.loss for p in shares), whole.loss, atol=1e-6)
    assert not torch.allclose(sum(p.loss for p in parts) / 2, whole.loss, atol=1e-3)   # naive average differs
    naive_sft = (sft_loss(nll[shards[0]]) + sft_loss(nll[shards[1]])) / 2
    assert not torch.allclose(naive_sft, sft_loss(nll), atol=1e-3)
    assert torch.allclose(sum(sft_loss(nll[s], scope_count=30) for s in shards), sft_loss(nll))


def _env(cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOGDRT_CACHE=str(cache), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(argv, cache):
    done = subprocess.run(argv, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("method", ["gdrt", "sft"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path, method):
    # 17 windows in global batches of 4: the last batch has one row, so rank 1 gets none there.
    common = ["train.py", "--model", str(tiny_model_dir), "--dataset", "synthetic", "--method", method,
              "--train-samples", "17", "--valid-users", "5", "--test-users", "5", "--epochs", "2",
              "--beams", "4", "--eval-batch-size", "4", "--lr", "3e-3", "--lora-dropout", "0",
              "--grad-accum", "2"]
    _run([sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")], tmp_path / "cache1")
    log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                "--batch-size", "2", "--out", str(tmp_path / "two")], tmp_path / "cache2")
    assert "global batch = 2 per rank x 2 accumulation x 2 ranks = 8 examples" in log

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["data_parallel_ranks"] == 2 and one["data_parallel_ranks"] == 1
    assert len(one["steps"]) == len(two["steps"]) == 2 * 3                # ceil(17 / 4) = 5 batches -> 3 steps
    for a, b in zip(one["steps"], two["steps"]):
        assert a["q"] == pytest.approx(b["q"], abs=1e-5)                  # the same Q(g) every step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["group_loss"] == pytest.approx(b["group_loss"], rel=1e-5, abs=1e-5)
    if method == "gdrt":
        assert any(max(s["q"]) > 0.3 for s in one["steps"])               # Q is not just uniform
    wa = load_file(str(tmp_path / "one" / "best_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "best_adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    floats = lambda d: {k: v for k, v in d.items() if isinstance(v, float)}  # noqa: E731
    assert floats(one["test"]) == pytest.approx(floats(two["test"]), abs=1e-6)
    assert one["test"]["top1_group_distribution"] == two["test"]["top1_group_distribution"]
    for a, b in zip(one["epochs"], two["epochs"]):
        assert floats(a["valid"]) == pytest.approx(floats(b["valid"]), abs=1e-6)
    # Sharded Eq. 3 scoring, gathered: rank 0 wrote the same catalogue relevance.
    (c1,), (c2,) = list((tmp_path / "cache1").iterdir()), list((tmp_path / "cache2").iterdir())
    assert c1.name == c2.name
    assert torch.allclose(load_file(str(c1))["logprobs"], load_file(str(c2))["logprobs"], atol=1e-5)
    # Predictions gathered back in the original user order, the same lists and scores.
    preds = lambda d: [json.loads(x) for x in (d / "test_predictions.jsonl").read_text().splitlines()]  # noqa: E731
    p1, p2 = preds(tmp_path / "one"), preds(tmp_path / "two")
    assert [p["row"] for p in p1] == [p["row"] for p in p2] and len(p1) == 5
    assert [p["topk_item_ids"] for p in p1] == [p["topk_item_ids"] for p in p2]
    for a, b in zip(p1, p2):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_interrupted_two_rank_run_resumes_exactly(tiny_model_dir, tmp_path):
    """Each rank keeps its own dropout stream in the checkpoint, so a resumed data-parallel run
    (LoRA dropout on) ends where the uninterrupted one does."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                "--model", str(tiny_model_dir), "--dataset", "synthetic", "--train-samples", "12",
                "--valid-users", "2", "--test-users", "2", "--epochs", "1", "--beams", "2", "--batch-size", "2",
                "--lr", "3e-3", "--lora-dropout", "0.3", "--save-every", "1"]
    _run([*torchrun, "--out", str(tmp_path / "straight")], tmp_path / "cache")
    _run([*torchrun, "--out", str(tmp_path / "broken"), "--max-steps", "2"], tmp_path / "cache")
    _run([*torchrun, "--out", str(tmp_path / "broken"), "--resume"], tmp_path / "cache")
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert a["steps"] == b["steps"] and len(a["steps"]) == 3
    wa = load_file(str(tmp_path / "straight" / "state" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "broken" / "state" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rng = load_file(str(tmp_path / "broken" / "state" / "rng.safetensors"))
    assert {"cpu.rank0", "cpu.rank1"} <= rng.keys() and not torch.equal(rng["cpu.rank0"], rng["cpu.rank1"])


def test_recommend_cli_split_across_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    cli = [str(ROOT / "recommend.py"), "--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "test",
           "--users", "5", "--beams", "3", "--batch-size", "2"]
    _run([sys.executable, *cli, "--out", str(tmp_path / "one.jsonl")], tmp_path / "cache1")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli,
          "--out", str(tmp_path / "two.jsonl")], tmp_path / "cache2")
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(one) == 5 and [r["row"] for r in one] == [r["row"] for r in two]
    assert [r["topk_item_ids"] for r in one] == [r["topk_item_ids"] for r in two]
