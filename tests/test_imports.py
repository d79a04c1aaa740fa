"""Imports run one way: the package's module graph (every import, lazy and relative ones included,
read with ``ast``, nothing executed) has no cycle.

The package is hvae_fast/**.py plus kernels/*.py, which installs as ``hvae_fast.kernels``
(the ``hvae_fast/kernels`` symlink is skipped so its files are not counted twice).
"""

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "hvae_fast"
DYNAMIC = {"__import__", "import_module"}  # __import__(name), importlib.import_module(name)


def package_modules(repo: Path = REPO) -> dict:
    """{dotted module name: (path, is_package)} for the installed package's source files."""
    mods = {}

    def add(path: Path, parts: list):
        is_pkg = path.name == "__init__.py"
        name = ".".join(parts if is_pkg else parts + [path.stem])
        mods[name] = (path, is_pkg)

    for dirpath, dirnames, filenames in os.walk(repo / PACKAGE):  # does not follow the kernels symlink
        rel = Path(dirpath).relative_to(repo)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                add(Path(dirpath) / f, list(rel.parts))
    for f in sorted((repo / "kernels").glob("*.py")):
        add(f, [PACKAGE, "kernels"])
    return mods


def _strings_bound_to(tree: ast.AST, name: str) -> list | None:
    """The string constants a ``for name in ("a", "b")`` loop binds ``name`` to, else None."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == name
                and isinstance(node.iter, (ast.Tuple, ast.List))
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts)):
            return [e.value for e in node.iter.elts]
    return None


def module_imports(name: str, source: str, is_pkg: bool, known) -> tuple[set, list]:
    """(package modules that ``name`` imports anywhere in ``source``, problems found).

    Problems: a dynamic import whose target cannot be read off the source, or an import of a
    package module that does not exist. Both would hide an edge of the graph, so they fail the test.
    """
    tree = ast.parse(source)
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    targets, problems = set(), []

    def want(mod, line):
        if mod == PACKAGE or mod.startswith(PACKAGE + "."):
            if mod in known:
                targets.add(mod)
            else:
                problems.append(f"{name}:{line} imports {mod}, which is not a module of the package")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                want(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                want(sub if sub in known else base, node.lineno)
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if fname not in DYNAMIC or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            else:
                names = _strings_bound_to(tree, arg.id) if isinstance(arg, ast.Name) else None
            if names is None:
                problems.append(f"{name}:{node.lineno} imports a module named at run time; name it in the source")
                continue
            for mod in names:
                want(mod, node.lineno)
    targets.discard(name)
    return targets, problems


def import_graph(mods: dict) -> tuple[dict, list]:
    """({module: sorted modules it imports}, problems) for ``package_modules()`` output."""
    graph, problems = {}, []
    for name, (path, is_pkg) in mods.items():
        targets, probs = module_imports(name, path.read_text(), is_pkg, mods)
        graph[name] = sorted(targets)
        problems += probs
    return graph, problems


def find_cycle(graph: dict) -> list | None:
    """One import cycle as [a, b, ..., a], or None if ``graph`` ({node: [nodes]}) is acyclic."""
    state = {}  # node -> 1 on the DFS stack, 2 done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


# ----------------------------------------------------------------------------------------------

def test_package_has_no_import_cycle():
    mods = package_modules()
    assert {"hvae_fast.ops.ou", "hvae_fast.models.model", "hvae_fast.kernels.backend"} <= set(mods)
    graph, problems = import_graph(mods)
    assert not problems, "\n".join(problems)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_lazy_relative_and_dynamic_imports():
    """The real graph holds the edges that are easy to miss: each kind appears in the package."""
    graph, _ = import_graph(package_modules())
    assert "hvae_fast.errors" in graph["hvae_fast.kernels.backend"]  # absolute, from the kernels folder
    assert "hvae_fast.kernels.correlated_sample" in graph["hvae_fast.kernels.backend"]  # relative, in try
    assert "hvae_fast.training.trainer" in graph["hvae_fast.cli"]  # lazy, inside a function
    assert "hvae_fast.ops.native" in graph["hvae_fast.cli"]  # `from . import native`
    assert {"hvae_fast.kernels.backend", "hvae_fast.ops.native"} <= set(graph["hvae_fast.ops.ou"])  # __import__ loop


@pytest.mark.parametrize("graph, cycle", [
    ({"a": ["b"], "b": ["c"], "c": []}, None),
    ({"a": ["b", "c"], "b": ["c"], "c": []}, None),  # a diamond is not a cycle
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
    ({"a": ["a"]}, ["a", "a"]),
    ({"x": ["a"], "a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
])
def test_find_cycle_on_small_graphs(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_lazy_relative_cycle_in_a_synthetic_package_is_found(tmp_path):
    """Two modules that import each other, one lazily and relatively: the test must fail on it."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from .sub.base import Base\n")
    (pkg / "sub" / "base.py").write_text("def build():\n    from .. import model\n    return model\n")
    (tmp_path / "kernels" / "op.py").write_text("import hvae_fast.sub.base\n")
    mods = package_modules(tmp_path)
    assert set(mods) == {"hvae_fast", "hvae_fast.sub", "hvae_fast.model", "hvae_fast.sub.base", "hvae_fast.kernels.op"}
    graph, problems = import_graph(mods)
    assert problems == []
    assert graph["hvae_fast.kernels.op"] == ["hvae_fast.sub.base"]
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"hvae_fast.model", "hvae_fast.sub.base"}


def test_unreadable_dynamic_import_and_missing_module_are_problems():
    known = {"hvae_fast", "hvae_fast.ops.ou"}
    src = "import hvae_fast.nope\ndef f(m):\n    return __import__(m)\n"
    _, problems = module_imports("hvae_fast.ops.ou", src, False, known)
    assert len(problems) == 2
    assert "hvae_fast.nope" in problems[0] and "run time" in problems[1]


def test_the_model_rooms_import_only_downwards():
    """distributions and backends are the bottom; the model code never reaches the OU interface,
    the backends never reach it either (ou loads them), and nothing here reaches the trainer or CLI."""
    graph, _ = import_graph(package_modules())
    short = {m: {t.removeprefix("hvae_fast.") for t in ts} for m, ts in graph.items()}
    assert short["hvae_fast.distributions"] <= {"errors"}
    assert short["hvae_fast.ops.backends"] == {"errors"}
    assert short["hvae_fast.models.stack"] == {"config", "errors", "models.likelihoods", "models.nets"}
    # The OU smoothing helper both the stacked VAE and the ladders use; it reaches the backend record only.
    assert short["hvae_fast.models.smoothing"] == {"errors", "ops.backends"}
    assert short["hvae_fast.models.baselines"] == {"config", "distributions", "errors", "models.nets", "models.smoothing",
                                                   "models.stack"}
    assert short["hvae_fast.models.ladder"] == {"config", "distributions", "errors", "models.smoothing", "models.stack"}
    assert short["hvae_fast.models.model"] == {"models.baselines", "models.ladder", "config", "distributions", "errors",
                                               "models.smoothing", "models.stack"}
    assert short["hvae_fast.ops.ou"] == {"ops.autotune", "ops.backends", "distributions", "errors", "kernels.backend",
                                         "ops.native"}
    # ou hands it the candidate backends; fsutil writes its cache file
    assert short["hvae_fast.ops.autotune"] == {"errors", "fsutil", "ops.backends", "ops.native"}
    assert short["hvae_fast.fsutil"] == set()  # a leaf every layer may use (atomic writes, locks)
    assert short["hvae_fast.training.rho_control"] == {"errors"}
    # everything may use config: it uses nothing above but two leaf modules that import only errors
    assert short["hvae_fast.config"] <= {"ops.backends", "errors", "training.rho_control"}
    for backend in ("hvae_fast.ops.native", "hvae_fast.kernels.backend", "hvae_fast.kernels.correlated_sample",
                    "hvae_fast.kernels.gaussian_head"):
        assert not any(t == "ops.ou" or t.startswith("models") for t in short[backend]), backend


# The package's layers, bottom first: a module may import its own layer and the ones below, never
# one above. `config` may read two leaf modules above it (each imports only `errors`).
LAYERS = [
    ("foundation", {"hvae_fast", "hvae_fast.errors", "hvae_fast.config", "hvae_fast.distributions",
                    "hvae_fast.data", "hvae_fast.reporting"}),
    ("ops", {"hvae_fast.ops", "hvae_fast.kernels"}),
    ("models", {"hvae_fast.models"}),
    ("training", {"hvae_fast.training"}),
    ("experiments", {"hvae_fast.experiments"}),
    ("commands", {"hvae_fast.cli", "hvae_fast.gpucheck", "hvae_fast.__main__"}),
]
LAYER_EXCEPTIONS = {("hvae_fast.config", "hvae_fast.ops.backends"), ("hvae_fast.config", "hvae_fast.training.rho_control")}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module``'s room."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in tests/test_imports.py"
    return best


def upward_imports(graph: dict) -> list:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m, ts in graph.items() for t in ts
            if layer_of(t) > layer_of(m) and (m, t) not in LAYER_EXCEPTIONS]


def test_packages_import_only_downwards():
    """foundation <- ops (backends, kernels) <- models <- training <- experiments <- commands."""
    graph, _ = import_graph(package_modules())
    assert upward_imports(graph) == []


def test_an_upward_import_is_reported():
    graph = {"hvae_fast.models.model": ["hvae_fast.training.trainer"], "hvae_fast.training.trainer": []}
    assert upward_imports(graph) == ["hvae_fast.models.model (models) imports hvae_fast.training.trainer (training)"]


def test_the_reporting_room_formats_and_never_measures():
    """hvae_fast.reporting only formats, plots and writes: it imports errors and config and nothing that
    measures or trains; the measuring and command modules reach it, the other way round never."""
    graph, _ = import_graph(package_modules())
    short = {m: {t.removeprefix("hvae_fast.") for t in ts} for m, ts in graph.items()}
    rooms = {m for m in short if m.startswith("hvae_fast.reporting")}
    assert {"hvae_fast.reporting", "hvae_fast.reporting.memory_table", "hvae_fast.reporting.bench",
            "hvae_fast.reporting.curves"} <= rooms
    for m in rooms:
        outside = {t for t in short[m] if not t.startswith("reporting")}
        assert outside <= {"errors", "config"}, (m, outside)
    assert "reporting.memory_table" in short["hvae_fast.experiments.memory"]  # the paper's Table 6 lives with its table
    assert "reporting.curves" in short["hvae_fast.experiments.report"]
    assert {"reporting.bench", "reporting.memory_table"} <= short["hvae_fast.gpucheck"]
    assert not any(m.startswith("hvae_fast.benchreport") or m == "hvae_fast.plots" for m in short)
