"""Reproduction v2 on real Toy, in stages of at most about an hour that any machine can continue.

    python -m experiments.repro --data-dir ../shared/data/toy --list            # the plan: done / to do
    python -m experiments.repro --data-dir ../shared/data/toy --only 'train:sft-s0,test:sft-s0' --max-minutes 170
    python -m experiments.repro --data-dir ../shared/data/toy --stages robust   # one phase
    python -m experiments.repro --data-dir ../shared/data/toy --max-minutes 170 --commit   # a session's share
    make repro                                                                  # everything still to do

The stages and rows: experiments/repro/plan.py. Each stage is one plain command, run here in the
repository root; docs/repro/manifest.json records every stage's exact command, wall time, machine and
the sha256 of its outputs. A stage whose outputs exist is skipped, so the same command continues on
any machine that has the committed folder. Training state (runs/repro/) is not committed: an
interrupted training resumes (--resume) on the same machine, restarts elsewhere. The top layer of
experiments/repro: it imports the plan and nothing imports it.
"""

import argparse
import os
import shlex
import time
from pathlib import Path

from experiments.repro.plan import PHASES, Plan, Stage
from nanogdrt.infra import stages

ROOT = Path(__file__).resolve().parents[2]


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
    if not stages.run_command(argv, ROOT, env, deadline):
        print(f"=== {s.name}: stopped at --max-minutes; rerun to continue", flush=True)
        return False
    if s.collect:
        s.collect()
    manifest.record(s.name, {"command": stages.plain_command(argv)}, time.time() - start, plan.outputs(s))
    return True


def commit_stage(a, s, repo: Path, manifest):
    """--commit: one commit per finished stage, of the committed outputs only (docs, figures,
    report), so that the next session continues from it on any machine."""
    message = f"Reproduction: stage {s.name} ({manifest.seconds(s.name) / 60:.1f} min)"
    if stages.commit_outputs(repo, [a.docs, a.figures, a.results], message):
        print(f"=== {s.name}: committed", flush=True)


def select(plan, a) -> list[Stage]:
    return stages.select(plan.stages, PHASES, a.stages, a.only)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-dir", default="../shared/data/toy")
    p.add_argument("--synthetic-size", default="small", choices=["full", "small"], help="synthetic only")
    p.add_argument("--skip-bad", action="store_true",
                   help="every command drops malformed rows and blank titles, counted (Books: item 5746)")
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
    todo = select(plan, a)
    if a.list:
        for s in todo:
            print(f"{'done' if plan.done(s) else 'todo'}  {s.phase:<10} {s.name:<28} ~{plan.minutes(s):5.0f} min")
        left = sum(plan.minutes(s) for s in todo if not plan.done(s))
        print(f"to do: ~{left / 60:.1f} h on a 2-core CPU")
        return
    repo = stages.git_root(a.docs) if a.commit else None
    manifest = stages.Manifest(Path(a.docs) / "manifest.json")
    deadline = None if a.max_minutes is None else time.time() + 60 * a.max_minutes
    for s in todo:
        if plan.done(s):
            print(f"=== {s.name}: done, skipped")
            continue
        if deadline is not None and time.time() + 60 * plan.minutes(s) > deadline:
            print(f"=== {s.name}: ~{plan.minutes(s):.0f} min does not fit the --max-minutes left; stopping")
            return
        if not run_stage(plan, s, manifest, deadline):
            return
        if repo is not None:
            commit_stage(a, s, repo, manifest)


if __name__ == "__main__":
    main()
