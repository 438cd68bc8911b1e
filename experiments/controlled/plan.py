"""The controlled sweep's stages (docs/controlled/plan.md), each a short list of plain commands.

    pilot:sft-s0, pilot:sft-s0.3      the plan's gate: SFT seed 0 trained and measured, the base model
                                      measured, the gate checked and written (gate.json)
    base:s<S>                         the base model decoded and measured at each setting
    select:s<S>-G<g>-tau<t>           the GDRT grid, selection seed 100, --no-test (validation only)
    select:s<S>-chosen                the plan's rule applied and written down (chosen.json)
    train:<row>-s<S>-seed<k>          train.py (sft | gdrt | group-mean with the chosen G, tau), collected
    measure:<row>-s<S>-seed<k>        experiments/controlled/measures.py on that run
    report                            docs/controlled/results.md and the figures

Committed outputs: docs/controlled/s<S>/<row>-seed<k>/ holds train_results.json (train.py's
results.json), test_predictions.jsonl (prompt ids dropped), measures.json, and adapter/ for the
ADAPTER_SEEDS only (~1.8 MB each at the default LoRA; 60 would be ~110 MB). Training folders
(runs/controlled/, with the snapshots of the top-1 curve) are not committed: a run's measure stage
follows its train stage, on the same machine. The pilot's steps are those of train:sft-s<S>-seed0,
measure:..., base:s<S>, so those stages are then done. Settings in the order of the primary
family first (0.3, then 0, then the rest), so a partial sweep already answers P1-P4.
Layer: above report.py; runner.py runs the stages.
"""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments.controlled.rules import read_chosen
from experiments.controlled.settings import (PRIMARY_SHORTCUT, TRAINED_ROWS, WORLD_SEED, Settings, folder,
                                             run_name, s_name, select_folder)
from nanogdrt import files

# Minutes on the idle 2-core CPU, from the pilot (pilot:sft-s0.3, 2026-12-07, load ~2): train and
# validate 192 windows x 2 epochs (227 s; the plan guessed 4 min), test 156 users (52 s), measure a
# run (swap decode, "N/A", 50 attributions: ~2 min), one snapshot of the curve (64 users: ~25 s), a
# process's start (Eq. 2/3 cached after the first run). Under other jobs (load 2-5, pilot:sft-s0)
# training took 689 s: ~3x.
RATES = {"train": 3.8, "test": 0.9, "measure": 2.0, "snapshot": 0.4, "start": 0.3}
PHASES = ["pilot", "base", "select", "train", "report"]


@dataclass
class Step:
    argv: object                               # list[str], or a function of the plan returning one (decided late)
    outputs: list[Path]                        # all present: the step is done (skipped)
    collect: object = None                     # run in this process after the command


@dataclass
class Stage:
    name: str
    phase: str
    steps: list[Step]
    minutes: float

    @property
    def outputs(self) -> list[Path]:
        return [p for s in self.steps for p in s.outputs]


class Plan:
    def __init__(self, a, settings: Settings):
        self.a, self.s = a, settings
        self.docs, self.runs = Path(a.docs), Path(a.runs)
        self.stages: list[Stage] = []
        self.build()

    # -- where things are ------------------------------------------------------------------------
    def setting(self, s) -> Path:
        return self.docs / s_name(s)

    def common(self) -> list[str]:
        return [*(["--model", self.s.model] if self.s.model else []),
                *(["--test-users", str(self.s.test_users)] if self.s.test_users else [])]

    # -- steps -------------------------------------------------------------------------------------
    def train_step(self, s, row, seed, grid_point=None) -> Step:
        """train.py on the controlled world, collected into docs (the done marker last); with
        grid_point (G, tau), a selection run: validation only."""
        select = grid_point is not None
        name = select_folder(*grid_point) if select else folder(row, seed)
        run, dest, c = self.runs / s_name(s) / name, self.setting(s) / name, self.s

        def argv(plan):
            if select:
                method = ["--groups", str(grid_point[0]), "--tau", f"{grid_point[1]:g}", "--no-test"]
            else:
                method = plan.chosen_args(s, row) if row != "sft" else []
                if seed in c.curve_seeds and c.snapshot_every:
                    method += ["--snapshot-every", str(c.snapshot_every)]
            return [sys.executable, "train.py", "--dataset", "controlled", "--shortcut", f"{s:g}",
                    "--world-seed", str(WORLD_SEED), "--method", TRAINED_ROWS[row], "--seed", str(seed),
                    "--train-samples", str(c.train_samples), "--epochs", str(c.epochs),
                    "--batch-size", str(c.batch_size), "--valid-users", str(c.valid_users), "--beams", str(c.beams),
                    *self.common(), *method, "--out", str(run), *c.train_extra,
                    *(["--resume"] if (run / "state").exists() else [])]   # an interrupted run on this machine
        collect = (lambda: collect_selection(run, dest)) if select else (
            lambda: collect_run(run, dest, seed in c.adapter_seeds))
        return Step(argv, [dest / "train_results.json"], collect)

    def measure_step(self, s, row, seed) -> Step:
        """measures.py on a trained run: its committed test records, its adapter (the training
        folder's, else the committed one) and, for the curve seeds, its snapshots."""
        name = folder(row, seed)
        run, dest, c = self.runs / s_name(s) / name, self.setting(s) / name, self.s
        curve = seed in c.curve_seeds and c.snapshot_every

        def argv(plan):
            adapter = run / "best_adapter" if (run / "best_adapter").exists() else dest / "adapter"
            return [sys.executable, "-m", "experiments.controlled.measures", "--shortcut", f"{s:g}",
                    "--seed", str(seed), *self.common(), "--beams", str(c.beams),
                    "--predictions", str(dest / "test_predictions.jsonl"), "--adapter", str(adapter),
                    *(["--snapshots", str(run / "snapshots"), "--curve-users", str(c.curve_users)] if curve else []),
                    "--attribution-users", str(c.attribution_users), "--out", str(dest / "measures.json")]
        return Step(argv, [dest / "measures.json"])

    def base_step(self, s) -> Step:
        dest = self.setting(s) / "base"
        return Step([sys.executable, "-m", "experiments.controlled.measures", "--shortcut", f"{s:g}",
                     *self.common(), "--beams", str(self.s.beams), "--predictions-out",
                     str(dest / "test_predictions.jsonl"), "--attribution-users", str(self.s.attribution_users),
                     "--out", str(dest / "measures.json")], [dest / "measures.json"])

    def chosen_args(self, s, row) -> list[str]:
        """GDRT: --groups G --tau TAU as chosen on validation; the control: GDRT's G (Q uniform)."""
        g, tau = read_chosen(self.setting(s))
        return ["--groups", str(g), "--tau", f"{tau:g}"] if row == "gdrt" else ["--groups", str(g)]

    # -- stages ------------------------------------------------------------------------------------
    def build(self):
        c, rules = self.s, [sys.executable, "-m", "experiments.controlled.rules"]
        train_min = RATES["start"] + RATES["train"] * c.train_samples / 192 * c.epochs / 2 + RATES["test"]
        measure_min = RATES["start"] + RATES["measure"]
        curve_min = measure_min + RATES["snapshot"] * c.train_samples * c.epochs // (c.batch_size * max(c.snapshot_every, 1))
        pilots = [s for s in (0.0, PRIMARY_SHORTCUT) if s in c.shortcuts]
        for s in pilots:
            gate = Step([*rules, "gate", "--setting", str(self.setting(s))], [self.setting(s) / "gate.json"])
            steps = [self.train_step(s, "sft", 0), self.measure_step(s, "sft", 0), self.base_step(s), gate]
            self.stages.append(Stage(f"pilot:sft-{s_name(s)}", "pilot", steps,
                                     train_min + curve_min + measure_min + 1.5))
        for s in c.shortcuts:
            self.stages.append(Stage(f"base:{s_name(s)}", "base", [self.base_step(s)], measure_min + 1.5))
        order = sorted(c.shortcuts, key=lambda s: (s != PRIMARY_SHORTCUT, s != 0.0, s))
        for s in order:
            for g, tau in c.grid:
                self.stages.append(Stage(f"select:{s_name(s)}-G{g}-tau{tau:g}", "select",
                                         [self.train_step(s, "gdrt", c.selection_seed, (g, tau))],
                                         train_min - RATES["test"]))
            self.stages.append(Stage(f"select:{s_name(s)}-chosen", "select", [Step(
                [*rules, "choose", "--setting", str(self.setting(s)), "--grid",
                 ",".join(f"{g}:{t:g}" for g, t in c.grid)], [self.setting(s) / "chosen.json"])], 0.2))
            for seed in c.seeds:
                for row in TRAINED_ROWS:
                    name = run_name(row, s, seed)
                    self.stages.append(Stage(f"train:{name}", "train", [self.train_step(s, row, seed)], train_min))
                    self.stages.append(Stage(f"measure:{name}", "train", [self.measure_step(s, row, seed)],
                                             curve_min if seed in c.curve_seeds else measure_min))
        self.stages.append(Stage("report", "report", [Step(
            [sys.executable, "-m", "experiments.controlled.report", *self.report_args()], [])], 1.0))

    def report_args(self) -> list[str]:
        c, a = self.s, self.a
        return ["--docs", a.docs, "--figures", a.figures, "--results", a.results,
                "--shortcuts", ",".join(f"{s:g}" for s in c.shortcuts), "--seeds", ",".join(map(str, c.seeds)),
                "--bootstrap", str(c.bootstrap)]

    def done(self, st: Stage) -> bool:
        return st.name != "report" and all(p.exists() for p in st.outputs)


# ----------------------------------------------------------------------------- collection into docs

def collect_run(run: Path, dest: Path, keep_adapter: bool):
    """train.py's results.json, its test records without prompt ids (rebuilt from the row), the
    adapter when asked; train_results.json last: it marks the stage done."""
    records = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    files.write_jsonl(dest / "test_predictions.jsonl", [{k: v for k, v in r.items() if k != "prompt_ids"}
                                                         for r in records])
    if keep_adapter:
        if (dest / "adapter").exists():
            shutil.rmtree(dest / "adapter")
        shutil.copytree(run / "best_adapter", dest / "adapter")
    files.write_text(dest / "train_results.json", (run / "results.json").read_text())


def collect_selection(run: Path, dest: Path):
    """A --no-test run writes no results.json: its checkpoint holds the validation of every epoch."""
    state = json.loads((run / "state" / "trainer_state.json").read_text())
    files.write_json(dest / "train_results.json", {
        "config": state["config"], "best_epoch": state["best"]["epoch"], "best": state["best"],
        "epochs": state["epochs"], "steps": state["steps"], "train_and_valid_s": state.get("train_and_valid_s")})
