"""Execute the tutorial notebooks, in place, so that they are committed with their outputs.

Each notebook runs with tutorials/ as its working directory (as in Jupyter) under a budget of
BUDGET_S seconds; any error, a failed `assert` included, stops it. Fixed seeds are the notebooks'
job; this script removes what changes from run to run without the code changing (execution
timestamps, the kernel's Python version), so re-running an unchanged notebook gives a small diff.
A notebook is written atomically, and only if it ran to the end and weighs under MAX_BYTES.

    python -m tools.execute_tutorials               # every notebook, in place (= make tutorials)
    python -m tools.execute_tutorials 01 04         # only these
    python -m tools.execute_tutorials --check       # run in memory, write nothing (CI's check)
"""

import argparse
import sys
import time
from pathlib import Path

import nbclient
import nbformat

from nanogdrt.files import atomic_path

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
BUDGET_S = 300          # per notebook; each takes well under 2 minutes on 2 CPU cores
MAX_BYTES = 1_000_000   # a committed notebook, plots included


def notebooks(numbers=()) -> list[Path]:
    """tutorials/NN_*.ipynb in reading order; `numbers` ("01", "4"...) selects some."""
    found = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
    if not numbers:
        return found
    wanted = {f"{int(n):02d}" for n in numbers}
    chosen = [p for p in found if p.name[:2] in wanted]
    missing = wanted - {p.name[:2] for p in chosen}
    if missing:
        raise SystemExit(f"no notebook numbered {sorted(missing)} in {TUTORIALS}")
    return chosen


def execute(path: Path, budget_s: float = BUDGET_S):
    """Run one notebook top to bottom in memory; return (notebook with outputs, seconds).

    Raises nbclient's CellExecutionError (with the cell's traceback) on any error, and
    TimeoutError past the budget (the per-cell timeout is what is left of it)."""
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + budget_s

    def remaining(cell):
        return max(1, int(deadline - time.monotonic()))

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout_func=remaining,
                                     record_timing=False,  # no per-cell timestamps in the file
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    if elapsed > budget_s:
        raise TimeoutError(f"{path.name} took {elapsed:.0f} s (budget {budget_s:.0f} s)")
    return nb, elapsed


def strip_volatile(nb) -> None:
    """Remove what differs between two runs of the same code on two machines."""
    nb.metadata["language_info"] = {"name": "python"}   # the kernel adds its exact Python version
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)             # timestamps, if a client recorded them
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)


def write(nb, path: Path) -> int:
    """Write the executed notebook atomically; refuse one over MAX_BYTES. Returns its size."""
    text = nbformat.writes(nb) + "\n"
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise ValueError(f"{path.name}: {size:,} bytes with outputs, over the {MAX_BYTES:,} limit "
                         f"(smaller figures, fewer printed rows); not written")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("numbers", nargs="*", help="notebook numbers to run (default: all)")
    parser.add_argument("--check", action="store_true", help="execute in memory, write nothing")
    args = parser.parse_args(argv)

    failed = []
    for path in notebooks(args.numbers):
        try:
            nb, elapsed = execute(path)
            strip_volatile(nb)
            note = "ran" if args.check else f"written, {write(nb, path) / 1e3:.0f} kB"
            print(f"{path.name}: {elapsed:.0f} s, {note}")
        except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.DeadKernelError,
                TimeoutError, ValueError) as e:
            print(f"{path.name}: FAILED\n{e}", file=sys.stderr)
            failed.append(path.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
