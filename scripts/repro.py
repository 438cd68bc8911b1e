"""Reproduction v2 on real Toy, in stages of at most about an hour that any machine can continue.

    python scripts/repro.py --data-dir ../shared/data/toy --list            # the plan: done / to do
    python scripts/repro.py --data-dir ../shared/data/toy --only 'train:sft-s0,test:sft-s0' --max-minutes 170
    python scripts/repro.py --data-dir ../shared/data/toy --stages robust   # one phase
    python scripts/repro.py --data-dir ../shared/data/toy --max-minutes 170 --commit   # a session's share
    make repro                                                              # everything still to do

Rows: the base model; SFT and GDRT (x --seeds training seeds); the GDRT grid (G x tau, seed 0),
chosen on validation NDCG@5; our control (GDRT's token groups with Q fixed uniform, x
--control-seeds: do the groups or the worst case do the work?); MSL (each --msl-taus), MSL+GDRT,
Reweight; SFT decoded with D3; SASRec and SASRec++. Every LLM row has the same training budget (file, windows, epochs, batch,
LoRA) and is decoded on the same seeded test users (scripts/repro_data.py) with the same item groups.

Each stage is one plain command. Its small outputs go to docs/repro/<row>/ (committed): the adapter
(adapter/, PEFT format), train_results.json (train.py's results.json: config, steps, epochs, wall
times), test_predictions.jsonl; docs/repro/manifest.json records every stage's exact command, wall
time, machine and the sha256 of its outputs. A stage whose outputs exist is skipped, so the same
command continues on any machine that has the committed folder. Training state (runs/repro/) is
not committed: an interrupted training resumes (--resume) on the same machine, restarts elsewhere.
Phases, in order: data, robust (SFT, GDRT x seeds; base), sweep (the grid), baselines, sweeptest,
diagnose (our diagnostic of MSL's unfairness: the decoding's softmax, scripts/repro_normaliser.py),
figures, report (docs/results.md, built by scripts/repro_report.py).
"""

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from nanogdrt import files  # noqa: E402

# Minutes on an idle 2-core CPU, measured on the Toy stages (docs/results.md's wall-time table):
# training 1,000 windows, one beam-search user (valid or test), one teacher-forced user of the
# mass stage, and a stage's start (load, caches).
RATES = {"train_1000": 13.5, "user": 0.7 / 60, "mass_user": 0.3 / 60, "start": 1.0}
PHASES = ["data", "robust", "sweep", "baselines", "sweeptest", "diagnose", "figures", "report"]
SELECT_KEYS = ("NDCG@5", "NDCG@10", "HR@10")
# The diagnose phase: (folder, adapter source: "msl" / "gdrt" = the chosen MSL / GDRT row, decode options).
DIAGNOSE = [("msl-allowed", "msl", ["--normaliser", "allowed"]),
            ("sft-allowed", "sft-s0", ["--normaliser", "allowed"]),
            ("msl-lp0", "msl", ["--length-penalty", "0"]),
            ("msl-allowed-lp0", "msl", ["--normaliser", "allowed", "--length-penalty", "0"]),
            ("sft-allowed-lp0", "sft-s0", ["--normaliser", "allowed", "--length-penalty", "0"]),
            ("gdrt-allowed", "gdrt", ["--normaliser", "allowed"]),          # does GDRT's gain over SFT
            ("gdrt-lp0", "gdrt", ["--length-penalty", "0"]),                # survive every decoding?
            ("gdrt-allowed-lp0", "gdrt", ["--normaliser", "allowed", "--length-penalty", "0"])]


@dataclass
class Stage:
    name: str                 # "train:sft-s0", "test:sft-s0", "groups", ...
    phase: str
    argv: object              # list[str], or a function of the plan returning one (decided late)
    outputs: list[Path]       # all present = done
    minutes: float            # estimate on an idle 2-core CPU (RATES)
    collect: object = None    # run after the command: copies outputs into docs/repro/<row>/


def parse_grid(spec: str) -> list[tuple[int, float]]:
    """"5:0.5,2:0.5" -> [(5, 0.5), (2, 0.5)]"""
    try:
        return [(int(g), float(t)) for g, t in (item.split(":") for item in spec.split(","))]
    except ValueError:
        raise SystemExit(f"--grid {spec!r}: expected G:TAU[,G:TAU...], e.g. 5:0.5,2:0.5") from None


TABLE_KEYS = ["NDCG@5", "NDCG@10", "HR@5", "HR@10", "MGU@5", "DGU@5"]


def user_table(records, dataset):
    """(records, {row: interaction}) of one model: an entry of `bootstrap`'s `models`."""
    return records, {x.row: x for x in dataset.test}


def bootstrap(models: dict, titles, item_group, n_boot=1000, seed=0) -> dict:
    """{name: (records, by_row)} -> point estimates and 95% intervals over users, and the paired
    GDRT - SFT (scripts/gpu_report.py's table; repro_stats.py holds the arithmetic)."""
    from repro_stats import Users, bootstrap as resample
    users = {name: Users(records, by_row, titles, item_group) for name, (records, by_row) in models.items()}
    table = resample(users, "SFT", n_boot, seed)
    return {k: v for k, v in table.items() if " - " not in k or k == "GDRT - SFT"}


def gdrt_row(g, tau, seed=0) -> str:
    return f"gdrt-G{g}-tau{tau:g}-s{seed}"


def control_row(g, seed=0) -> str:
    """Our control (methods.py's group-mean): GDRT's G token groups with Q fixed uniform."""
    return f"groupmean-G{g}-s{seed}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def best_valid(train_results: Path) -> tuple:
    """Validation metrics of a run's best epoch, compared in this order: NDCG@5 (the paper's
    criterion), ties broken by NDCG@10, then HR@10 (ties at 0 are common at this scale)."""
    r = json.loads(train_results.read_text())
    valid = next(e["valid"] for e in r["epochs"] if e["epoch"] == r["best_epoch"])
    return tuple(valid[k] for k in SELECT_KEYS)


class Plan:
    """Every stage of the reproduction, built from the command line; `chosen()` is decided late."""

    def __init__(self, a):
        self.a, self.docs, self.runs = a, Path(a.docs), Path(a.runs)
        self.grid = parse_grid(a.grid)
        self.robust = parse_grid(a.robust_gdrt)[0]
        self.stages: list[Stage] = []
        self.build()

    # -- commands ------------------------------------------------------------------------------
    def data_args(self):
        a = self.a
        args = ["--dataset", a.dataset] + (["--data-dir", a.data_dir] if a.data_dir else [])
        if a.dataset == "synthetic":
            args += ["--synthetic-size", a.synthetic_size]
        return args + (["--model", a.model] if a.model else []) + ["--device", a.device]

    def train_argv(self, row, method, seed, extra=()):
        a = self.a
        # The same budget for every LLM row; train.py's own test runs on 1 user only (its test
        # sample follows --seed): the rows are tested by the decode stages on the shared users.
        return [sys.executable, "train.py", *self.data_args(), "--method", method, "--seed", str(seed),
                "--train-samples", str(a.train_samples), "--epochs", str(a.epochs),
                "--valid-users", str(a.valid_users), "--test-users", "1", "--out", str(self.runs / row),
                *(["--train-file", a.train_file] if a.train_file else []), *extra, *a.train_extra]

    def decode_argv(self, row, n, adapter=True, source=None, extra=()):
        """Decode into docs/repro/<row>/ with the adapter of `source` (default: the row's own)."""
        return [sys.executable, "scripts/repro_data.py", "decode", *self.data_args(),
                "--users-file", str(self.docs / "test_users.json"), "--n", str(n),
                *(["--adapter", str(self.docs / (source or row) / "adapter")] if adapter else []), *extra,
                "--out", str(self.docs / row / "test_predictions.jsonl")]

    def chosen(self, prefix="gdrt") -> str:
        """The grid row (or MSL tau row) with the best validation, once its runs are trained."""
        rows = ([gdrt_row(g, t) for g, t in self.grid] if prefix == "gdrt"
                else [f"msl-tau{t:g}-s0" for t in self.a.msl_taus])
        done = [r for r in rows if (self.docs / r / "train_results.json").exists()]
        if len(done) < len(rows):
            raise SystemExit(f"choosing the {prefix} row needs all of {rows} trained; missing "
                             f"{sorted(set(rows) - set(done))}")
        return max(done, key=lambda r: best_valid(self.docs / r / "train_results.json"))

    # -- stages --------------------------------------------------------------------------------
    def add_train(self, phase, row, method, seed, extra=()):
        a = self.a
        minutes = RATES["start"] + a.epochs * (a.train_samples / 1000 * RATES["train_1000"] + a.valid_users * RATES["user"])
        self.stages.append(Stage(
            f"train:{row}", phase, (lambda plan: plan.train_argv(row, method, seed, extra(plan) if callable(extra)
                                                                  else extra)),
            [self.docs / row / "train_results.json"], minutes, collect=lambda: self.collect_train(row)))

    def add_test(self, phase, row, n, adapter=True, argv=None):
        self.stages.append(Stage(f"test:{row}", phase, argv or self.decode_argv(row, n, adapter),
                                 [self.docs / row / "test_predictions.jsonl"], self.test_minutes(n)))

    @staticmethod
    def test_minutes(n):
        return RATES["start"] + n * RATES["user"]

    def build(self):
        a, docs = self.a, self.docs
        self.stages.append(Stage("groups", "data", [sys.executable, "scripts/repro_data.py", "groups",
                                                    *self.data_args(), "--users", str(a.test_users),
                                                    "--out", str(docs)],
                                 [docs / "item_groups.json", docs / "test_users.json"], 20))
        g, tau = self.robust
        for seed in range(a.seeds):                           # robustness first: SFT, GDRT x seeds
            for row, method, extra in ((f"sft-s{seed}", "sft", ()),
                                       (gdrt_row(g, tau, seed), "gdrt", ("--groups", str(g), "--tau", str(tau)))):
                self.add_train("robust", row, method, seed, extra)
                self.add_test("robust", row, a.test_users)
        self.add_test("robust", "base", a.other_test_users, adapter=False)
        for g, tau in self.grid:                              # the sweep, chosen on validation
            if (g, tau) != self.robust:
                self.add_train("sweep", gdrt_row(g, tau), "gdrt", 0, ("--groups", str(g), "--tau", str(tau)))
        for seed in range(a.control_seeds if a.control_groups else 0):   # our control, not the paper's
            self.add_train("sweep", control_row(a.control_groups, seed), "group-mean", seed,
                           ("--groups", str(a.control_groups)))
        for t in a.msl_taus:
            self.add_train("baselines", f"msl-tau{t:g}-s0", "msl", 0, ("--tau-msl", str(t)))
        self.add_train("baselines", "msl-gdrt-s0", "msl+gdrt", 0, self.msl_gdrt_extra)
        self.add_train("baselines", "reweight-s0", "reweight", 0, ("--reweight-power", str(a.reweight_power)))
        for row in ("msl-gdrt-s0", "reweight-s0"):
            self.add_test("baselines", row, a.other_test_users)
        self.stages.append(Stage("test:msl", "baselines", lambda plan: plan.decode_argv(
            plan.chosen("msl"), a.other_test_users), [], self.test_minutes(a.other_test_users)))
        self.stages.append(Stage("test:gdrt-chosen", "baselines", lambda plan: plan.decode_argv(
            plan.chosen(), a.test_users), [], self.test_minutes(a.test_users)))
        for row, loss in (("sasrec", "bce"), ("sasrec-pp", "ce")):
            self.stages.append(Stage(row, "baselines", [
                sys.executable, "-m", "nanogdrt.baselines.sasrec", "--dataset", a.dataset,
                *(["--data-dir", a.data_dir] if a.data_dir else []),
                *(["--synthetic-size", a.synthetic_size] if a.dataset == "synthetic" else []), "--loss", loss,
                "--test-samples", str(a.other_test_users), "--seed", "0", "--device", a.device,
                "--item-groups", str(docs / "item_groups.json"), "--out", str(docs / row), *a.sasrec_extra],
                [docs / row / "results.json"], 15, collect=lambda row=row: self.collect_sasrec(row)))
        # D3 as its code runs it (DecodingMatters' scripts): no length normalisation, alpha 0, so
        # no assistant (nanogdrt/baselines/d3.py, docs/d3.md). Ghost tokens are counted.
        self.add_test("baselines", "sft-d3", a.other_test_users, adapter=False, argv=[
            sys.executable, "-m", "nanogdrt.recommend", *self.data_args(), "--split", "test",
            "--users", str(a.other_test_users), "--seed", "0", "--adapter", str(docs / "sft-s0" / "adapter"),
            "--decoding", "d3", "--no-fairness",
            "--out", str(docs / "sft-d3" / "test_predictions.jsonl")])
        for g, tau in self.grid:                              # the grid on test, for Fig. 10/11
            if (g, tau) != self.robust:
                self.add_test("sweeptest", gdrt_row(g, tau), a.other_test_users)
        for seed in range(a.control_seeds if a.control_groups else 0):
            self.add_test("sweeptest", control_row(a.control_groups, seed), a.other_test_users)
        # Our diagnostic of MSL's unfairness, not the paper's (scripts/repro_normaliser.py): the MSL row
        # and SFT decoded with each step's softmax over the trie's allowed tokens, the distribution MSL's
        # loss trains, instead of over the whole vocabulary (transformers', MSL's own inference); each
        # with and without length normalisation (SFT's vocabulary decode without it is sft-d3).
        for row, source, extra in DIAGNOSE:
            self.stages.append(Stage(f"test:{row}", "diagnose", lambda plan, row=row, source=source, extra=extra:
                                     plan.decode_argv(row, a.other_test_users, extra=extra,
                                                      source=plan.chosen(source) if source in ("msl", "gdrt")
                                                      else source),
                                     [docs / row / "test_predictions.jsonl"], self.test_minutes(a.other_test_users)))
        self.stages.append(Stage("mass", "diagnose", lambda plan: [   # the term itself, on the test targets
            sys.executable, "scripts/repro_normaliser.py", "mass", *plan.data_args(), "--docs", str(docs),
            "--rows", f"base,sft-s0,{plan.chosen('msl')}", "--users-file", str(docs / "test_users.json"),
            "--n", str(a.other_test_users), "--out", str(docs / "allowed_mass.json")],
            [docs / "allowed_mass.json"], 3 * (RATES["start"] + a.other_test_users * RATES["mass_user"])))
        self.stages.append(Stage("figures", "figures", [
            sys.executable, "scripts/repro_report.py", "figures", *self.report_args(),
            "--examples", str(a.examples)], [Path(a.figures) / "analysis.json"], 60))
        self.stages.append(Stage("report", "report", [sys.executable, "scripts/repro_report.py", "report",
                                                      *self.report_args()], [], 5))
        for s in self.stages:   # a test of a chosen row decodes into that row's folder
            if s.name in ("test:msl", "test:gdrt-chosen"):
                s.outputs = None

    def msl_gdrt_extra(self, plan):
        """MSL+GDRT: MSL's chosen tau and GDRT's chosen (G, tau), decided after the sweep."""
        r = json.loads((self.docs / self.chosen() / "train_results.json").read_text())["config"]
        m = json.loads((self.docs / self.chosen("msl") / "train_results.json").read_text())["config"]
        return ("--groups", str(r["groups"]), "--tau", str(r["tau"]), "--tau-msl", str(m["tau_msl"]))

    def report_args(self):
        a = self.a
        return [*self.data_args(), "--docs", a.docs, "--runs", a.runs, "--figures", a.figures, "--grid", a.grid,
                "--robust-gdrt", a.robust_gdrt, "--seeds", str(a.seeds), "--bootstrap", str(a.bootstrap),
                "--results", a.results]

    def outputs(self, s: Stage) -> list[Path]:
        if s.outputs is not None:
            return s.outputs
        try:                                             # decided late: the chosen row's predictions
            row = self.chosen("msl" if s.name == "test:msl" else "gdrt")
        except SystemExit:
            return [Path("/nonexistent")]
        return [self.docs / row / "test_predictions.jsonl"]

    def minutes(self, s: Stage) -> float:
        """The stage's estimate; the figures stage is a few minutes when its analyze part is kept."""
        if s.name == "figures":
            from repro_figures import analyze_inputs, analyze_kept
            from repro_report import row_names
            if analyze_kept(Path(self.a.figures), analyze_inputs(self.a, row_names(self.a))):
                return 2
        return s.minutes

    def done(self, s: Stage) -> bool:
        if s.name == "figures":   # redrawn when the report's rows or the tested folders differ from those it drew
            from repro_figures import tested_rows
            from repro_report import row_names
            f = Path(self.a.figures) / "analysis.json"
            drawn = json.loads(f.read_text()) if f.exists() else {}
            return drawn.get("rows") == row_names(self.a) and drawn.get("tested") == tested_rows(self.docs)
        return s.name != "report" and all(p.exists() for p in self.outputs(s))

    # -- collection into docs/repro/<row> --------------------------------------------------------
    def collect_train(self, row):
        run, dest = self.runs / row, self.docs / row
        if (dest / "adapter").exists():
            shutil.rmtree(dest / "adapter")
        shutil.copytree(run / "best_adapter", dest / "adapter")
        files.write_text(dest / "train_results.json", (run / "results.json").read_text())   # the done marker, last

    def collect_sasrec(self, row):
        dest = self.docs / row
        shutil.copyfile(dest / "test_records.jsonl", dest / "test_predictions.jsonl")


# ----------------------------------------------------------------------------- running

class Manifest:
    """docs/repro/manifest.json: per stage, its exact command, wall time, machine, and the sha256
    of every file it left in docs/repro (adapters included), rewritten atomically after each."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name, argv, seconds, outputs: list[Path]):
        checksums = {}
        for out in outputs:   # a row's whole folder (adapter included); a shared file by itself
            found = [out] if out.parent == self.path.parent else sorted(out.parent.rglob("*"))
            for f in found:
                if f.is_file():
                    checksums[os.path.relpath(f, self.path.parent)] = sha256(f)
        argv = ["python" if a == sys.executable else a for a in argv]   # the same on any machine
        self.stages[name] = {"command": shlex.join(argv), "seconds": round(seconds, 1),
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                             "sha256": checksums}
        files.write_json(self.path, self.stages)


def run_stage(plan, s, manifest, deadline) -> bool:
    """Run one stage; False when it ran past the deadline (killed; training resumes later)."""
    argv = s.argv(plan) if callable(s.argv) else list(s.argv)
    if s.name.startswith("train:") and (plan.runs / s.name[6:] / "state").exists():
        argv.append("--resume")                         # an interrupted run on this machine
    print(f"\n=== {s.name} (~{plan.minutes(s):.0f} min): {shlex.join(argv)}", flush=True)
    start = time.time()
    # Eq. 2/3 scores of the catalogue under the base model (~0.8 MB for Toy, ~25 min to compute
    # on 2 cores) live beside the committed outputs, so another machine reuses them.
    env = {**os.environ, "NANOGDRT_CACHE": os.environ.get("NANOGDRT_CACHE", str((ROOT / plan.docs / "relevance-cache").resolve()))}
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)              # the stage's own process group only
        proc.wait()
        print(f"=== {s.name}: stopped at --max-minutes; rerun to continue", flush=True)
        return False
    if rc:
        raise SystemExit(f"stage {s.name} failed (exit {rc}): {shlex.join(argv)}")
    if s.collect:
        s.collect()
    manifest.record(s.name, argv, time.time() - start, plan.outputs(s))
    return True


def git_root(a) -> Path:
    """--commit: the git work tree that holds the outputs, checked before any stage runs."""
    here = Path(a.docs).resolve()
    while not here.exists():                            # the first run: docs/repro not made yet
        here = here.parent
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"error: --commit: {a.docs} is not inside a git work tree")
    return Path(found.stdout.strip())


def commit_stage(a, s, repo: Path):
    """--commit: one commit per finished stage, of the committed outputs only (docs, figures,
    report), so that the next session continues from it on any machine."""
    paths = [str(Path(p).resolve()) for p in (a.docs, a.figures, a.results) if Path(p).exists()]
    subprocess.run(["git", "add", "--", *paths], cwd=repo, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=repo).returncode == 0:
        return                                          # the stage changed nothing that is committed
    took = json.loads((Path(a.docs) / "manifest.json").read_text()).get(s.name, {}).get("seconds", 0) / 60
    subprocess.run(["git", "commit", "-q", "-m", f"Reproduction: stage {s.name} ({took:.1f} min)", "--", *paths],
                   cwd=repo, check=True)
    print(f"=== {s.name}: committed", flush=True)


def select(plan, a) -> list[Stage]:
    phases = a.stages.split(",") if a.stages else PHASES
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; phases are {','.join(PHASES)}")
    chosen = [s for s in plan.stages if s.phase in phases]
    if a.only:
        patterns = a.only.split(",")
        chosen = [s for s in chosen if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    return chosen


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-dir", default="../shared/data/toy")
    p.add_argument("--synthetic-size", default="small", choices=["full", "small"], help="synthetic only")
    p.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-file", default="train_1000.csv")
    p.add_argument("--train-samples", type=int, default=1000, help="training windows, every LLM row")
    p.add_argument("--epochs", type=int, default=2, help="epochs, every LLM row")
    p.add_argument("--valid-users", type=int, default=200, help="validation users (selection: NDCG@5)")
    p.add_argument("--test-users", type=int, default=1000, help="test users of SFT/GDRT and their seeds")
    p.add_argument("--other-test-users", type=int, default=1000,
                   help="test users of the other rows: the first N of the same draw (e.g. 500)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of SFT and GDRT")
    p.add_argument("--robust-gdrt", default="5:0.5", help="G:TAU of the GDRT trained on every seed")
    p.add_argument("--grid", default="2:0.2,2:0.5,2:1,2:2,2:5,5:0.2,5:0.5,5:1,5:2,5:5", help="GDRT G:TAU grid")
    p.add_argument("--control-groups", type=int, default=5,
                   help="G of the control row (our addition: GDRT's groups, Q fixed uniform; 0 = none)")
    p.add_argument("--control-seeds", type=int, default=3, help="training seeds of the control row")
    p.add_argument("--msl-taus", type=float, nargs="+", default=[1.0, 4.5], help="MSL taus (chosen on valid)")
    p.add_argument("--reweight-power", type=float, default=1.0, help="Reweight strength (IFairLRS: 1)")
    p.add_argument("--train-extra", type=shlex.split, default=[], help="more train.py flags for every LLM row, "
                                                                        "one string, e.g. '--batch-size 16'")
    p.add_argument("--sasrec-extra", type=shlex.split, default=[], help="more nanogdrt.baselines.sasrec flags, one string")
    p.add_argument("--examples", type=int, default=100, help="attribution examples of Fig. 2/7")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of test users")
    p.add_argument("--docs", default="docs/repro", help="committed outputs of every stage")
    p.add_argument("--runs", default="runs/repro", help="training folders (state; not committed)")
    p.add_argument("--figures", default="docs/figures/repro", help="figures (PNG + JSON)")
    p.add_argument("--results", default="docs/results.md", help="the generated report")
    p.add_argument("--stages", default=None, help=f"comma-separated phases ({','.join(PHASES)})")
    p.add_argument("--only", default=None, help="comma-separated stage names or patterns, e.g. 'train:sft-*'")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no stage past this budget; stop the running one at it")
    p.add_argument("--list", action="store_true", help="print the plan (done / to do, estimates) and stop")
    p.add_argument("--commit", action="store_true",
                   help="git commit --docs, --figures and --results after each finished stage")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    if a.data_dir and not Path(a.data_dir).is_dir() and a.dataset != "synthetic":
        raise SystemExit(f"error: --data-dir {a.data_dir}: no such folder (the Toy split)")
    if a.dataset == "synthetic":
        a.data_dir = None
    plan = Plan(a)
    stages = select(plan, a)
    if a.list:
        for s in stages:
            print(f"{'done' if plan.done(s) else 'todo'}  {s.phase:<10} {s.name:<28} ~{plan.minutes(s):5.0f} min")
        left = sum(plan.minutes(s) for s in stages if not plan.done(s))
        print(f"to do: ~{left / 60:.1f} h on a 2-core CPU")
        return
    repo = git_root(a) if a.commit else None
    manifest = Manifest(Path(a.docs) / "manifest.json")
    deadline = None if a.max_minutes is None else time.time() + 60 * a.max_minutes
    for s in stages:
        if plan.done(s):
            print(f"=== {s.name}: done, skipped")
            continue
        if deadline is not None and time.time() + 60 * plan.minutes(s) > deadline:
            print(f"=== {s.name}: ~{plan.minutes(s):.0f} min does not fit the --max-minutes left; stopping")
            return
        if not run_stage(plan, s, manifest, deadline):
            return
        if repo is not None:
            commit_stage(a, s, repo)


if __name__ == "__main__":
    main()
