"""The tutorials' exercises: every reference solution passes its check, and the checks catch errors.

Notebook NN ends with 2-3 exercises. `tutorials/exercises/nbNN.py` holds `check_<name>(fn)`,
which returns True for a right `fn`, False (after printing "<name>: not attempted yet") for the
notebook's stub that raises NotImplementedError, and raises AssertionError for a wrong one;
`tutorials/solutions/nbNN.py` holds `<name>`, the reference. This file checks all four
behaviours (a wrong function is built by perturbing the solution's output, see `perturb`) and
that notebook NN calls each of its checks. Notebooks still without exercises are listed in PENDING.
"""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def _package(name: str):
    """tutorials/<name>/ imported as the top-level package `name`, as the notebooks see it (they run
    in tutorials/, where `exercises.nbNN` resolves), loaded from its folder by file location."""
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / name / "__init__.py",
                                                  submodule_search_locations=[str(TUTORIALS / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


for _name in ("exercises", "solutions"):
    _package(_name)

NUMBERS = ["01", "02", "03", "04", "05", "06"]
PENDING = set()  # notebooks whose exercises are not written yet

# Explicit wrong answers, "NN.name" -> fn, for solutions whose output `perturb` cannot alter
# meaningfully; none so far.
WRONG = {}


def public_functions(module) -> dict:
    return {n: f for n, f in vars(module).items()
            if callable(f) and not n.startswith("_") and getattr(f, "__module__", None) == module.__name__}


def exercises(nn: str) -> list[tuple[str, str]]:
    return [(nn, name) for name in public_functions(importlib.import_module(f"solutions.nb{nn}"))]


DONE = [nn for nn in NUMBERS if nn not in PENDING]
# (missing solution files are reported by test_pending_is_up_to_date, not as a collection error)
CASES = [case for nn in DONE if (TUTORIALS / "solutions" / f"nb{nn}.py").exists() for case in exercises(nn)]


def solution_and_check(nn: str, name: str):
    solution = getattr(importlib.import_module(f"solutions.nb{nn}"), name)
    check = getattr(importlib.import_module(f"exercises.nb{nn}"), f"check_{name}", None)
    assert check is not None, f"tutorials/exercises/nb{nn}.py has no check_{name}"
    return solution, check


def perturb(value):
    """A wrong answer of the same type and shape: off by a little, or flipped."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return ~value
        if value.is_floating_point() or value.is_complex():
            return value + 0.1 * (1 + value.abs())
        return value + 1
    if isinstance(value, np.ndarray):
        return ~value if value.dtype == bool else value + 0.1 * (1 + np.abs(value))
    if isinstance(value, (bool, np.bool_)):
        return not value
    if isinstance(value, (int, np.integer)):
        return value + 1
    if isinstance(value, (float, np.floating)):
        return value + 0.1 * (1 + abs(value))
    if isinstance(value, (tuple, list)):
        return type(value)(perturb(v) for v in value)
    if isinstance(value, dict):
        return {k: perturb(v) for k, v in value.items()}
    raise TypeError(f"cannot perturb a {type(value).__name__}: add an explicit wrong answer to WRONG")


def test_pending_is_up_to_date():
    for nn in NUMBERS:
        has = (TUTORIALS / "solutions" / f"nb{nn}.py").exists()
        if nn in PENDING:
            assert not has, f"notebook {nn} has exercises now: remove {nn!r} from PENDING"
        else:
            assert has, f"tutorials/solutions/nb{nn}.py is missing (or add {nn!r} to PENDING)"


@pytest.mark.parametrize("nn", DONE)
def test_notebook_has_two_or_three_exercises_and_calls_each_check(nn):
    names = [name for _, name in exercises(nn)]
    assert 2 <= len(names) <= 3, f"notebook {nn}: {len(names)} exercises ({names}), expected 2-3"
    checks = {n for n in public_functions(importlib.import_module(f"exercises.nb{nn}")) if n.startswith("check_")}
    assert checks == {f"check_{n}" for n in names}, f"nb{nn}: checks {sorted(checks)} vs solutions {names}"
    (path,) = TUTORIALS.glob(f"{nn}_*.ipynb")
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for name in names:
        assert any(f"check_{name}(" in src for src in code), f"{path.name} never calls check_{name}("
    source = (TUTORIALS / "exercises" / f"nb{nn}.py").read_text()
    assert "solutions" not in source, f"exercises/nb{nn}.py must not use the solution (an independent check)"


@pytest.mark.parametrize("nn,name", CASES, ids=[f"{nn}.{n}" for nn, n in CASES])
def test_solution_passes_its_check(nn, name, capsys):
    solution, check = solution_and_check(nn, name)
    assert check(solution) is True
    assert f"{name}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("nn,name", CASES, ids=[f"{nn}.{n}" for nn, n in CASES])
def test_stub_is_not_attempted_yet(nn, name, capsys):
    _, check = solution_and_check(nn, name)

    def stub(*args, **kwargs):
        raise NotImplementedError  # your code here

    assert check(stub) is False
    assert f"{name}: not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize("nn,name", CASES, ids=[f"{nn}.{n}" for nn, n in CASES])
def test_wrong_answer_fails_with_a_hint(nn, name):
    solution, check = solution_and_check(nn, name)

    def wrong(*args, **kwargs):
        return perturb(solution(*args, **kwargs))

    with pytest.raises(AssertionError) as info:
        check(WRONG.get(f"{nn}.{name}", wrong))
    assert str(info.value).strip(), "a failed check must say what is wrong"
