"""Files the toolkit writes: atomic outputs and strict JSON.

Every writer goes through `atomic_path`: the bytes go to a temporary file beside the target,
which is renamed onto it (`os.replace`, atomic within one file system) only once it is complete.
A crash or a full disk mid-write leaves the previous file (or none), never a truncated one that a
later `--resume`, a cache lookup or an analysis would read as if it were whole. Figures too
(`plots` saves through it), so a kill never leaves a 0-byte PNG.

JSON is strict: NaN and +-Infinity (not JSON, though Python writes them) are written as null.

The checks made before a run writes anything (`check_writable`) and the one-run-per-folder lock
(`RunLock`) are plumbing: `nanogdrt.infra.run_folder`.
"""

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

class OutputError(ValueError):
    """An output path that cannot be written; the message names the path and why."""


@contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds.

    The temporary file lies in the same folder (a rename across file systems is not atomic) and
    is made readable like any other output before the rename. On any failure,
    the rename included (e.g. `target` is a folder), the temporary file is removed."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # Readable like any other output: mkstemp makes the file private to its owner, and a
        # writer that recreates it (safetensors' save_file) makes it private again.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(obj):
    """NaN / +-inf -> None, recursively through dicts, lists and tuples (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj, indent: int = 1):
    """Strict JSON: non-finite floats become null, so any JSON parser reads the file."""
    write_text(path, json.dumps(finite(obj), indent=indent, allow_nan=False))


def write_jsonl(path, records):
    """One strict JSON object per line, e.g. one line per test user."""
    write_text(path, "".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in records))
