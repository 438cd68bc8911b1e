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
"""

import argparse
import dataclasses
import math
import re

from nanogdrt.files import OutputError
from nanogdrt.infra import run_folder

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


def check_config(config):
    """Check every field of the dataclass `config` against its metadata range; raise
    ArgumentError naming the first bad flag and its allowed range."""
    for f in dataclasses.fields(config):
        bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata and k != "pattern"}
        value = getattr(config, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            why = problem(v, **bounds) if bounds or isinstance(v, float) else None
            pattern = f.metadata.get("pattern")
            if pattern and isinstance(v, str) and not re.fullmatch(pattern, v):
                why = f"expected {pattern.replace('|', ' | ')}"
            if why:
                raise ArgumentError(f"{flag(f.name)} {v}: {why}")
    return config


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
