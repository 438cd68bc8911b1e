"""Training logs: one JSON line per optimizer step in <out>/steps.jsonl, and with --tensorboard the
same numbers as TensorBoard scalars in <out> (`tensorboard --logdir runs/NAME`, or `--logdir runs`
to see every run side by side).

A line is the step's record in results.json's "steps", as train.py logs it (step, loss, group_loss
= L(g) of every group; q = Q(g), only for methods that weight groups), plus what only a live log
needs:

    epoch          1-based, as results.json's "epochs"
    lr             the optimizer's learning rate at the step
    tokens         the step's non-padding tokens (prompt + target) over every micro-batch and rank
    tokens_per_s   tokens / the step's wall time (forward, backward, clip, optimizer step)
    elapsed_s      training and validation seconds of the whole run (a resumed run's earlier
                   processes included, as results.json's train_and_valid_s)

Nothing here computes or changes a number that training uses: it reads the record, the batch
indices and the optimizer. Lines are appended and flushed one step at a time, so `tail -f` follows
a run and a crash keeps every step it logged. A resumed run continues the file: it first drops the
lines past its checkpoint's step (steps it repeats, and a line cut short by a crash), so every
step appears once, in order. TensorBoard's events are purged past the same step (SummaryWriter's
`purge_step`). Only rank 0 of a torchrun writes.

TensorBoard is an optional extra (`pip install -e ".[tensorboard]"`); `tensorboard_problem` is the
start-up check of --tensorboard (nanogdrt/infra/config.py).
"""

import json
import math
from pathlib import Path

from nanogdrt import files

FILE = "steps.jsonl"
EXTRA = 'pip install -e ".[tensorboard]"'


def tensorboard_problem(on: bool) -> str | None:
    """Why --tensorboard cannot run here (None when it can, or when it is off)."""
    if not on:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter   # noqa: F401 (imports the tensorboard package)
    except ImportError:
        return f"needs the tensorboard package, an optional extra: {EXTRA}"
    return None


def kept_lines(path: Path, last_step: int) -> list[str]:
    """The lines of an existing log up to `last_step` (the checkpoint's): steps past it are run
    again by the resumed run, and a line that does not parse was cut short by a crash."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return kept


class StepLog:
    """<out>/steps.jsonl (and TensorBoard's events) from optimizer step `last_step` + 1 on; the
    lines of steps 1..last_step are kept. `with_q`: the method weights groups (Q is logged)."""

    def __init__(self, out, last_step: int, examples, optimizer, with_q: bool, tensorboard: bool, active=True):
        self.out, self.last_step, self.examples, self.optimizer = Path(out), last_step, examples, optimizer
        self.with_q, self.tensorboard, self.active = with_q, tensorboard, active
        self._file, self._writer = None, None

    def __enter__(self):
        if self.active:
            path = self.out / FILE
            # Atomic: a crash while it is rewritten leaves the old file.
            files.write_text(path, "".join(kept_lines(path, self.last_step)))
            self._file = open(path, "a", encoding="utf-8")
        return self

    def line(self, record: dict, epoch: int, micro_batches, step_s: float, elapsed_s: float) -> dict:
        """What steps.jsonl holds for one step: `record` (results.json's) and the extras above."""
        tokens = sum(len(self.examples[i].ids) for batch in micro_batches for i in batch)
        out = {"step": record["step"], "epoch": epoch, "loss": record["loss"], "group_loss": record["group_loss"]}
        if self.with_q:
            out["q"] = record["q"]
        return {**out, "lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens,
                "tokens_per_s": tokens / step_s if step_s > 0 else None, "elapsed_s": elapsed_s}

    def write(self, record: dict, epoch: int, micro_batches, step_s: float, elapsed_s: float):
        """Log one optimizer step (`micro_batches`: its global micro-batches of example indices)
        that took `step_s` seconds."""
        if not self.active:
            return
        line = self.line(record, epoch, micro_batches, step_s, elapsed_s)
        self._file.write(json.dumps(files.finite(line), allow_nan=False) + "\n")
        self._file.flush()
        if self.tensorboard:
            self.scalars(line)

    def scalars(self, line: dict):
        """Every number of the line but the step, under train/ (L(g) and Q(g) one tag per group)."""
        if self._writer is None:       # opened at the first step: a resumed run that only tests adds no file
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out), purge_step=self.last_step + 1 if self.last_step else None)
        for name, value in line.items():
            values = value if isinstance(value, list) else [value]
            for g, v in enumerate(values, 1):
                if name != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"train/{name}/g{g}" if isinstance(value, list) else f"train/{name}"
                    self._writer.add_scalar(tag, v, line["step"])

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        return False
