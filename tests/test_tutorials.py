"""The tutorials run top to bottom: every notebook in tutorials/ is executed with nbclient.

A notebook fails on any error, including a failed `assert` (each cell ends in asserts that check
what it teaches), and on running past its time budget. Notebooks run with tutorials/ as the
working directory, so their relative paths (`..` for train.py, `_out/` for their outputs,
`../../shared/data/toy`, `exercises.nbNN`) resolve as they do in Jupyter.

Notebooks are committed executed, with their outputs (`make tutorials` rewrites them); this file
executes them in memory only, never writing them back, and does not compare outputs (plots and
timings may differ by machine). It checks that what is committed is small and error-free.

    .venv/bin/python -m pytest -q tests/test_tutorials.py        # or: make tutorials-check
"""

import json

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
from tools.execute_tutorials import MAX_BYTES, TUTORIALS, execute, notebooks  # noqa: E402

NOTEBOOKS = notebooks()


def test_all_six_notebooks_exist_and_are_listed_in_the_readme():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    readme = (TUTORIALS / "README.md").read_text()
    for p in NOTEBOOKS:
        assert p.name in readme, f"{p.name} is missing from tutorials/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_small_and_has_no_errors(path):
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name}: {size:,} bytes (limit {MAX_BYTES:,}): shrink its figures"
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", \
                f"{path.name}, cell {i}: committed with an error ({out.get('ename')}); re-run make tutorials"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    execute(path)  # raises on any cell error and past the budget; the file is not touched
