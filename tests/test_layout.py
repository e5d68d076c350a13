"""The package's layers import downward only (docs/design/layout.md): a model that reads files, an
engine that speaks HTTP or a reader that needs the façade would each fail here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llama_lite"
# Lowest first: a module may import from its own layer and the ones before it.
LAYERS = [{"errors", "checks", "cache", "mkl_strict"}, {"model"}, {"loading"}, {"text"}, {"engine"}, {"settings"},
          {"loader", "path_choice", "precompile"}, {"generation"}, {"prompt_records"}, {"server"}, {"cluster"}, {"cli"},
          {"__init__"}]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def imported_layers(path: Path, root: Path = PACKAGE):
    """(line, layer) of each module of the package at `root` that `path` imports (relative imports:
    the package writes no other kind)."""
    package = list(path.relative_to(root).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            yield node.lineno, target[0] if target else node.names[0].name


def test_layers_import_downward_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert own in RANK, f"{path.relative_to(PACKAGE)} is in no layer; add it to LAYERS and docs/design/layout.md"
        upward += [f"{path.relative_to(PACKAGE)}:{line} imports {layer}" for line, layer in imported_layers(path)
                   if RANK[layer] > RANK[own]]
    assert not upward, upward


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a model module importing the engine is caught."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.py").write_text("import torch\nfrom ..engine.engine import Engine\nfrom . import rope\n")
    assert list(imported_layers(tmp_path / "model" / "bad.py", root=tmp_path)) == [(2, "engine"), (3, "model")]
