"""The package's layout contract (docs/architecture.md): the examples use only public names, the scripts never
import the tests, and no module or script outgrows its limit (that importing the package does not import timm is
`tests/test_way_back.py::test_importing_the_package_does_not_import_timm`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tl_align_hf
import tl_align_hf.support

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"tl_align_hf": set(tl_align_hf.__all__), "tl_align_hf.support": set(tl_align_hf.support.__all__)}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda path: path.name)
def test_examples_import_only_public_names(script):
    for module, names in _imports(script):
        if module.startswith("tl_align_hf"):
            assert module in PUBLIC, f"{script.name} imports the module {module}, outside the public API"
            assert set(names) <= PUBLIC[module], f"{script.name} imports {set(names) - PUBLIC[module]} from {module}"


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda path: path.name)
def test_scripts_do_not_import_the_tests(script):
    assert not [module for module, _ in _imports(script) if module == "tests" or module.startswith("tests.")]


def test_modules_and_scripts_stay_under_their_size_limits():
    too_long = {
        str(path.relative_to(ROOT)): lines
        for folder, limit in (("tl_align_hf", 400), ("scripts", 600))
        for path in (ROOT / folder).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > limit
    }
    assert not too_long, f"over the limit (package modules 400 lines, scripts 600): {too_long}"
