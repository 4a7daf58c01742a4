"""Sphinx configuration: the guides in docs/ (Markdown, through MyST) and an API reference that
autosummary generates from the docstrings of every module under src/pyvhost, found recursively."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sphinx.application import Sphinx

# Document this checkout's source, whatever pyvhost the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

project = "pyvhost"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.autosummary"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build"]

autosummary_generate = True
# `pyvhost.__main__` runs the CLI when imported: autosummary's recursive walk imports every
# submodule, so the entry point is replaced by a mock module, which autosummary then skips.
autodoc_mock_imports = ["pyvhost.__main__"]
# Each object is documented once, where it is defined: a package that re-exports names in its
# __all__ would otherwise document them twice and make every reference to them ambiguous.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_class_signature = "separated"

myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "pyvhost"


def _bind_type_checking_imports(app: Sphinx) -> None:
    """Give each imported pyvhost module the names it imports only under ``if TYPE_CHECKING:``.

    autodoc evaluates string annotations in the module's namespace; names missing there stay bare
    strings, and a bare ``Device`` is ambiguous between two classes of that name. Runs after
    autosummary has imported the modules, and only adds names (no module code runs).
    """
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith("pyvhost") or path is None or name == "pyvhost.__main__":
            continue
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                for stmt in node.body:
                    if isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                        source = sys.modules.get(stmt.module)
                        for alias in stmt.names:
                            bound = alias.asname or alias.name
                            if source is not None and not hasattr(module, bound):
                                setattr(module, bound, getattr(source, alias.name))


def setup(app: Sphinx) -> None:
    """Hook the binding above in after autosummary's own builder-inited handler."""
    app.connect("builder-inited", _bind_type_checking_imports)
