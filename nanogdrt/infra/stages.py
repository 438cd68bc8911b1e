"""Resumable stages of an experiment: what each stage ran and left, one command under a deadline,
which stages to run, and one git commit per finished stage.

An experiment harness (experiments/repro, experiments/controlled) is a list of stages, each a few
plain commands run in the repository root, whose small outputs are committed so that any machine
continues where the last one stopped. What every harness needs for that lives here, once:

    Manifest        <docs>/manifest.json: per stage its commands, wall time, machine, and the
                    sha256 of every file it left (rewritten atomically after each stage)
    run_command     one command in its own process group, stopped at the deadline
    select          the stages of the chosen phases whose names match --only
    git_root,       --commit: the work tree, checked before any stage runs; one commit per stage
    commit_outputs  of the committed outputs only, retried while another git command holds the index

A harness imports no other harness (tests/test_layers.py), so this is package code.
"""

import fnmatch
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanogdrt import files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plain_command(argv) -> str:
    """The command as one shell line, the same on any machine (the interpreter is "python")."""
    return shlex.join(["python" if x == sys.executable else str(x) for x in argv])


class Manifest:
    """<docs>/manifest.json: what each finished stage ran and left, keyed by stage name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stages = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, name: str, commands: dict, seconds: float, outputs: list[Path]):
        """`commands`: {"command": line} or {"commands": [lines]}, as the harness reports them.
        A row's output is its whole folder (adapter included); a file beside the manifest counts
        by itself."""
        found = {f for out in map(Path, outputs)
                 for f in ([out] if out.parent == self.path.parent else out.parent.rglob("*"))}
        checksums = {os.path.relpath(f, self.path.parent): sha256(f) for f in sorted(found) if f.is_file()}
        self.stages[name] = {**commands, "seconds": round(seconds, 1),
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                             "sha256": checksums}
        files.write_json(self.path, self.stages)

    def seconds(self, name: str) -> float:
        return self.stages.get(name, {}).get("seconds", 0.0)


def run_command(argv, cwd: Path, env: dict, deadline: float | None) -> bool:
    """Run one command in its own process group; False when it ran past `deadline` (its group is
    stopped: a training resumes later). A failing command stops the harness with its exit code."""
    proc = subprocess.Popen(argv, cwd=cwd, start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)              # the command's own process group only
        proc.wait()
        return False
    if rc:
        raise SystemExit(f"command failed (exit {rc}): {plain_command(argv)}")
    return True


def select(stages: list, phases: list[str], wanted: str | None, only: str | None) -> list:
    """The stages of the phases in `wanted` (comma-separated; all when None) whose names match a
    pattern of `only` (comma-separated fnmatch patterns, e.g. 'train:sft-*')."""
    chosen_phases = wanted.split(",") if wanted else phases
    unknown = set(chosen_phases) - set(phases)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; phases are {','.join(phases)}")
    chosen = [s for s in stages if s.phase in chosen_phases]
    if only:
        patterns = only.split(",")
        chosen = [s for s in chosen if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    return chosen


def git_root(docs) -> Path:
    """--commit: the git work tree that will hold the outputs, found before any stage runs."""
    here = Path(docs).resolve()
    while not here.exists():                            # the first run: the folder is not made yet
        here = here.parent
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"error: --commit: {docs} is not inside a git work tree")
    return Path(found.stdout.strip())


def _git(repo: Path, *args, tries: int = 30):
    """A git command, retried while another git process holds the index (a commit made by hand
    beside a long run must not end the run)."""
    for _ in range(tries):
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        if done.returncode == 0 or "index.lock" not in done.stderr:
            return done
        time.sleep(2)
    return done


def commit_outputs(repo: Path, paths: list, message: str) -> bool:
    """One commit of `paths` (those that exist) only; False when they hold no change."""
    paths = [str(Path(p).resolve()) for p in paths if Path(p).exists()]
    added = _git(repo, "add", "--", *paths)
    if added.returncode:
        raise SystemExit(f"error: --commit: git add failed: {added.stderr.strip()}")
    if _git(repo, "diff", "--cached", "--quiet", "--", *paths).returncode == 0:
        return False                                    # the stage changed nothing that is committed
    done = _git(repo, "commit", "-q", "-m", message, "--", *paths)
    if done.returncode:
        raise SystemExit(f"error: --commit: git commit failed: {done.stderr.strip()}")
    return True
