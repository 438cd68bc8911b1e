"""Argument checks, run once at start-up before any data, model or file work.

A flag's allowed range is declared once, beside the flag: `option(8, "...", min=1)` in train.py's
RunConfig, or `type=validate.number(int, min=1)` in an argparse CLI. `check_config` walks a
dataclass's fields and their `min` / `max` / `above` metadata; `number` is the same check as an
argparse type, so argparse's own error names the flag. Either way the message reads
"--beams 0: must be >= 1", i.e. the flag, the value and the allowed range, and nothing has run.

Rules: 0 means 0 where that makes sense (`--weight-decay 0`, `--lora-dropout 0`); a count that
would make the run empty or undefined (0 epochs, 0 beams, a batch of 0) is refused, never
replaced by a default. Floats must be finite (`--lr nan` is refused). A string field may declare a `pattern` (a full
regular-expression match), e.g. `--device`.

Some values are checked against the machine or the disk, still before any work: `--device` must
name a device this machine has (`device_problem`), `--assistant` a SASRec run folder
(nanogdrt.baselines.d3.assistant_problem), and `--lora-targets` / `--lora-r` must fit the layers that the model's
config.json declares (`check_lora`: a meta-device model, no weights read). `--k` is checked against
`--beams` (`check_cutoffs`: a cut-off past the list's length would only repeat a shorter one). `check_config` runs the
device check on a `device` field (CHECKS) and any other given to it; argparse CLIs use `device`
and `checked(problem)` as `type=`.
"""

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from nanogdrt.files import OutputError
from nanogdrt.infra import run_folder
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.lora import find_targets

RANGE_KEYS = ("min", "max", "above", "below", "pattern")
DEVICE = r"cpu|mps|cuda(:[0-9]+)?"                      # what `--device` may name


class ArgumentError(ValueError):
    """A command-line value outside its declared range; the message names the flag."""


def describe(min=None, max=None, above=None, below=None) -> str:
    """The allowed range in words: ">= 1", "> 0", ">= 0 and < 1"."""
    lower = f">= {min}" if min is not None else (f"> {above}" if above is not None else None)
    upper = f"<= {max}" if max is not None else (f"< {below}" if below is not None else None)
    return " and ".join(b for b in (lower, upper) if b) or "any value"


def problem(value, min=None, max=None, above=None, below=None) -> str | None:
    """Why `value` is outside the range (None when inside, or when it is None: "not set")."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    outside = ((min is not None and value < min) or (max is not None and value > max)
               or (above is not None and value <= above) or (below is not None and value >= below))
    return f"must be {describe(min, max, above, below)}" if outside else None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def device_problem(name) -> str | None:
    """Why `--device name` cannot run here (None when it can): CUDA or MPS absent, or a CUDA index
    past the last GPU. Asked before any work, instead of an AssertionError or a long traceback
    from the first tensor moved there."""
    if name is None or name == "cpu":
        return None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (this torch has no GPU, or sees none): use --device cpu"
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    if name == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available on this machine: use --device cpu"
    return None


# Fields checked against the machine or the disk, beyond their declared range.
CHECKS = {"device": device_problem}


def check_config(config, checks=None):
    """Check every field of the dataclass `config` against its metadata range, CHECKS and
    `checks` (field name -> problem function, e.g. d3.assistant_problem, which lives beside the
    code that reads the folder); raise ArgumentError naming the first bad flag and why."""
    checks = {**CHECKS, **(checks or {})}
    for f in dataclasses.fields(config):
        bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata and k != "pattern"}
        value = getattr(config, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            why = problem(v, **bounds) if bounds or isinstance(v, float) else None
            pattern = f.metadata.get("pattern")
            if pattern and isinstance(v, str) and not re.fullmatch(pattern, v):
                why = f"expected {pattern.replace('|', ' | ')}"
            if not why and f.name in checks:
                why = checks[f.name](v)
            if why:   # a switch is named alone: "--tensorboard: ...", not "--tensorboard True: ..."
                raise ArgumentError(f"{flag(f.name)}{'' if isinstance(v, bool) else f' {v}'}: {why}")
    return config


# The cut-offs of the paper's tables: train.py selects on NDCG@5 and prints @5 and @10.
STANDARD_CUTOFFS = (5, 10)


def check_cutoffs(ks, beams, required=()) -> None:
    """--k against --beams: a list holds at most --beams items, so @K past it would only repeat
    @beams. Raise ArgumentError when a `required` cut-off is missing or any other K exceeds
    --beams; a standard one (5, 10) past --beams is kept as before, with `cutoff_warning`."""
    missing = [k for k in required if k not in ks]
    if missing:
        raise ArgumentError(f"--k {' '.join(map(str, ks))}: must include {' and '.join(map(str, missing))} "
                            f"(validation selects on NDCG@5; the results table shows @5 and @10)")
    over = [k for k in ks if k > beams and k not in STANDARD_CUTOFFS]
    if over:
        raise ArgumentError(f"--k {max(over)}: above --beams {beams}: the lists hold at most {beams} items, so "
                            f"@{max(over)} would repeat @{beams}; use --beams >= {max(over)}")


def cutoff_warning(ks, beams) -> str | None:
    """One line when a standard cut-off exceeds --beams (e.g. --beams 4): it is computed as it always
    was, on the lists of at most --beams items."""
    short = [k for k in ks if k > beams]
    if not short:
        return None
    return (f"warning: --beams {beams}: the lists hold at most {beams} items, so "
            f"{', '.join(f'@{k}' for k in short)} count only the top {beams} (--beams >= {max(short)} for all of them)")


def checked(problem_of):
    """An argparse `type=` from a problem function: the value, or argparse's one-line error."""
    def parse(text):
        why = problem_of(text)
        if why:
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return text
    return parse


device = checked(lambda name: (None if re.fullmatch(DEVICE, name) else f"expected {DEVICE.replace('|', ' | ')}")
                  or device_problem(name))


def check_lora(model_dir, targets, r):
    """--lora-targets and --lora-r against the layers that `model_dir`/config.json declares,
    before any data, weights or relevance scores are read: the model is built on the meta device
    (shapes only). Every target must name a linear layer, and r may not exceed the smaller side
    of any targeted layer (B A has rank at most that: a larger r only adds parameters, and its
    alpha / r scale shrinks the update). A folder without config.json is left to the loader."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return
    try:
        config = LlamaConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file))
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    with torch.device("meta"):
        model = Llama(config)
    try:
        layers = find_targets(model, targets)
    except ValueError as e:
        raise ArgumentError(f"--lora-targets {' '.join(targets)}: {e} ({config_file})") from None
    name, layer = min(layers.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    width = min(layer.in_features, layer.out_features)
    if r > width:
        raise ArgumentError(f"--lora-r {r}: above the width of {name} ({layer.in_features} -> "
                            f"{layer.out_features}), so the rank of B A is at most {width}: use --lora-r <= {width}")


def number(kind=int, min=None, max=None, above=None, below=None):
    """An argparse `type=` that parses `kind` and checks the range; argparse prefixes the flag:
    "argument --users: 0: must be >= 1"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'an integer' if kind is int else 'a number'} "
                                             f"{describe(min, max, above, below)}") from None
        why = problem(value, min, max, above, below)
        if why:
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return value
    parse.__name__ = kind.__name__              # argparse's "invalid <name> value" fallback
    return parse


def check_output(parser: argparse.ArgumentParser, path, kind: str):
    """A CLI's --out, checked writable as a `kind` ("file" or "folder") right after parsing:
    a problem ends the command with argparse's one-line usage error, before any work."""
    try:
        run_folder.check_writable(path, kind)
    except OutputError as e:
        parser.error(str(e))
