"""The packages form layers (docs/training.md, "Layers"): a module imports only its own layer and
the ones below it, and no package imports another in a circle. Read with ast, so every import
counts, including those inside functions."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lowest first: each package may import the ones before it in this list, never those after it.
LAYERS = ["perennial", "models", "tasks", "flows", "deployments", "app"]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def upward_imports() -> list[str]:
    wrong = []
    for package in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(package) + 1])
        for path in sorted((REPO / package).rglob("*.py")):
            for imported in sorted(imported_packages(path) - allowed):
                wrong.append(f"{path.relative_to(REPO)} imports {imported}")
    return wrong


def test_no_package_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a models/ module importing tasks/ is reported."""
    fake = tmp_path / "repo"
    for package in LAYERS:
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from tasks.stage import StageSpec\n")
    monkeypatch.setattr(f"{__name__}.REPO", fake)
    assert upward_imports() == ["models/bad.py imports tasks"]


def test_no_module_cycle_within_tasks():
    """tasks/launch.py runs tasks/stage.py's executor; the executor knows nothing of the launcher."""
    modules = {path.stem: path for path in (REPO / "tasks").glob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = {node.module.split(".")[1] for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks.")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})) for nxt in graph.get(start, ()))

    assert [name for name in graph if reaches(name, name, {name})] == []
