"""The reproduction's stages: every row's training, decoding and the report, each one plain command.

Rows: the base model; SFT and GDRT (x --seeds training seeds); the GDRT grid (G x tau, seed 0),
chosen on validation NDCG@5 (rows.chosen); our control (GDRT's token groups with Q fixed uniform, x
--control-seeds: do the groups or the worst case do the work?); MSL (each --msl-taus), MSL+GDRT,
Reweight; SFT decoded with D3; SASRec and SASRec++. Every LLM row has the same training budget (file,
windows, epochs, batch, LoRA) and is decoded on the same seeded test users (experiments/repro/data.py)
with the same item groups.

Each stage's small outputs go to docs/repro/<row>/ (committed): the adapter (adapter/, PEFT format),
train_results.json (train.py's results.json: config, steps, epochs, wall times), test_predictions.jsonl.
A stage whose outputs exist is done. Phases, in order: data, robust (SFT, GDRT x seeds; base), sweep
(the grid), baselines, sweeptest, diagnose (our diagnostic of MSL's unfairness: the decoding's softmax,
experiments/repro/normaliser.py), figures, report (docs/results.md, built by experiments/repro/report.py).
Layer: above figures.py (whose marker says when the figures stage is done); runner.py runs the stages.
"""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments.repro.figures import analyze_inputs, analyze_kept, tested_rows
from experiments.repro import rows
from experiments.repro.rows import control_row, gdrt_row, msl_row, parse_grid, row_names
from nanogdrt import files

# Minutes on an idle 2-core CPU, measured on the Toy stages (docs/results.md's wall-time table):
# training 1,000 windows, one beam-search user (valid or test), one teacher-forced user of the
# mass stage, and a stage's start (load, caches).
RATES = {"train_1000": 13.5, "user": 0.7 / 60, "mass_user": 0.3 / 60, "start": 1.0}
PHASES = ["data", "robust", "sweep", "baselines", "sweeptest", "diagnose", "figures", "report"]
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
        if a.skip_bad:
            args += ["--skip-bad"]
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
        return [sys.executable, "-m", "experiments.repro.data", "decode", *self.data_args(),
                "--users-file", str(self.docs / "test_users.json"), "--n", str(n),
                *(["--adapter", str(self.docs / (source or row) / "adapter")] if adapter else []), *extra,
                "--out", str(self.docs / row / "test_predictions.jsonl")]

    def chosen(self, prefix="gdrt") -> str:
        """The grid row (or MSL tau row) chosen on validation (rows.chosen), once all its runs are trained."""
        candidates = ([gdrt_row(g, t) for g, t in self.grid] if prefix == "gdrt"
                      else [msl_row(t) for t in self.a.msl_taus])
        missing = [r for r in candidates if not (self.docs / r / "train_results.json").exists()]
        if missing:
            raise SystemExit(f"choosing the {prefix} row needs all of {candidates} trained; missing {sorted(missing)}")
        return rows.chosen(self.docs, candidates)

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
        """Every stage, in the order of the phases (PHASES)."""
        self.build_data_and_robust()
        self.build_sweep()
        self.build_baselines()
        self.build_sweeptest_and_diagnose()
        self.build_outputs()
        for s in self.stages:   # a test of a chosen row decodes into that row's folder
            if s.name in ("test:msl", "test:gdrt-chosen"):
                s.outputs = None

    def build_data_and_robust(self):
        a, docs = self.a, self.docs
        self.stages.append(Stage("groups", "data", [sys.executable, "-m", "experiments.repro.data", "groups",
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

    def build_sweep(self):
        a = self.a
        for g, tau in self.grid:                              # the sweep, chosen on validation
            if (g, tau) != self.robust:
                self.add_train("sweep", gdrt_row(g, tau), "gdrt", 0, ("--groups", str(g), "--tau", str(tau)))
        for seed in range(a.control_seeds if a.control_groups else 0):   # our control, not the paper's
            self.add_train("sweep", control_row(a.control_groups, seed), "group-mean", seed,
                           ("--groups", str(a.control_groups)))

    def build_baselines(self):
        a, docs = self.a, self.docs
        for t in a.msl_taus:
            self.add_train("baselines", msl_row(t), "msl", 0, ("--tau-msl", str(t)))
        self.add_train("baselines", "msl-gdrt-s0", "msl+gdrt", 0, self.msl_gdrt_extra)
        self.add_train("baselines", "reweight-s0", "reweight", 0,          # our v2 variant: Eq. 2's groups
                       ("--reweight-power", str(a.reweight_power), "--reweight-groups", "eq2"))
        self.add_train("baselines", "reweight-pop-s0", "reweight", 0,      # IFairLRS's popularity groups
                       ("--reweight-power", str(a.reweight_power), "--reweight-groups", "popularity"))
        for row in ("msl-gdrt-s0", "reweight-s0", "reweight-pop-s0"):
            self.add_test("baselines", row, a.other_test_users)
        self.stages.append(Stage("test:msl", "baselines", lambda plan: plan.decode_argv(
            plan.chosen("msl"), a.other_test_users), [], self.test_minutes(a.other_test_users)))
        self.stages.append(Stage("test:gdrt-chosen", "baselines", lambda plan: plan.decode_argv(
            plan.chosen(), a.test_users), [], self.test_minutes(a.test_users)))
        for row, loss in (("sasrec", "bce"), ("sasrec-pp", "ce")):
            self.stages.append(Stage(row, "baselines", [
                sys.executable, "-m", "nanogdrt.baselines.sasrec", "--dataset", a.dataset,
                *(["--data-dir", a.data_dir] if a.data_dir else []),
                *(["--synthetic-size", a.synthetic_size] if a.dataset == "synthetic" else []),
                *(["--skip-bad"] if a.skip_bad else []), "--loss", loss,
                "--test-samples", str(a.other_test_users), "--seed", "0", "--device", a.device,
                "--item-groups", str(docs / "item_groups.json"), "--out", str(docs / row), *a.sasrec_extra],
                [docs / row / "results.json"], 15, collect=lambda row=row: self.collect_sasrec(row)))
        # D3 as its code runs it (DecodingMatters' scripts): no length normalisation, alpha 0, so
        # no assistant (nanogdrt/baselines/d3.py, docs/d3.md). Ghost tokens are counted.
        self.add_test("baselines", "sft-d3", a.other_test_users, adapter=False, argv=[
            sys.executable, "recommend.py", *self.data_args(), "--split", "test",
            "--users", str(a.other_test_users), "--seed", "0", "--adapter", str(docs / "sft-s0" / "adapter"),
            "--decoding", "d3", "--no-fairness",
            "--out", str(docs / "sft-d3" / "test_predictions.jsonl")])

    def build_sweeptest_and_diagnose(self):
        a, docs = self.a, self.docs
        for g, tau in self.grid:                              # the grid on test, for Fig. 10/11
            if (g, tau) != self.robust:
                self.add_test("sweeptest", gdrt_row(g, tau), a.other_test_users)
        for seed in range(a.control_seeds if a.control_groups else 0):
            self.add_test("sweeptest", control_row(a.control_groups, seed), a.other_test_users)
        # Our diagnostic of MSL's unfairness, not the paper's (normaliser.py): the MSL row
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
            sys.executable, "-m", "experiments.repro.normaliser", "mass", *plan.data_args(), "--docs", str(docs),
            "--rows", f"base,sft-s0,{plan.chosen('msl')}", "--users-file", str(docs / "test_users.json"),
            "--n", str(a.other_test_users), "--out", str(docs / "allowed_mass.json")],
            [docs / "allowed_mass.json"], 3 * (RATES["start"] + a.other_test_users * RATES["mass_user"])))

    def build_outputs(self):
        a = self.a
        self.stages.append(Stage("figures", "figures", [
            sys.executable, "-m", "experiments.repro.report", "figures", *self.report_args(),
            "--examples", str(a.examples)], [Path(a.figures) / "analysis.json"], 60))
        self.stages.append(Stage("report", "report", [sys.executable, "-m", "experiments.repro.report", "report",
                                                      *self.report_args()], [], 5))

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
            if analyze_kept(Path(self.a.figures), analyze_inputs(self.a, row_names(self.docs, self.a.grid))):
                return 2
        return s.minutes

    def done(self, s: Stage) -> bool:
        if s.name == "figures":   # redrawn when the report's rows or the tested folders differ from those it drew
            f = Path(self.a.figures) / "analysis.json"
            drawn = json.loads(f.read_text()) if f.exists() else {}
            return drawn.get("rows") == row_names(self.docs, self.a.grid) and drawn.get("tested") == tested_rows(self.docs)
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
