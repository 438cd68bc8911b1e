"""The controlled world's sweep (docs/controlled/plan.md) in stages of minutes that any machine can continue.

    python -m experiments.controlled --list                         # the plan: done / to do, estimates
    python -m experiments.controlled --only 'pilot:*'               # the gate (SFT only), before any GDRT run
    python -m experiments.controlled --stages select,train --max-minutes 170 --commit   # a session's share
    make controlled                                                 # everything still to do

The stages: experiments/controlled/plan.py. Each is a few plain commands run in the repository root;
docs/controlled/manifest.json records every stage's exact commands, wall time, machine and the
sha256 of what it left in docs/controlled. A stage (or a step of it) whose outputs exist is skipped.
The plan's settings are the defaults; the flags that change them exist for tests (a tiny model, two
seeds) and are recorded in every command. The top layer of experiments/controlled.
"""

import argparse
import os
import shlex
import time
from pathlib import Path

from experiments.controlled.plan import PHASES, Plan, Stage
from experiments.controlled.settings import Settings, parse_grid
from nanogdrt.infra import stages

ROOT = Path(__file__).resolve().parents[2]


def run_stage(plan: Plan, st: Stage, manifest: stages.Manifest, deadline) -> bool:
    """The stage's steps not yet done, in order; False when stopped at --max-minutes."""
    print(f"\n=== {st.name} (~{st.minutes:.0f} min)", flush=True)
    # Eq. 2/3 of the 200 titles under the base model, once, beside the committed outputs.
    env = {**os.environ, "NANOGDRT_CACHE": os.environ.get("NANOGDRT_CACHE",
                                                          str((ROOT / plan.docs / "relevance-cache").resolve()))}
    start, commands = time.time(), []
    for step in st.steps:
        if step.outputs and all(p.exists() for p in step.outputs):
            continue                                     # e.g. the pilot's base step, done by base:s0
        argv = step.argv(plan) if callable(step.argv) else list(step.argv)
        print(f"--- {shlex.join(argv)}", flush=True)
        if not stages.run_command(argv, ROOT, env, deadline):
            print(f"=== {st.name}: stopped at --max-minutes; rerun to continue", flush=True)
            return False
        if step.collect:
            step.collect()
        commands.append(argv)
    manifest.record(st.name, {"commands": [stages.plain_command(c) for c in commands]}, time.time() - start,
                    st.outputs)   # the report: its commands only
    return True


def commit_stage(a, st: Stage, repo: Path, manifest):
    """--commit: one commit per finished stage, of the committed outputs only."""
    message = f"Controlled world: stage {st.name} ({manifest.seconds(st.name) / 60:.1f} min)"
    if stages.commit_outputs(repo, [a.docs, a.figures, a.results], message):
        print(f"=== {st.name}: committed", flush=True)


def select(plan: Plan, a) -> list[Stage]:
    return stages.select(plan.stages, PHASES, a.stages, a.only)


def settings_of(a) -> Settings:
    ints = lambda spec: tuple(int(x) for x in spec.split(",")) if spec else ()   # noqa: E731
    return Settings(shortcuts=tuple(float(x) for x in a.shortcuts.split(",")), seeds=ints(a.seeds),
                    grid=parse_grid(a.grid), train_samples=a.train_samples, epochs=a.epochs,
                    batch_size=a.batch_size, valid_users=a.valid_users, test_users=a.test_users, beams=a.beams,
                    snapshot_every=a.snapshot_every, curve_seeds=ints(a.curve_seeds), curve_users=a.curve_users,
                    attribution_users=a.attribution_users, adapter_seeds=ints(a.adapter_seeds),
                    bootstrap=a.bootstrap, model=a.model, train_extra=a.train_extra)


def parser():
    d = Settings()
    csv = lambda xs: ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)   # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--shortcuts", default=csv(d.shortcuts), help="the knob's settings s")
    p.add_argument("--seeds", default=csv(d.seeds), help="training seeds of SFT, GDRT and the control")
    p.add_argument("--grid", default=",".join(f"{g}:{t:g}" for g, t in d.grid), help="GDRT G:TAU selection grid")
    for flag, value in (("--train-samples", d.train_samples), ("--epochs", d.epochs), ("--batch-size", d.batch_size),
                        ("--valid-users", d.valid_users), ("--beams", d.beams), ("--snapshot-every", d.snapshot_every),
                        ("--curve-users", d.curve_users), ("--attribution-users", d.attribution_users),
                        ("--bootstrap", d.bootstrap)):
        p.add_argument(flag, type=int, default=value)
    p.add_argument("--test-users", type=int, default=None, help="test users (default: all 156)")
    p.add_argument("--curve-seeds", default=csv(d.curve_seeds), help="seeds whose snapshots are decoded")
    p.add_argument("--adapter-seeds", default=csv(d.adapter_seeds), help="seeds whose adapters are committed")
    p.add_argument("--train-extra", type=shlex.split, default=[], help="more train.py flags, one string")
    p.add_argument("--docs", default="docs/controlled", help="committed outputs of every stage")
    p.add_argument("--runs", default="runs/controlled", help="training folders (state, snapshots; not committed)")
    p.add_argument("--figures", default="docs/figures/controlled", help="figures (PNG + JSON)")
    p.add_argument("--results", default="docs/controlled/results.md", help="the generated report")
    p.add_argument("--stages", default=None, help=f"comma-separated phases ({','.join(PHASES)})")
    p.add_argument("--only", default=None, help="comma-separated stage names or patterns, e.g. 'pilot:*'")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no stage past this budget; stop the running one at it")
    p.add_argument("--list", action="store_true", help="print the plan (done / to do, estimates) and stop")
    p.add_argument("--commit", action="store_true", help="git commit --docs, --figures, --results after each stage")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    plan = Plan(a, settings_of(a))
    todo = select(plan, a)
    if a.list:
        for st in todo:
            print(f"{'done' if plan.done(st) else 'todo'}  {st.phase:<7} {st.name:<34} ~{st.minutes:5.1f} min")
        left = sum(st.minutes for st in todo if not plan.done(st))
        print(f"to do: ~{left / 60:.1f} h on a 2-core CPU")
        return
    repo = stages.git_root(a.docs) if a.commit else None
    manifest = stages.Manifest(Path(a.docs) / "manifest.json")
    deadline = None if a.max_minutes is None else time.time() + 60 * a.max_minutes
    for st in todo:
        if plan.done(st):
            print(f"=== {st.name}: done, skipped")
            continue
        if deadline is not None and time.time() + 60 * st.minutes > deadline:
            print(f"=== {st.name}: ~{st.minutes:.0f} min does not fit the --max-minutes left; stopping")
            return
        if not run_stage(plan, st, manifest, deadline):
            return
        if repo is not None:
            commit_stage(a, st, repo, manifest)


if __name__ == "__main__":
    main()
