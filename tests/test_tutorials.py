"""The tutorials run top to bottom: every notebook in tutorials/ is executed with nbclient.

A notebook fails on any error, including a failed `assert` (each cell ends in asserts that check
what it teaches), and on running past its time budget. Notebooks run with tutorials/ as the
working directory, so their relative paths (`..` for train.py, `_out/` for their outputs,
`../../shared/data/toy`) resolve as they do in Jupyter. Committed notebooks carry no outputs.

    .venv/bin/python -m pytest -q tests/test_tutorials.py        # or: make tutorials
"""

import json
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
BUDGET_S = 300  # per notebook; each takes well under 2 minutes on 2 CPU cores


def test_all_six_notebooks_exist_and_are_listed_in_the_readme():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    readme = (TUTORIALS / "README.md").read_text()
    for p in NOTEBOOKS:
        assert p.name in readme, f"{p.name} is missing from tutorials/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                f"{path.name}, cell {i}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + BUDGET_S

    def remaining(cell):  # per-cell timeout = what is left of the notebook's budget
        return max(1, int(deadline - time.monotonic()))

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout_func=remaining,
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError (with the traceback) on any error
    elapsed = time.monotonic() - start
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s)"
