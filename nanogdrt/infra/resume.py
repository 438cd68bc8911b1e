"""Training checkpoints that resume exactly: adapter, AdamW moments, RNG states, counters.

One folder, written whole or not at all:

    state/adapter_model.safetensors + adapter_config.json   the LoRA weights (PEFT format)
    state/optimizer.safetensors                             AdamW's step / exp_avg / exp_avg_sq
    state/rng.safetensors                                   torch CPU (and CUDA) generator states
    state/trainer_state.json                                epoch, batch, step, logs, best, config

`claim_run_folder` runs at start-up, before any work: the folder is writable, locked for this
run (run_folder.RunLock: a second run on the same folder is refused with the holder's pid), holds a
checkpoint when resuming and none otherwise; stale `state.tmp` / `state.old` of a crashed save
are removed on resume.

Only safetensors and JSON: nothing is unpickled. The folder is written as `state.tmp`, then
swapped in by renames, so a crash mid-write leaves the previous checkpoint intact (`state.old`
is picked up if the crash fell between the two renames). Batch order is a pure function of
(seed, epoch) and dropout draws from the restored RNG, so a resumed run repeats exactly the
steps an uninterrupted one would take.

`StopOnSigterm` turns SIGTERM (a scheduler's preemption, experiments/gpu/protocol.py's deadline) into
"checkpoint after this optimizer step and stop", so a stopped run loses no step.
"""

import json
import os
import shutil
import signal
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from nanogdrt.infra.run_folder import RunLock, check_writable
from nanogdrt.lora import load_adapter, save_adapter


def _has_state(folder: Path) -> bool:
    return (folder / "trainer_state.json").is_file()


def claim_run_folder(out, resume: bool) -> RunLock:
    """Check and lock the run folder `out` before any work; returns the held RunLock.

    Raises SystemExit (one line) when the folder cannot be written, another run holds it,
    --resume finds no checkpoint, or a fresh run would overwrite one."""
    out = Path(out)
    state, tmp, old = out / "state", out / "state.tmp", out / "state.old"
    try:
        check_writable(out, "folder")
        if resume and not (_has_state(state) or _has_state(old)):
            raise SystemExit(f"--resume: no checkpoint in {state} (nothing to resume)")
        lock = RunLock(out).acquire()                       # before the checks below: no race between runs
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not resume and state.exists():                       # never overwrite a run by accident
        lock.release()
        raise SystemExit(f"{state} exists: pass --resume to continue that run, or choose another --out")
    if resume:
        # A save interrupted while writing leaves state.tmp (incomplete: never read); one interrupted
        # between its two renames leaves state.old beside no state (load_state reads it then).
        shutil.rmtree(tmp, ignore_errors=True)
        if _has_state(state):
            shutil.rmtree(old, ignore_errors=True)
    return lock


def _optimizer_tensors(optimizer):
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{name}": t.detach().cpu().contiguous()
               for idx, s in sd["state"].items() for name, t in s.items() if torch.is_tensor(t)}
    return tensors, sd["param_groups"]


def save_state(folder, model, optimizer, state: dict, lora_config, run_config, rank_rng=None):
    """`rank_rng`: with data parallelism, every rank's generator states (distributed.rng_state),
    stored as `cpu.rank{r}` / `cuda.rank{r}` so each rank resumes its own dropout stream."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, lora_config)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    os.chmod(tmp / "optimizer.safetensors", 0o644)          # safetensors writes 0600; outputs are 0644
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for r, states in enumerate(rank_rng or []):
        rng.update({f"{kind}.rank{r}": s for kind, s in states.items()})
    save_file(rng, str(tmp / "rng.safetensors"))
    os.chmod(tmp / "rng.safetensors", 0o644)
    (tmp / "trainer_state.json").write_text(json.dumps(
        {**state, "param_groups": groups, "config": asdict(run_config)}, indent=1))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder, model, optimizer, device="cpu", rank=0) -> dict:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        old = folder.with_name(folder.name + ".old")
        if not (old / "trainer_state.json").is_file():
            raise SystemExit(f"--resume: no checkpoint in {folder} (nothing to resume)")
        folder = old
    try:
        saved = json.loads((folder / "trainer_state.json").read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{folder / 'trainer_state.json'}: invalid JSON at line {e.lineno}: {e.msg}") from None
    load_adapter(model, folder)
    model.to(device)
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    opt_state = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = t.cpu() if name == "step" else t
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved.pop("param_groups")})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.") and ".rank" not in k]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if f"cpu.rank{rank}" in rng:                     # a data-parallel run: this rank's own streams
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], device)
    saved.pop("config", None)
    return saved


class StopOnSigterm:
    """Within `with`, SIGTERM only sets `.requested`; the training loop checks it after each optimizer
    step, checkpoints and stops, instead of dying mid-step and losing the steps since the last
    --save-every checkpoint. A second SIGTERM, or any other signal, acts as before.

    Single-process runs only (`active=False` under torchrun): every rank would have to stop at the
    same step, which needs a collective each step; there the signal keeps its default action and the
    last checkpoint resumes the run. Signal handlers can only be set from the main thread."""

    def __init__(self, active: bool = True):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested, self._previous = False, None

    def _handler(self, signum, frame):
        if self.requested:                                  # asked twice: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.requested = True

    def __enter__(self):
        if self.active:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self._previous)
        return False
