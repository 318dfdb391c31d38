"""Imports flow one way: data / models / svf → experts → routing, training, editors → evaluation → jobs → cli.

The package's imports are read with `ast`, function-local ones included; a cycle between modules, or an import of a
module from a later layer, fails. The checker itself is shown failing on a package that has both."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each module's layer; a module may import from its own layer or an earlier one, never a later one.
LAYERS = [
    ("t2edit.files", "t2edit.text", "t2edit.batching", "t2edit.precision", "t2edit.plots", "t2edit.tiny", "rewards",
     "t2edit.runs", "t2edit"),
    ("t2edit.data", "t2edit.models", "t2edit.svf"),
    ("t2edit.setup", "t2edit.leakage", "t2edit.rollouts", "t2edit.vllm_worker"),
    ("t2edit.experts",),
    ("t2edit.routing",),
    ("t2edit.training",),
    ("t2edit.editors",),
    ("t2edit.evaluation",),
    ("t2edit.jobs", "t2edit.infer"),
    ("t2edit.cli",),
]


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def import_edges(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its file (relative imports resolved; `from a import b`
    counts as importing a.b when that is a module)."""
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` imports the deepest known module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str, layers=LAYERS) -> int:
    best = None
    for rank, prefixes in enumerate(layers):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_imports.py")
    return best[0]


def upward_imports(edges: dict[str, set[str]], layers=LAYERS) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if layer_of(b, layers) > layer_of(a, layers))


def test_the_package_imports_flow_one_way():
    edges = import_edges(module_files(REPO, ("t2edit", "rewards")))
    assert len(edges) > 40  # the whole package was read
    assert cycles(edges) == []
    assert upward_imports(edges) == []


def test_the_checker_finds_a_reintroduced_cycle_and_an_upward_import(tmp_path):
    """A copy of two real modules with the import that used to close the circle (the trainer calling back into the
    jobs) added inside a function: the checker must report both the cycle and the layer it breaks."""
    package = tmp_path / "t2edit"
    (package / "training").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "training" / "__init__.py").write_text("from t2edit.training.trainer import SVFTrainer\n")
    (package / "training" / "trainer.py").write_text(
        (REPO / "t2edit" / "training" / "trainer.py").read_text(encoding="utf-8")
        + "\n\ndef main():\n    from t2edit.jobs import run_training\n    return run_training\n")
    (package / "jobs.py").write_text((REPO / "t2edit" / "jobs.py").read_text(encoding="utf-8"))
    edges = import_edges(module_files(tmp_path, ("t2edit",)))
    assert "t2edit.jobs" in edges["t2edit.training.trainer"]  # the function-local import is counted
    assert ["t2edit.jobs", "t2edit.training", "t2edit.training.trainer"] in cycles(edges) or \
        any({"t2edit.jobs", "t2edit.training.trainer"} <= set(c) for c in cycles(edges))
    assert "t2edit.training.trainer -> t2edit.jobs" in upward_imports(edges)
