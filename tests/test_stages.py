"""nanogdrt.infra.stages: the manifest, one command under a deadline, stage selection, and the
per-stage git commit (which waits for another git command's index lock instead of ending a run)."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanogdrt.infra import stages


def test_manifest_records_folders_and_single_files(tmp_path):
    docs = tmp_path / "docs"
    (docs / "row" / "adapter").mkdir(parents=True)
    (docs / "row" / "adapter" / "w.safetensors").write_bytes(b"abc")
    (docs / "row" / "results.json").write_text("{}")
    (docs / "shared.json").write_text("[1]")
    (docs / "other.json").write_text("not an output")
    m = stages.Manifest(docs / "manifest.json")
    m.record("train:row", {"command": stages.plain_command([sys.executable, "train.py", "--x"])}, 61.26,
             [docs / "row" / "results.json", docs / "shared.json"])
    back = json.loads((docs / "manifest.json").read_text())["train:row"]
    assert back["command"] == "python train.py --x" and back["seconds"] == 61.3
    assert set(back["sha256"]) == {"row/adapter/w.safetensors", "row/results.json", "shared.json"}
    assert back["sha256"]["shared.json"] == stages.sha256(docs / "shared.json")
    assert list(back) == ["command", "seconds", "finished", "machine", "sha256"]
    assert stages.Manifest(docs / "manifest.json").seconds("train:row") == 61.3


def test_select_by_phase_and_pattern():
    plan = [SimpleNamespace(name=n, phase=p) for n, p in
            (("train:sft-s0", "robust"), ("test:sft-s0", "robust"), ("train:gdrt-G5", "sweep"))]
    phases = ["robust", "sweep"]
    assert [s.name for s in stages.select(plan, phases, None, None)] == [s.name for s in plan]
    assert [s.name for s in stages.select(plan, phases, "sweep", None)] == ["train:gdrt-G5"]
    assert [s.name for s in stages.select(plan, phases, None, "train:*")] == ["train:sft-s0", "train:gdrt-G5"]
    with pytest.raises(SystemExit, match="--stages: unknown"):
        stages.select(plan, phases, "nonsense", None)


def test_run_command_stops_at_the_deadline_and_names_a_failure(tmp_path):
    start = time.time()
    assert stages.run_command([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, None,
                              time.time() + 1) is False
    assert time.time() - start < 10
    assert stages.run_command([sys.executable, "-c", "pass"], tmp_path, None, None) is True
    with pytest.raises(SystemExit, match=r"command failed \(exit 3\): python -c"):
        stages.run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, None, None)


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "docs").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own change, not staged by the harness")
    return tmp_path


def test_commit_outputs_commits_only_its_paths_and_waits_for_the_index_lock(repo):
    assert stages.git_root(repo / "docs" / "not-yet") == repo.resolve()
    (repo / "docs" / "a.json").write_text("1")
    lock = repo / ".git" / "index.lock"
    lock.write_text("")                                  # another git command is running
    threading.Timer(3.0, lock.unlink).start()
    assert stages.commit_outputs(repo, [repo / "docs", repo / "missing"], "stage a") is True
    assert _git(repo, "log", "--format=%s").split("\n")[0] == "stage a"
    assert _git(repo, "show", "--name-only", "--format=").split() == ["docs/a.json"]
    assert "notes.txt" in _git(repo, "status", "--porcelain")      # untouched
    assert stages.commit_outputs(repo, [repo / "docs"], "nothing new") is False


def test_git_root_outside_a_work_tree(tmp_path):
    with pytest.raises(SystemExit, match="not inside a git work tree"):
        stages.git_root(Path("/") / "proc" / "nonexistent-folder")
