"""The house's layers, enforced: every import in the repository, walked with `ast` (imports inside
functions included, so a circle cannot hide in one).

    core         nanogdrt/*.py             imports only the core (and third-party libraries)
    baselines    nanogdrt/baselines/       the core, the other rooms of the package
    analysis     nanogdrt/analysis/        the core, the other rooms of the package
    infra        nanogdrt/infra/           the core, the other rooms of the package
    scripts      train.py, recommend.py    the package
    experiments  experiments/<harness>/    the package, and lower layers of its own harness
    tools        tools/                    the package only
    bench        bench/                    the package and tests/references.py (the reference it times)
    tutorials    tutorials/*.ipynb         the package only (and their own exercises/ folder)

No module imports itself back through any chain (no circles), nothing imports train.py or
recommend.py (they are run), and nothing edits `sys.path`.
"""

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIX = Path(sys.prefix).resolve()              # the virtual environment (it may lie inside ROOT)
ROOMS = ("baselines", "analysis", "infra")
# Within a harness, each module may import only the modules listed before it (bottom first).
HARNESS_LAYERS = {
    "experiments.repro": [f"experiments.repro.{m}" for m in
                          ("rows", "data", "primary", "robust", "normaliser", "figures", "report", "plan", "runner",
                           "__main__")],
    "experiments.controlled": [f"experiments.controlled.{m}" for m in
                               ("settings", "rules", "measures", "summary", "report", "plan", "runner", "__main__")],
    "experiments.gpu": [f"experiments.gpu.{m}" for m in ("transfer", "plan", "report", "protocol", "__main__",
                                                         "device_check")],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files() -> list[Path]:
    roots = ["nanogdrt", "experiments", "tools", "bench"]
    files = [p for r in roots for p in (ROOT / r).rglob("*.py")]
    return sorted(files + [ROOT / "train.py", ROOT / "recommend.py"])


def resolve(module: str, name: str | None, known: set[str]) -> str:
    """`from module import name` -> the module imported: module.name when that is a module."""
    return f"{module}.{name}" if name and f"{module}.{name}" in known else module


def imports_of(source: str, known: set[str], package: str = "") -> set[str]:
    """Every first-party module a source imports, at any depth of its syntax tree."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:                                    # relative: from the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found |= {resolve(module, a.name, known) for a in node.names}
    first_party = ("nanogdrt", "experiments", "tools", "bench", "tests", "train", "recommend")
    return {m for m in found if m.split(".")[0] in first_party}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = python_files()
    known = {module_name(p) for p in files} | {"tests.references"}
    out = {}
    for p in files:
        name = module_name(p)
        package = name if p.name == "__init__.py" else name.rpartition(".")[0]
        out[name] = imports_of(p.read_text(), known, package)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "nanogdrt":
        return parts[1] if len(parts) > 2 and parts[1] in ROOMS else "core"
    return {"train": "scripts", "recommend": "scripts"}.get(parts[0], parts[0])


def test_the_walker_sees_imports_inside_functions_and_resolves_modules():
    src = "from nanogdrt import loss, metrics as m\ndef f():\n    from nanogdrt.baselines import d3\n    import tools.x\n"
    known = {"nanogdrt.loss", "nanogdrt.metrics", "nanogdrt.baselines.d3", "tools.x"}
    assert imports_of(src, known) == {"nanogdrt.loss", "nanogdrt.metrics", "nanogdrt.baselines.d3", "tools.x"}


def test_the_core_imports_only_the_core(graph):
    bad = {(m, d) for m, deps in graph.items() if room(m) == "core"
           for d in deps if room(d) != "core" and d != "nanogdrt"}
    assert not bad, f"core modules importing outside the core: {sorted(bad)}"


def test_the_package_never_imports_the_harness_tools_or_scripts(graph):
    bad = {(m, d) for m, deps in graph.items() if m.startswith("nanogdrt")
           for d in deps if not d.startswith("nanogdrt")}
    assert not bad, sorted(bad)


def test_nothing_imports_the_scripts_tools_or_another_harness(graph):
    bad = set()
    for m, deps in graph.items():
        for d in deps:
            if room(d) == "scripts":                                  # train.py / recommend.py are run
                bad.add((m, d))
            if room(d) == "tools" and room(m) != "tools":
                bad.add((m, d))
            if room(d) == "experiments" and room(m) != "experiments":
                bad.add((m, d))
            if room(m) == "tools" and room(d) not in ("core", *ROOMS, "tools") and not d.startswith("nanogdrt"):
                bad.add((m, d))
            if room(m) == "bench" and room(d) not in ("core", *ROOMS, "bench") and d != "tests.references":
                bad.add((m, d))
    assert not bad, sorted(bad)


def harness_of(module: str) -> str | None:
    return next((h for h in HARNESS_LAYERS if module == h or module.startswith(h + ".")), None)


def test_each_harness_imports_only_downward(graph):
    for harness, order in HARNESS_LAYERS.items():
        members = sorted(m for m in graph if harness_of(m) == harness and m != harness)
        assert members, f"{harness}: no modules found"
        assert set(order) == set(members), f"{harness}: layer list {order} != modules {members}"
        rank = {m: i for i, m in enumerate(order)}
        for m in members:
            for d in graph[m]:
                if harness_of(d) == harness and d != harness:
                    assert rank[d] < rank[m], f"{m} imports {d}, which is not below it in {harness}"
                assert harness_of(d) in (None, harness), f"{m} imports another harness: {d}"


def test_no_import_circles(graph):
    """Depth-first search over the whole graph; a back edge is a circle (reported as its path)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph or d == m:
                continue
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def notebook_sources() -> dict[str, str]:
    out = {}
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        out[nb.name] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return out


def top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_tutorials_import_only_the_package():
    """A notebook imports nanogdrt, its own exercises/solutions, and installed libraries: any other
    name would come from a folder of this repository (the harness, a tool) or a sys.path trick."""
    for name, source in notebook_sources().items():
        lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        for top in top_level_imports("\n".join(lines)) - {"nanogdrt", "exercises", "solutions"}:
            spec = importlib.util.find_spec(top)
            located = spec is not None and spec.has_location and spec.origin   # not "built-in" / "frozen"
            origin = Path(spec.origin).resolve() if located else None
            inside_repo = origin is not None and ROOT in origin.parents and PREFIX not in origin.parents
            installed = spec is not None and not inside_repo
            assert installed, f"{name} imports {top!r}, which is not the package or an installed library"


def test_nothing_edits_sys_path():
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in python_files()}
    sources |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "tests").glob("*.py") if p.name != "test_layers.py"}
    sources |= notebook_sources()
    bad = [name for name, src in sources.items() if "sys.path" in src]
    assert not bad, f"sys.path edited in {bad}"
