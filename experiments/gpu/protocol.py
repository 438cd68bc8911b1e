"""The paper's protocol on one GPU, cut into stages that fit short device calls.

The protocol (§4.1, as docs/results.md runs it at CPU scale): the base model, SFT and GDRT on
real Toy; several epochs, each validated on a sample of users inside train.py, the best epoch
kept by NDCG@5; GDRT's (G, tau) chosen on validation; all three tested on the whole test split.
A device session holds about eleven usable minutes, so the work is a list of stages, each
resumable, and every call runs as many as its budget allows (docs/gpu_protocol.md):

    agree       bf16 and fp32 beam search on the same validation users: list agreement decides
                the run's dtype (unless the plan fixes it)
    groups      Eq. 2 relevance of every title under the base model -> the item groups of MGU/DGU
                (and Eq. 3's cache, which train.py then reads instead of scoring again)
    base-test   the base model on the test split, in chunks of rows (recommend.py --rows)
    train:NAME  SFT, then GDRT for each (G, tau) of the grid: train.py --no-test, in chunks
                (--max-steps / --resume) sized to the time left; validation after each epoch
    select      the GDRT run with the best validation NDCG@5 (ties: NDCG@10, then HR@10; nanogdrt.stats.choose)
    test:sft, test:gdrt   the best epoch's adapter on the test split, in chunks of rows

    python -m experiments.gpu status                      # what is done, what the next call does
    python3 -m experiments.gpu run --from docs/gpu/protocol --state-dir /tmp/ngd/state \\
        --data-dir D --model M --device cuda --budget-s 540    # on the device
    python -m experiments.gpu report --data-dir ../shared/data/toy   # here: bootstrap table

A stage whose output exists is skipped; a stage that does not fit the time left is not started
(training stops at a planned step; a process still running at the deadline gets SIGTERM, on which
train.py checkpoints after the step in flight, and SIGKILL 15 s later; its last checkpoint resumes
it). State: plan.json (fixed at `init`), progress.json (times, measured rates, decisions), one
folder per model; safetensors, JSON and gzipped JSON lines only. Layer: the top of experiments/gpu
(transfer.py, plan.py, report.py below it); `python -m experiments.gpu` runs its main().
"""

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from experiments.gpu import transfer
from experiments.gpu.plan import (GUESS, PLAN_DEFAULTS, Stopped, eval_estimate, init_state, invoke, is_done,
                                  list_agreement, plan_chunk, read_jsonl_gz, run_name, stage_names, status_lines,
                                  sync_in, train_state, valid_seconds, write_jsonl_gz)
from experiments.gpu.report import report
from experiments.gpu.transfer import ROOT
from nanogdrt.files import write_json
from nanogdrt.stats import SELECT_KEYS, choose

STATE = ROOT / "docs" / "gpu" / "protocol"
GRACE_S = 15            # a process still running this long after the deadline is killed
PROBE_STEPS = 100       # the first training chunk, before the speed of a step is known


class Run:
    """One call's work on a state folder: the plan, the deadline, the measured rates."""

    def __init__(self, state: Path, data_dir, model, device, deadline, max_train_steps=None, pack_to=None, log=None,
                 compile=False):
        self.state, self.data_dir, self.model, self.device = Path(state), str(data_dir), str(model), device
        # train.py --compile: the same steps within bf16 noise, faster on a GPU (BENCHMARKS.md);
        # its rate is kept apart, since its first steps of every call also compile.
        self.compile, self.steps_key = compile, "steps_per_s:compile" if compile else "steps_per_s"
        self.pack_to, self.log, self.packed = pack_to, log, time.time()
        self.plan = json.loads((self.state / "plan.json").read_text())
        self.progress = json.loads((self.state / "progress.json").read_text())
        self.deadline, self.steps_left = deadline, max_train_steps
        self.rates = self.progress.setdefault("rates", {})
        self._dataset = None

    # --------------------------------------------------------------- bookkeeping
    def save(self):
        write_json(self.state / "progress.json", self.progress)

    def pack(self, every_s=60):
        """Pack the state into --pack-to now and then, so that a call cut short still returns it."""
        if self.pack_to and time.time() - self.packed >= every_s:
            transfer.pack(self.state, self.pack_to, self.log)
            self.packed = time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    def require(self, seconds, what):
        if seconds > self.left():
            raise Stopped(f"{what}: needs ~{seconds:.0f} s, {max(self.left(), 0):.0f} s left")

    def rate(self, key):
        return self.rates.get(key, GUESS[key.split(":")[0]])

    @property
    def dtype(self):
        return self.progress["dtype"]

    @property
    def dataset(self):
        if self._dataset is None:
            from nanogdrt.data import load_dataset
            p = self.plan
            self._dataset = load_dataset(p["dataset"], data_dir=self.data_dir, train_file=p["train_file"],
                                         train_samples=p["train_samples"], seed=p["seed"])
            self.progress["n_train"], self.progress["n_test"] = len(self._dataset.train), len(self._dataset.test)
        return self._dataset

    def call(self, stage, argv):
        """One subprocess of `stage`, timed into progress.json; Stopped if killed at the deadline."""
        env = {**os.environ, "NANOGDRT_CACHE": str(self.state / "relevance-cache"), "PYTHONUNBUFFERED": "1"}
        print(f"\n=== {stage}: python {' '.join(argv)}", flush=True)
        rc, killed, seconds, tail = invoke([sys.executable, *argv], env, self.deadline + GRACE_S)
        entry = self.progress["stages"].setdefault(stage, {"seconds": 0.0, "processes": 0, "command": None})
        entry["seconds"] = round(entry["seconds"] + seconds, 1)
        entry["processes"] += 1
        entry["command"] = entry["command"] or " ".join(["python", *argv])
        self.save()
        self.pack()
        if killed:
            raise Stopped(f"{stage}: killed at the deadline; its last checkpoint resumes it")
        if rc != 0:
            raise SystemExit(f"{stage} failed (exit {rc}):\n" + "\n".join(tail[-30:]))
        return seconds, tail

    def timed(self, stage, seconds):
        entry = self.progress["stages"].setdefault(stage, {"seconds": 0.0, "processes": 0, "command": "in-process"})
        entry["seconds"] = round(entry["seconds"] + seconds, 1)

    # --------------------------------------------------------------- evaluation
    def recommend(self, stage, split, rows_or_users, out, dtype=None, adapter=None):
        argv = ["recommend.py", "--dataset", self.plan["dataset"], "--data-dir", self.data_dir,
                "--model", self.model, "--split", split, *rows_or_users, "--seed", str(self.plan["seed"]),
                "--beams", str(self.plan["beams"]), "--batch-size", str(self.plan["eval_batch_size"]),
                "--dtype", dtype or self.dtype, "--device", self.device, "--no-fairness", "--out", str(out)]
        if adapter:
            argv += ["--adapter", str(adapter)]
        seconds, tail = self.call(stage, argv)
        users = sum(1 for _ in open(out))
        m = re.search(r"\(([\d.]+) s/user\)", "\n".join(tail))
        per_user = float(m.group(1)) if m else seconds / max(users, 1)
        self.rates[f"s_per_user:{dtype or self.dtype}"] = per_user
        self.rates["eval_overhead_s"] = max(0.0, seconds - per_user * users)
        records = [json.loads(line) for line in open(out)]
        os.remove(out)
        return [{k: r[k] for k in ("row", "target_item_id", "topk_item_ids", "scores")} for r in records]

    def test_split(self, stage, folder: Path, adapter=None) -> bool:
        """The test rows in chunks of plan['test_chunk'] (each chunk one file, so a stop loses none)."""
        final = folder / "test_predictions.jsonl.gz"
        if final.exists():
            return True
        n = min(len(self.dataset.test), self.plan["test_rows"] or len(self.dataset.test))
        step = self.plan["test_chunk"]
        chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
        for a, b in chunks:
            path = folder / "chunks" / f"rows-{a:06d}-{b:06d}.jsonl.gz"
            if path.exists():
                continue
            self.require(eval_estimate(self.rates, b - a, self.dtype), f"{stage} rows {a}:{b}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_gz(self.recommend(stage, "test", ["--rows", f"{a}:{b}"], self.state / "recs.tmp.jsonl",
                                          adapter=adapter), path)
        records = [r for a, b in chunks for r in read_jsonl_gz(folder / "chunks" / f"rows-{a:06d}-{b:06d}.jsonl.gz")]
        write_jsonl_gz(records, final)
        shutil.rmtree(folder / "chunks")
        write_json(folder / "test_metrics.json", self.metrics(records, self.dataset.test))
        return True

    def metrics(self, records, split):
        from nanogdrt.recommend import score
        by_row = {x.row: x for x in split}
        groups = self.state / "item_groups.json"
        item_group = {int(k): v for k, v in json.loads(groups.read_text()).items()} if groups.exists() else None
        return score(records, [by_row[r["row"]] for r in records], self.dataset.titles, item_group)

    # --------------------------------------------------------------- stages
    def agree(self) -> bool:
        if "dtype" in self.progress:
            return True
        if self.plan["dtype"] != "auto":
            self.progress["dtype"] = self.plan["dtype"]
            return True
        lists = {}
        for dtype in ("float32", "bfloat16"):
            path = self.state / "agree" / f"{dtype}.jsonl.gz"
            if not path.exists():
                self.require(eval_estimate(self.rates, self.plan["agree_users"], dtype), f"agree {dtype}")
                path.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl_gz(self.recommend("agree", "valid", ["--users", str(self.plan["agree_users"])],
                                              self.state / "recs.tmp.jsonl", dtype=dtype), path)
            lists[dtype] = read_jsonl_gz(path)
        agreement = {
            **list_agreement(lists["float32"], lists["bfloat16"]), "split": "valid",
            "s_per_user": {d: self.rates.get(f"s_per_user:{d}") for d in lists},
            "metrics": {d: {k: v for k, v in self.metrics(lists[d], self.dataset.valid).items()
                            if k in ("NDCG@5", "NDCG@10", "HR@10")} for d in lists},
        }
        self.progress["agreement"] = agreement
        self.progress["dtype"] = "bfloat16" if agreement["overlap@10"] >= self.plan["min_overlap"] else "float32"
        print(f"agree: overlap@10 {agreement['overlap@10']:.3f}, same lists {agreement['same_lists']:.1%} "
              f"-> dtype {self.dtype}")
        return True

    def groups(self) -> bool:
        path = self.state / "item_groups.json"
        if path.exists():
            return True
        self.require(self.rate("groups_s"), "groups")
        import torch   # heavy: `status` and `report` run without it

        from nanogdrt import relevance
        from nanogdrt.llama import Llama
        from nanogdrt.prompt import PromptBuilder
        from nanogdrt.tokenizer import Tokenizer
        start = time.time()
        model = Llama.from_pretrained(self.model, dtype=getattr(torch, self.dtype), device=self.device)
        builder = PromptBuilder(Tokenizer(self.model), self.plan["dataset"])
        os.environ["NANOGDRT_CACHE"] = str(self.state / "relevance-cache")   # the cache train.py then reads
        item_group = relevance.dataset_item_groups(model, builder, self.dataset, progress=False)
        write_json(path, {str(k): v for k, v in item_group.items()})
        del model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.rates["groups_s"] = time.time() - start
        self.timed("groups", time.time() - start)
        return True

    def train_argv(self, name, method, groups=None, tau=None):
        p = self.plan
        argv = ["train.py", "--dataset", p["dataset"], "--data-dir", self.data_dir, "--model", self.model,
                "--train-file", p["train_file"], "--train-samples", str(p["train_samples"]), "--method", method,
                "--epochs", str(p["epochs"]), "--valid-users", str(p["valid_users"]),
                "--batch-size", str(p["batch_size"]), "--grad-accum", str(p["grad_accum"]), "--lr", str(p["lr"]),
                "--beams", str(p["beams"]), "--eval-batch-size", str(p["eval_batch_size"]), "--seed", str(p["seed"]),
                "--save-every", str(p["save_every"]), "--device", self.device, "--dtype", self.dtype,
                "--out", str(self.state / name), "--no-test"] + (["--compile"] if self.compile else [])
        return argv + (["--groups", str(groups), "--tau", str(tau)] if method == "gdrt" else [])

    def train(self, stage, name, method, groups=None, tau=None) -> bool:
        out = self.state / name
        if (out / "trainer_state.json.gz").exists():
            return True
        p = self.plan
        n_batches = -(-len(self.dataset.train) // p["batch_size"])
        spe = -(-n_batches // p["grad_accum"])                          # optimizer steps per epoch
        while True:
            st = train_state(out)
            spe = st["epochs"][0]["step"] if st and st["epochs"] else spe   # as train.py counted them
            step, validated = (st["step"], len(st["epochs"])) if st else (0, 0)
            if st and st["epoch"] >= p["epochs"]:
                with gzip.open(out / "trainer_state.json.gz", "wt") as f:   # kept: logs, epochs, best
                    json.dump(st, f)
                for d in ("state", "state.old", "state.tmp"):           # optimizer and RNG: no longer needed
                    shutil.rmtree(out / d, ignore_errors=True)
                return True
            cap = self.steps_left
            if self.steps_key not in self.rates:
                cap = min(cap if cap is not None else PROBE_STEPS, PROBE_STEPS)
            seconds = self.left() - self.rate("train_overhead_s")
            target = plan_chunk(step, validated, spe, p["epochs"], self.rate(self.steps_key),
                                valid_seconds(self.rates, p["valid_users"], self.dtype), seconds, cap)
            if target == -1:
                raise Stopped(f"{stage}: at step {step}, no further step fits the time or step budget left")
            argv = self.train_argv(name, method, groups, tau) + (["--resume"] if st else [])
            argv += ["--max-steps", str(target)] if target is not None else []
            before = st.get("train_and_valid_s", 0.0) if st else 0.0
            seconds, _ = self.call(stage, argv)
            st = train_state(out)
            done, valids = st["step"] - step, len(st["epochs"]) - validated
            loop = st.get("train_and_valid_s", 0.0) - before
            train_s = loop - valids * valid_seconds(self.rates, p["valid_users"], self.dtype)
            if done >= 20 and train_s > 0:
                self.rates[self.steps_key] = done / train_s
            self.rates["train_overhead_s"] = max(0.0, seconds - loop)
            if self.steps_left is not None:
                self.steps_left -= done
                if self.steps_left <= 0 and st["epoch"] < p["epochs"]:
                    raise Stopped(f"{stage}: --max-train-steps reached at step {st['step']}")

    def select(self) -> bool:
        if "selection" in self.progress:
            return True
        scores = {}
        for g, tau in self.plan["grid"]:
            with gzip.open(self.state / run_name("gdrt", g, tau) / "trainer_state.json.gz", "rt") as f:
                st = json.load(f)
            best = next(e["valid"] for e in st["epochs"] if e["epoch"] == st["best"]["epoch"])
            scores[run_name("gdrt", g, tau)] = {"G": g, "tau": tau, "best_epoch": st["best"]["epoch"],
                                                **{k: best[k] for k in SELECT_KEYS}}
        chosen = choose(scores)
        self.progress["selection"] = {"run": chosen, "by": list(SELECT_KEYS), "grid": scores}
        print(f"select: {chosen} ({scores[chosen]})")
        return True


def stages(r: Run):
    """(name, function) in the order a call runs them."""
    def test(stage, folder, adapter=True):
        return lambda: r.test_split(stage, r.state / folder(), r.state / folder() / "best_adapter" if adapter else None)
    out = [("agree", r.agree), ("groups", r.groups), ("base-test", test("base-test", lambda: "base", adapter=False))]
    for method, g, tau in [("sft", None, None)] + [("gdrt", g, tau) for g, tau in r.plan["grid"]]:
        name = run_name(method, g, tau)
        out.append((f"train:{name}", lambda n=name, m=method, g=g, t=tau: r.train(f"train:{n}", n, m, g, t)))
    return out + [("select", r.select), ("test:sft", test("test:sft", lambda: "sft")),
                  ("test:gdrt", test("test:gdrt", lambda: r.progress["selection"]["run"]))]


NEEDS = {"select": "train:gdrt", "test:sft": "train:sft", "test:gdrt": "select"}


def run(args):
    start = args.since or time.time()
    state = Path(args.state_dir)
    if args.source:
        sync_in(Path(args.source), state)
    r = Run(state, args.data_dir, args.model, args.device, start + args.budget_s, args.max_train_steps,
            args.pack_to, args.log, args.compile)
    r.progress["generation"] += 1
    device = args.device
    if device.startswith("cuda"):
        import torch
        device = torch.cuda.get_device_name(0)
    call = {"generation": r.progress["generation"], "device": device, "budget_s": args.budget_s,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": [], "stopped": None}
    r.progress["calls"].append(call)
    r.save()
    skip, only = set(args.skip or []), set(args.only or [])
    finished = set(s for s in stage_names(r.plan) if is_done(r.state, r.progress, s))
    try:
        for name, fn in stages(r):
            if name in finished or name in skip or (only and name not in only):
                continue
            need = NEEDS.get(name)
            if need and not all(s in finished for s in stage_names(r.plan) if s.startswith(need)):
                print(f"{name}: waits for {need}*")
                continue
            if "dtype" not in r.progress and name != "agree":
                print(f"{name}: waits for agree (the dtype)")
                continue
            if fn():
                finished.add(name)
                call["finished"].append(name)
                r.save()
    except Stopped as e:
        call["stopped"] = str(e)
        print(f"stopped: {e}")
    except SystemExit as e:                      # a stage failed: keep what is done, then fail loudly
        call["stopped"] = f"failed: {str(e)[-1500:]}"
        raise
    finally:
        call["seconds"] = round(time.time() - start, 1)
        r.save()
        r.pack(every_s=0)
        print("\n".join(status_lines(state)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="write the plan (once)")
    for key, value in PLAN_DEFAULTS.items():
        i.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int, default=value)
    i.add_argument("--amend", action="store_true", help="change the grid of an existing plan (e.g. a smaller one)")
    r = sub.add_parser("run", help="run the stages that fit the budget (device)")
    r.add_argument("--from", dest="source", help="the committed state to start from (unless this machine's is newer)")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--model", required=True, help="the converted model folder")
    r.add_argument("--device", default="cuda")
    r.add_argument("--budget-s", type=float, required=True, help="seconds this call may use, from --since")
    r.add_argument("--since", type=float, default=None, help="unix time the budget counts from (default: now)")
    r.add_argument("--max-train-steps", type=int, default=None, help="at most about this many optimizer steps")
    r.add_argument("--compile", action="store_true", help="train.py --compile (compiled blocks for training)")
    r.add_argument("--pack-to", type=Path, default=None, help="pack the state here now and then, and at the end")
    r.add_argument("--log", type=Path, default=None, help="the log whose tail each pack carries")
    r.add_argument("--skip", nargs="*", help="stages not to run in this call")
    r.add_argument("--only", nargs="*", help="run only these stages")
    sub.add_parser("status", help="what is done and what the next call runs")
    k = sub.add_parser("pack", help="state -> at most 8 files in --out (device)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--log", type=Path, default=None)
    u = sub.add_parser("unpack", help="the files of pack -> the state folder (here)")
    u.add_argument("--from", dest="source", type=Path, required=True)
    u.add_argument("--force", action="store_true")
    e = sub.add_parser("report", help="bootstrap table of base / SFT / GDRT (CPU)")
    e.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "toy"))
    e.add_argument("--bootstrap", type=int, default=1000)
    for s in (i, r, k, u, e, sub.choices["status"]):
        s.add_argument("--state-dir", default=str(STATE))
    args = p.parse_args(argv)
    if args.cmd == "init":
        init_state(Path(args.state_dir), {k: getattr(args, k) for k in PLAN_DEFAULTS}, args.amend)
        print("\n".join(status_lines(Path(args.state_dir))))
    elif args.cmd == "run":
        run(args)
    elif args.cmd == "status":
        print("\n".join(status_lines(Path(args.state_dir))))
    elif args.cmd == "pack":
        transfer.pack(Path(args.state_dir), args.out, args.log)
    elif args.cmd == "unpack":
        transfer.unpack(args.source, Path(args.state_dir), args.force)
        print("\n".join(status_lines(Path(args.state_dir))))
    else:
        report(Path(args.state_dir), args.data_dir, args.bootstrap)


if __name__ == "__main__":
    main()
