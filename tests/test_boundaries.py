"""The package's import boundaries (DESIGN.md): bookkeeping without tensors, a model without requests."""
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


@pytest.mark.parametrize("module", ["engine/scheduler.py", "engine/request.py", "engine/kv_cache.py",
                                    "engine/output.py", "diffusion/params.py"])
def test_bookkeeping_never_imports_torch(module):
    assert not any(name.split(".")[0] == "torch" for name in imports(PKG / module))


def test_model_knows_nothing_of_engine_server_or_training():
    for path in (PKG / "model").glob("*.py"):
        for name in imports(path):
            assert not any(part in name for part in ("engine", "server", "train", "tokenizer")), (path, name)
