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

The site's home page is ``docs/index`` (``root_doc``); the build writes a top-level
``index.html`` that redirects to it (:func:`_write_landing_page`), so
``docs/_build/html/index.html`` opens the site. It also fails (a warning, an error with
``-W``) when a public member of :data:`API_CLASSES` has no entry in the API reference
(:func:`_check_api_members`).
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import inspect
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


# ------------------------------------------------------------------ landing page, API coverage

# classes whose every public member (method or property) must have an API reference entry
API_CLASSES = ("lightning_ntk.NTKMonitor", "lightning_ntk.NTKTracker", "lightning_ntk.NTKReport")

_REDIRECT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<meta http-equiv="refresh" content="0; url={target}">
<link rel="canonical" href="{target}">
</head>
<body><p>The documentation is at <a href="{target}">{target}</a>.</p></body>
</html>
"""


def _write_landing_page(outdir: Path, root_uri: str, title: str) -> Optional[Path]:
    """Write ``outdir/index.html`` redirecting to the home page ``root_uri`` (relative).

    Returns:
        The written path, or ``None`` when the home page already is ``index.html``.
    """
    if root_uri == "index.html":
        return None
    target = html.escape(root_uri, quote=True)
    path = Path(outdir) / "index.html"
    path.write_text(_REDIRECT.format(title=html.escape(title), target=target), encoding="utf-8")
    return path


def public_members(path: str) -> list[str]:
    """Public methods and properties of the class at ``path`` that users call.

    Dataclass fields (documented as the class's arguments or attributes) and what a
    Lightning ``Callback`` already defines (its hooks, ``state_dict``) are left out.
    """
    cls = _import_path(path)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    framework = set()
    for base in cls.__mro__:
        if base.__name__ == "Callback" and not base.__module__.startswith("lightning_ntk"):
            framework |= set(vars(base))
    return sorted(
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_")
        and name not in fields
        and name not in framework
        and (callable(value) or isinstance(inspect.getattr_static(cls, name), property))
    )


def _check_api_members(documented: set[str]) -> list[str]:
    """``Class.member`` of :data:`API_CLASSES` missing from the ``documented`` objects."""
    return [
        f"{path}.{name}"
        for path in API_CLASSES
        for name in public_members(path)
        if f"{path}.{name}" not in documented
    ]


def _finish(app: Any, exception: Optional[BaseException]) -> None:
    """After an HTML build: write the landing page; warn about undocumented API members."""
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for name in _check_api_members(set(app.env.domains["py"].objects)):
        logger.warning(f"{name} is public but has no entry in the API reference (docs/api/).")
    root_uri = app.builder.get_target_uri(app.config.root_doc)
    _write_landing_page(Path(app.builder.outdir), root_uri, app.config.html_title)


def setup(app: Any) -> None:
    """Register the import-based resolution of cross-references and the build's last step."""
    app.connect("missing-reference", _resolve_by_import)
    app.connect("build-finished", _finish)
