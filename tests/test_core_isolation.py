"""The core reaches plugins only through the registry: no import of `heads` or `datamodules`."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "retrieval_lightning"
PLUGIN_PACKAGES = {"heads", "datamodules"}


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    roots.add(arg.value.split(".")[0])
    return roots


def test_no_core_module_imports_a_plugin_package() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    offenders = {
        str(f.relative_to(CORE.parent)): sorted(_imported_roots(ast.parse(f.read_text())) & PLUGIN_PACKAGES)
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_the_checker_catches_a_plugin_import() -> None:
    tree = ast.parse("import os\nfrom heads.gem_arcface import X\nimportlib.import_module('datamodules.gldv2')\n")
    assert _imported_roots(tree) & PLUGIN_PACKAGES == {"heads", "datamodules"}
