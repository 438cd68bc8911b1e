"""Files a run writes: atomic outputs, strict JSON, writability checks up front, one run per folder.

Every writer goes through `atomic_path`: the bytes go to a temporary file beside the target,
which is renamed onto it (`os.replace`, atomic within one file system) only once it is complete.
A crash or a full disk mid-write leaves the previous file (or none), never a truncated one that a
later `--resume`, a cache lookup or an analysis would read as if it were whole. Figures too
(`plots` saves through it), so a kill never leaves a 0-byte PNG.

JSON is strict: NaN and +-Infinity (not JSON, though Python writes them) are written as null.

`check_writable` runs before any work, so a read-only or mistyped `--out` costs one line at
start-up instead of a traceback after training. `RunLock` keeps a second run out of a run folder.
"""

import json
import math
import os
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class OutputError(ValueError):
    """An output path that cannot be written; the message names the path and why."""


@contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds.

    The temporary file lies in the same folder (a rename across file systems is not atomic) and
    is readable like any other output (mkstemp makes it private to the owner). On any failure,
    the rename included (e.g. `target` is a folder), the temporary file is removed."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        yield tmp
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


# ----------------------------------------------------------------------------- checks up front

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path, kind: str, flag: str = "--out"):
    """Raise OutputError (one line: flag, path, why) unless `path` can be written as a `kind`
    ("file" or "folder"). Creates nothing: a missing path is judged by its nearest existing parent."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a folder")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder, expected a file path")
    base = path if path.is_dir() else _nearest_existing(path.parent if kind == "file" else path)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is not a folder")
    # os.access asks the kernel with the real uid; W needs X too to create entries in a folder.
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: folder {base} is not writable")
    if kind == "file" and path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise OutputError(f"{flag} {path}: file is not writable")


# ----------------------------------------------------------------------------- one run per folder

class RunLock:
    """An exclusive lock on a run folder for the life of the process: `<folder>/.lock`, holding
    the owner's pid, locked with fcntl.flock.

    The kernel drops a flock when its process ends, however it ends (exit, crash, kill -9), so a
    lock file left by a dead run is stale by construction and the next run takes it. The file
    itself is left in place (deleting it while another process waits on it would let two runs
    hold locks on two different files). A second run is refused at once with the holder's pid.
    flock is advisory and local: it does not guard a folder shared over NFS between machines.
    Where fcntl does not exist (Windows) no lock is taken and a warning says so.

    One process holds at most one lock per folder: acquiring a folder this process already holds
    (e.g. train.main called again in the same process after a failed run) takes the lock over."""

    _held = weakref.WeakValueDictionary()                   # resolved folder -> its RunLock, this process

    def __init__(self, folder):
        self.folder, self._file = Path(folder), None

    def acquire(self):
        try:
            import fcntl
        except ImportError:
            print(f"warning: no fcntl on this OS: {self.folder} is not locked against a second run")
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        previous = RunLock._held.get(key)
        if previous is not None:                            # ours already: hand it over
            previous.release()
        f = open(self.folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise OutputError(f"{self.folder}: in use by another run (pid {holder}); wait for it to end "
                              f"or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        RunLock._held[key] = self
        return self

    def release(self):
        if self._file is not None:
            self._file.close()                              # closing drops the flock
            self._file = None

    __del__ = release                                       # a lock object dropped is a lock released

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
