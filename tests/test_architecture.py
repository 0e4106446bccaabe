"""The layers of the package import only downward (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ntk"

ENGINE = {"kernel"}
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "_lazy": set(),
    "exceptions": set(),
    "kernel": set(),
    "linearization": ENGINE,
    "metrics": ENGINE | {"linearization"},
    "theory": ENGINE | {"linearization", "metrics"},
    "testing": ENGINE | {"linearization", "metrics", "theory"},
    "uncertainty": ENGINE | {"linearization", "metrics", "theory", "testing"},
    "monitor": ENGINE | {"linearization", "metrics", "theory", "exceptions"},
    "lightning": {"monitor"},
}
TOP = {"cli", "__init__"}  # adapters at the top and the lazy root may import anything


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_layers(path: Path, source: "str | None" = None) -> set[str]:
    """The package's top-level layers that ``path`` imports (relative or absolute)."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]  # ("lightning_ntk", "kernel")
    found = set()
    tree = ast.parse(path.read_text() if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [target] if node.module else [(*target, a.name) for a in node.names]
            elif node.module and node.module.split(".")[0] == "lightning_ntk":
                names = [tuple(node.module.split("."))]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [
                tuple(a.name.split(".")) for a in node.names if a.name.startswith("lightning_ntk")
            ]
        else:
            continue
        found |= {n[1] for n in names if len(n) > 1}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) not in TOP)


def test_every_layer_is_known():
    layers = {_layer(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED) | TOP, (
        f"layer(s) missing from ALLOWED: {layers - set(ALLOWED) - TOP}"
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downward(path):
    layer = _layer(path)
    upward = _imported_layers(path) - ALLOWED[layer] - {layer, "_lazy"}  # any layer may
    assert not upward, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(upward)}"


def test_the_check_sees_upward_imports():
    source = (
        "from ..monitor import tracker\nfrom lightning_ntk.cli import main\nfrom .. import theory\n"
    )
    found = _imported_layers(PACKAGE / "kernel" / "new_module.py", source)
    assert found == {"monitor", "cli", "theory"}


def test_package_root_holds_only_entry_modules_and_subpackages():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__.py", "_lazy.py", "exceptions.py", "lightning.py"}
