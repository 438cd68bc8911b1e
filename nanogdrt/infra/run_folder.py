"""A run folder, checked and claimed before any work: writable, and held by one run at a time.

`check_writable` runs before any work, so a read-only or mistyped `--out` costs one line at
start-up instead of a traceback after training. `RunLock` keeps a second run out of a run folder.
"""

import os
import weakref
from pathlib import Path

from nanogdrt.files import OutputError

LOCK_NAME = ".lock"


# ----------------------------------------------------------------------------- checks up front

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path, kind: str, flag: str = "--out"):
    """Raise OutputError (one line: flag, path, why) unless `path` can be written as a `kind`
    ("file" or "folder"). Creates nothing: a missing path is judged by its nearest existing parent.
    An empty path is refused, not read as the current folder (Path("") is ".")."""
    if not str(path).strip():
        raise OutputError(f"{flag} {str(path)!r}: empty path (name a {kind})")
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
    lock file left by a dead run is stale by construction and the next run takes it. A second run
    is refused at once with the holder's pid.

    A run refused before it wrote anything leaves nothing behind: `release` removes the lock file
    when it is all the folder holds, and the folders `acquire` created. It does so while still
    holding the lock, and `acquire` checks that the file it locked is still the one at the path
    (else it retries), so a run that opened the file just before it was removed cannot hold a
    lock on a deleted file beside a run that holds the new one.
    flock is advisory and local: it does not guard a folder shared over NFS between machines.
    Where fcntl does not exist (Windows) no lock is taken and a warning says so.

    One process holds at most one lock per folder: acquiring a folder this process already holds
    (e.g. train.main called again in the same process after a failed run) takes the lock over."""

    _held = weakref.WeakValueDictionary()                   # resolved folder -> its RunLock, this process

    def __init__(self, folder):
        self.folder, self._file, self._created = Path(folder), None, []

    def acquire(self):
        try:
            import fcntl
        except ImportError:
            print(f"warning: no fcntl on this OS: {self.folder} is not locked against a second run")
            return self
        self._created = [p for p in (self.folder.absolute(), *self.folder.absolute().parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        previous = RunLock._held.get(key)
        if previous is not None:                            # ours already: hand it over
            self._created = previous._created
            previous.release(keep=True)
        while True:
            f = open(self.folder / LOCK_NAME, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise OutputError(f"{self.folder}: in use by another run (pid {holder}); wait for it to end "
                                  f"or choose another --out") from None
            try:
                if os.fstat(f.fileno()).st_ino == os.stat(self.folder / LOCK_NAME).st_ino:
                    break                                   # the file at the path: ours
            except FileNotFoundError:
                pass
            f.close()                                       # removed by a run releasing it: again
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        RunLock._held[key] = self
        return self

    def release(self, keep=False):
        """Drop the lock; unless `keep`, a folder left holding only the lock file is put back as
        it was (the lock file removed, and the folders acquire created)."""
        if self._file is None:
            return
        if not keep:
            try:
                if [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                    (self.folder / LOCK_NAME).unlink()      # still locked: no run can hold it
                    for folder in self._created:            # deepest first; stops at one not empty
                        folder.rmdir()
            except OSError:
                pass
        self._file.close()                                  # closing drops the flock
        self._file = None

    def __del__(self):                                      # a lock object dropped is a lock released
        try:
            self.release()
        except Exception:   # noqa: BLE001 (at interpreter exit, modules may already be torn down)
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
