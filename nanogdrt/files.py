"""Atomic file writes: an output appears complete or not at all.

Every writer goes through `atomic_path`: the bytes go to a temporary file beside the target,
which is renamed onto it (`os.replace`, atomic within one file system) only once it is complete.
A crash or a full disk mid-write leaves the previous file (or none), never a truncated one that a
later `--resume`, a cache lookup or an analysis would read as if it were whole.
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds.

    The temporary file lies in the same folder (a rename across file systems is not atomic) and
    is readable like any other output (mkstemp makes it private to the owner)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj, indent: int = 1, allow_nan: bool = True):
    """`allow_nan=False` for files other tools must parse as strict JSON (NaN is not JSON)."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan))


def write_jsonl(path, records):
    """One JSON object per line, e.g. one line per test user."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
