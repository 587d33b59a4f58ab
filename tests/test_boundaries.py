"""The package's import boundaries: bookkeeping without tensors, a model without requests, no cycles."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "blockdiff"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("module", ["engine/scheduler.py", "engine/request.py", "engine/slot_allocator.py",
                                    "engine/output.py", "diffusion/params.py"])
def test_bookkeeping_never_imports_torch(module):
    assert not any(name.split(".")[0] == "torch" for name in imports(PKG / module))


def test_model_knows_nothing_of_engine_server_or_training():
    for path in (PKG / "model").glob("*.py"):
        for name in imports(path):
            assert not any(part in name for part in ("engine", "server", "train", "tokenizer")), (path, name)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, name: str) -> str:
    """Absolute module name of an import statement's target (relative names resolved)."""
    level = len(name) - len(name.lstrip("."))
    if not level:
        return name
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    rest = name.lstrip(".")
    return ".".join(base + ([rest] if rest else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, anywhere in its body (lazy imports count)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, path.name == "__init__.py", "." * node.level + (node.module or ""))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in modules:      # `from x import y` where y is not a module
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("blockdiff"):
                    targets.add(name)
        graph[mod] = targets
    return graph


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of logic; every other edge counts
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t == "blockdiff")} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_modules_and_functions_stay_small():
    """Modules of one purpose under 350 lines; functions that fit on a screen (60 lines)."""
    for path in PKG.rglob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 350, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, (path, node.name)
