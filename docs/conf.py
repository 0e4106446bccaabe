"""Sphinx configuration of the lightning-ntk documentation site.

Build it with ``python -m sphinx -W -n --keep-going -c docs . docs/_build/html`` (from the
repository root; the ``docs`` extra installs Sphinx): the source directory is the
repository root so that the README and the pages under ``docs/`` keep the links they
have on GitHub. Warnings are errors, and ``-n`` (nitpicky) makes every unresolved
cross-reference one.

Docstrings are Google style with Sphinx roles (``:func:`empirical_ntk```), read by
napoleon. A reference may name an object by any public path it is importable from
(``lightning_ntk.NTKReport`` or ``lightning_ntk.monitor.report.NTKReport``), or relative
to the module it is written in: :func:`_resolve_by_import` maps it to the page where the
object is documented. A reference to something that cannot be imported is an error;
one to an importable object without a page of its own (a private helper, a torch type)
is shown as code without a link.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning_ntk  # noqa: E402

project = "lightning-ntk"
author = "The lightning-ntk developers"
copyright = "the lightning-ntk developers"
release = lightning_ntk.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
root_doc = "docs/index"
include_patterns = ["README.md", "CHANGELOG.md", "examples/README.md", "docs/**"]
exclude_patterns = ["docs/_build", "docs/_build/**"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Layer", "notes_style")]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": False}
autodoc_mock_imports: list[str] = []

html_theme = "furo"
html_title = f"lightning-ntk {release}"
html_static_path: list[str] = []


# ------------------------------------------------------------------ cross-references


def _import_path(path: str) -> Optional[Any]:
    """The object at the dotted ``path`` (a module, or attributes below one), or ``None``."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _scopes(module: Optional[str], source: str) -> list[str]:
    """Modules a name in a docstring may be relative to, innermost first.

    The module the reference is documented under (``py:module``), and the module the
    docstring was written in (``docstring of lightning_ntk.theory._solve.flow`` in the
    node's source), with their parent packages.
    """
    scopes: list[str] = []
    origin = source.rpartition("docstring of ")[2].split(":")[0] if "docstring of" in source else ""
    for start in (origin, module or ""):
        name = start
        while name:
            if name not in scopes:
                scopes.append(name)
            name = name.rpartition(".")[0]
    return scopes


def _candidates(target: str, module: Optional[str], cls: Optional[str], source: str) -> list[str]:
    """Full dotted paths a reference may mean, most specific first."""
    target = target.lstrip("~")
    scopes = _scopes(module, source)
    if target.startswith("."):  # relative to the current module or package
        stripped = target.lstrip(".")
        return [f"{scope}.{stripped}" for scope in scopes]
    out = [f"{module}.{cls}.{target}"] if module and cls else []
    out += [f"{scope}.{target}" for scope in scopes]
    out.append(target)
    # type hints name what their module imported (``Tensor``, ``nn.Module``, aliases)
    head = target.split(".")[0]
    for name, loaded in list(sys.modules.items()):
        if name.startswith("lightning_ntk") and hasattr(loaded, head):
            out.append(f"{name}.{target}")
    return out


def _documented(env: Any) -> dict[int, str]:
    """``{id(object): documented name}`` for every object of the Python domain."""
    cache = getattr(env, "_ntk_documented", None)
    if cache is None or len(cache[0]) != len(env.domains["py"].objects):
        objects = env.domains["py"].objects
        by_id: dict[int, str] = {}
        for name in objects:
            obj = _import_path(name)
            if obj is not None and not isinstance(obj, (str, int, float, bool, type(None))):
                by_id.setdefault(id(obj), name)
        cache = (dict(objects), by_id)
        env._ntk_documented = cache
    return cache[1]


def _resolve_by_import(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a Python reference the standard lookup missed (see the module docstring)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if " / " in target or ", " in target:  # ``Raises: ValueError / TypeError: ...``
        parts = [part for part in target.replace(",", " / ").split(" / ") if part.strip()]
        return contnode if all(_exists(part, node) for part in parts) else None
    module, cls = node.get("py:module"), node.get("py:class")
    documented = _documented(env)
    for candidate in _candidates(target, module, cls, node.source or ""):
        obj = _import_path(candidate)
        if obj is None and candidate.rpartition(".")[2] in {"None", "True", "False"}:
            return contnode
        if obj is None:
            continue
        name = documented.get(id(obj))
        if name is None:
            name = candidate if candidate in env.domains["py"].objects else None
        if name is None:
            return contnode  # importable, no page of its own: code, no link
        return _link(app, env, node, contnode, name)
    if _builtin(target):
        return contnode
    return None  # unresolved: a warning, an error with -W


def _exists(target: str, node: Any) -> bool:
    """Whether ``target`` names an importable object (or a builtin) from where ``node`` is."""
    target = target.strip()
    if _builtin(target):
        return True
    candidates = _candidates(target, node.get("py:module"), node.get("py:class"), node.source or "")
    return any(_import_path(c) is not None for c in candidates)


def _builtin(target: str) -> bool:
    import builtins

    return hasattr(builtins, target.split("[")[0])


def _link(app: Any, env: Any, node: Any, contnode: Any, name: str) -> Any:
    """A reference node to the documented object ``name``, whatever its role."""
    py = env.domains["py"]
    found = py.resolve_any_xref(env, node["refdoc"], app.builder, name, node, contnode)
    exact = [ref for role, ref in found if ref.get("reftitle", "").endswith(name)]
    return (exact or [ref for _, ref in found] or [contnode])[0]


def setup(app: Any) -> None:
    """Register the import-based resolution of cross-references."""
    app.connect("missing-reference", _resolve_by_import)
