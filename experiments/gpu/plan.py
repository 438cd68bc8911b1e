"""The state folder of the GPU protocol (experiments/gpu/protocol.py): the plan, time estimates, chunk sizes, status,
and the process runner that holds every stage to the call's deadline.

Functions over the folder's JSON files (no torch, no model), so `status` runs anywhere in a
second and the chunk arithmetic is tested on its own. Layer: above transfer.py.
"""

import collections
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from experiments.gpu.transfer import ROOT
from nanogdrt.files import write_json

# The plan of the issue: real Toy, train_5000.csv, 5 epochs, 500 validation users per epoch,
# bf16 unless 200 users' lists disagree with fp32 too much, the whole test split. The grid is
# in priority order: the CPU run's choice first, so a shorter grid is a prefix (`init --amend`).
PLAN_DEFAULTS = {
    "dataset": "toy", "train_file": "train_5000.csv", "train_samples": 5000, "epochs": 5,
    "batch_size": 8, "grad_accum": 1, "lr": 5e-4, "grid": "5:0.5,2:0.5,5:1.0,2:1.0,5:0.2,2:0.2",
    "valid_users": 500, "agree_users": 200, "dtype": "auto", "min_overlap": 0.8,
    "test_rows": None, "test_chunk": 1200, "beams": 10, "eval_batch_size": 32, "save_every": 50, "seed": 0,
}

# Until measured on the device (progress.json "rates"): H200 figures of BENCHMARKS.md where there
# are some (0.037 s/user fp32 beam search), generous guesses elsewhere.
GUESS = {"s_per_user": 0.06, "eval_overhead_s": 30.0, "steps_per_s": 8.0, "train_overhead_s": 45.0,
         "groups_s": 120.0}


class Stopped(Exception):
    """The call's time (or step) budget is spent: the state is consistent, the next call goes on."""


def invoke(argv, env, stop_at):
    """Run argv in the repo root, echo its output, kill its process group at `stop_at`.
    Returns (return code, killed, seconds, last lines of output)."""
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tail = collections.deque(maxlen=60)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(line, end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=max(1.0, stop_at - time.time()))
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGTERM)       # our own child's group: train.py checkpoints its step and stops
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, killed, time.time() - start, list(tail)


def write_jsonl_gz(records, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_jsonl_gz(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def train_state(out: Path):
    """train.py's trainer_state.json of a run folder (or of state.old, after a kill between its
    two renames; train.py --resume reads that one too), or None before its first checkpoint."""
    for d in ("state", "state.old"):
        f = Path(out) / d / "trainer_state.json"
        if f.is_file():
            return json.loads(f.read_text())
    return None


def s_per_user(rates, dtype):
    return rates.get(f"s_per_user:{dtype}", GUESS["s_per_user"])


def eval_estimate(rates, users, dtype):
    """Seconds of one recommend.py process over `users` users."""
    return rates.get("eval_overhead_s", GUESS["eval_overhead_s"]) + users * s_per_user(rates, dtype)


def valid_seconds(rates, users, dtype):
    """Seconds of train.py's validation after an epoch (beam search of the LoRA model)."""
    return 5.0 + users * s_per_user(rates, dtype)


def plan_chunk(step, validated, steps_per_epoch, epochs, steps_per_s, valid_s, seconds, cap=None):
    """The --max-steps of the next train.py call, so that it ends within `seconds`.

    train.py validates after an epoch's last step, unless --max-steps stops it exactly there: then
    the next call validates first (`validated` < completed epochs). So a chunk that should include
    a validation stops one step into the next epoch. Returns None when the rest of the run fits
    (no --max-steps), -1 when not even one step or the owed validation fits, else max_steps.
    `cap` bounds the number of optimizer steps."""
    total = steps_per_epoch * epochs
    s, t, moved, validated_here = step, seconds, False, False
    if validated < s // steps_per_epoch:                 # an epoch's steps are done, not yet validated
        if t < valid_s:
            return -1
        t, moved, validated_here = t - valid_s, True, True
    while s < total:
        boundary = (s // steps_per_epoch + 1) * steps_per_epoch
        k = min(boundary - s, math.floor(t * steps_per_s), cap - (s - step) if cap is not None else total)
        if k <= 0:
            break
        s, t, moved, validated_here = s + k, t - k / steps_per_s, True, False
        if s < boundary or t < valid_s:
            break
        t, validated_here = t - valid_s, True
    if not moved:
        return -1
    if s == total and validated_here:
        return None
    return s + 1 if validated_here else s


def list_agreement(a, b) -> dict:
    """How far two runs' ranked lists of the same users agree (records in the same user order)."""
    assert [x["row"] for x in a] == [y["row"] for y in b], "the two runs decoded different users"
    pairs = [(x["topk_item_ids"], y["topk_item_ids"]) for x, y in zip(a, b)]
    return {"users": len(pairs),
            "same_lists": sum(x == y for x, y in pairs) / len(pairs),
            "same_top1": sum(x[:1] == y[:1] for x, y in pairs) / len(pairs),
            "overlap@10": sum(len(set(x[:10]) & set(y[:10])) / max(len(x[:10]), 1) for x, y in pairs) / len(pairs)}


def run_name(method, groups=None, tau=None):
    return "sft" if method == "sft" else f"gdrt-G{groups}-tau{float(tau)}"


def run_names(plan):
    return ["sft", *(run_name("gdrt", g, t) for g, t in plan["grid"])]


def stage_names(plan):
    return (["agree", "groups", "base-test"] + [f"train:{n}" for n in run_names(plan)]
            + ["select", "test:sft", "test:gdrt"])


def is_done(state: Path, progress, name) -> bool:
    if name == "agree":
        return "dtype" in progress
    if name == "groups":
        return (state / "item_groups.json").exists()
    if name == "select":
        return "selection" in progress
    if name.startswith("train:"):
        return (state / name[6:] / "trainer_state.json.gz").exists()
    folder = {"base-test": "base", "test:sft": "sft"}.get(name) or progress.get("selection", {}).get("run", "?")
    return (state / folder / "test_predictions.jsonl.gz").exists()


def steps_per_epoch(plan, progress):
    n = progress.get("n_train", plan["train_samples"])
    return -(-(-(-n // plan["batch_size"])) // plan["grad_accum"])


def _stage_left(state, plan, progress, name):
    """(what is done, estimated seconds left) of one stage."""
    rates, dtype = progress.get("rates", {}), progress.get("dtype", "bfloat16")
    n_test = min(progress.get("n_test", 4794), plan["test_rows"] or 10**9)
    if name == "agree":
        n = sum((state / "agree" / f"{d}.jsonl.gz").exists() for d in ("float32", "bfloat16"))
        return f"{n}/2 dtypes", 0.0 if plan["dtype"] != "auto" else sum(
            eval_estimate(rates, plan["agree_users"], d) for d in ("float32", "bfloat16"))
    if name == "groups":
        return "", rates.get("groups_s", GUESS["groups_s"])
    if name == "select":
        return "", 0.0
    if name.startswith("train:"):
        spe, st = steps_per_epoch(plan, progress), train_state(state / name[6:])
        step, validated = (st["step"], len(st["epochs"])) if st else (0, 0)
        best = (f", best valid NDCG@5 {st['best']['NDCG@5']:.4f} (epoch {st['best']['epoch']})"
                if st and st.get("best") else "")
        left = ((spe * plan["epochs"] - step) / rates.get("steps_per_s", GUESS["steps_per_s"])
                + (plan["epochs"] - validated) * valid_seconds(rates, plan["valid_users"], dtype)
                + rates.get("train_overhead_s", GUESS["train_overhead_s"]))
        return f"step {step}/{spe * plan['epochs']}, {validated}/{plan['epochs']} epochs validated{best}", left
    folder = {"base-test": "base", "test:sft": "sft"}.get(name) or progress.get("selection", {}).get("run")
    done = 0
    if folder and (state / folder / "chunks").is_dir():
        done = sum(int(p.name.split("-")[2].split(".")[0]) - int(p.name.split("-")[1])
                   for p in (state / folder / "chunks").glob("rows-*.jsonl.gz"))
    chunks = math.ceil((n_test - done) / plan["test_chunk"])
    return (f"{done}/{n_test} rows", chunks * rates.get("eval_overhead_s", GUESS["eval_overhead_s"])
            + (n_test - done) * s_per_user(rates, dtype))


def sync_in(source: Path, state: Path):
    """Start from the repo's state unless this (warm) machine already holds a newer one of the same plan."""
    def meta(d):
        f = d / "progress.json"
        return json.loads(f.read_text()) if f.is_file() else {"generation": -1, "plan_id": None}
    here, there = meta(state), meta(source)
    if here["plan_id"] == there["plan_id"] and here["generation"] >= there["generation"]:
        print(f"{state}: generation {here['generation']} kept (newer than {source}'s {there['generation']})")
        return
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(source, state)


def init_state(state: Path, values: dict, amend=False):
    """plan.json (fixed from then on, except the grid with `amend`) and an empty progress.json."""
    plan = {**values, "grid": [[int(g), float(t)] for g, t in (x.split(":") for x in values["grid"].split(",") if x)]}
    if (state / "plan.json").exists():
        if not amend:
            raise SystemExit(f"{state}/plan.json exists (--amend changes only the grid of an existing plan)")
        old = json.loads((state / "plan.json").read_text())
        plan = {**old, "grid": plan["grid"]}
    else:
        plan["plan_id"] = uuid.uuid4().hex[:12]
        state.mkdir(parents=True, exist_ok=True)
        write_json(state / "progress.json", {"generation": 0, "plan_id": plan["plan_id"], "calls": [], "stages": {},
                                             "rates": {}})
    write_json(state / "plan.json", plan)


def status_lines(state: Path) -> list[str]:
    state = Path(state)
    if not (state / "plan.json").exists():
        return [f"{state}: no plan.json (python -m experiments.gpu init)"]
    plan = json.loads((state / "plan.json").read_text())
    progress = json.loads((state / "progress.json").read_text())
    grid = ", ".join(f"{g}:{t}" for g, t in plan["grid"])
    lines = [f"plan {plan['plan_id']}: {plan['dataset']} {plan['train_file']} ({plan['train_samples']} windows), "
             f"{plan['epochs']} epochs, batch {plan['batch_size']} x {plan['grad_accum']}, lr {plan['lr']}, "
             f"valid {plan['valid_users']} users/epoch, test {plan['test_rows'] or 'all'} rows; GDRT grid G:tau {grid}"]
    devices = sorted({c["device"] for c in progress["calls"]})
    agreement = progress.get("agreement")
    lines.append(f"generation {progress['generation']}, {len(progress['calls'])} calls on {devices or 'no device yet'}; "
                 f"dtype {progress.get('dtype', 'not chosen yet (' + plan['dtype'] + ')')}"
                 + (f" (bf16 vs fp32 on {agreement['users']} users: overlap@10 {agreement['overlap@10']:.3f}, "
                    f"same lists {agreement['same_lists']:.1%})" if agreement else ""))
    total, first = 0.0, None
    for name in stage_names(plan):
        seconds = progress["stages"].get(name, {}).get("seconds", 0)
        if is_done(state, progress, name):
            extra = f"  -> {progress['selection']['run']}" if name == "select" else ""
            lines.append(f"  [done] {name:<22} {seconds:7.0f} s{extra}")
            continue
        what, left = _stage_left(state, plan, progress, name)
        total += left
        first = first or name
        lines.append(f"  [{'part' if seconds else 'todo'}] {name:<22} {seconds:7.0f} s  {what}  (~{left:.0f} s left)")
    rates = progress.get("rates", {})
    measured = ", ".join(f"{k} {v:.3g}" for k, v in sorted(rates.items())) or "none measured yet (guesses)"
    lines.append(f"estimated device work left: ~{total:.0f} s (rates: {measured})")
    if progress["calls"] and progress["calls"][-1].get("stopped"):
        lines.append(f"last call stopped: {progress['calls'][-1]['stopped']}")
    lines.append(f"next: a `run` call (docs/gpu_protocol.md) starting at {first}" if first else
                 "all stages done: `python -m experiments.gpu report` (CPU)")
    return lines
