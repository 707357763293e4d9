"""Every import of the shipped code is the standard library, momentprop itself or a declared dependency."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"scikit-learn": "sklearn", "ivon-opt": "ivon", "onnxruntime-gpu": "onnxruntime"}


def _declared(pyproject: dict, group: str | None) -> set[str]:
    project = pyproject["project"]
    specs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in specs}
    return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level packages imported at module level, and those imported inside functions (lazily)."""
    tree = ast.parse(path.read_text())
    eager, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        (eager if node.col_offset == 0 else lazy).update(names)
    return eager, lazy


# the modules `pip install momentprop` (the runtime, without the compile extra) imports
RUNTIME_MODULES = {"__init__", "__main__", "_version", "errors", "card", "inputs", "onnx_runner", "conversion", "cli",
                   "batch"}


def test_shipped_code_imports_only_declared_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    required = _declared(pyproject, None)
    compile_extra = _declared(pyproject, "compile")
    optional = set().union(*(_declared(pyproject, g) for g in pyproject["project"]["optional-dependencies"]))
    allowed = set(sys.stdlib_module_names) | {"momentprop"}
    files = sorted((ROOT / "compiler").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py"))
    assert RUNTIME_MODULES <= {p.stem for p in files}
    for path in files:
        eager, lazy = _imports(path)
        at_import = required if path.parent.name == "compiler" and path.stem in RUNTIME_MODULES else (
            required | compile_extra)
        assert eager <= allowed | at_import, f"{path.name} imports {eager - allowed - at_import} at module level"
        undeclared = lazy - allowed - required - optional
        assert lazy <= allowed | required | optional, f"{path.name} imports undeclared {undeclared}"


def test_the_runtime_install_needs_no_compiler_dependency():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _declared(pyproject, None) == {"onnx", "onnxruntime", "numpy"}
    assert {"torch", "onnxscript", "safetensors"} <= _declared(pyproject, "compile")


def test_xdist_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """The suite's time rests on this: the evaluation smoke runs (a session fixture of one xdist_group) are built once.
    pytest 9.2 with pytest-xdist 3.8 spread the group over both workers, and each built the fixture."""
    import subprocess

    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('one')\n"
        "@pytest.fixture(scope='session')\n"
        "def built():\n"
        "    open(os.path.join(os.path.dirname(__file__), 'built_' + os.environ['PYTEST_XDIST_WORKER']), 'w').close()\n"
        "@pytest.mark.parametrize('i', range(8))\n"
        "def test_grouped(built, i): pass\n")
    (tmp_path / "test_free.py").write_text(
        "import pytest\n@pytest.mark.parametrize('i', range(8))\ndef test_free(i): pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                             "--dist=loadgroup", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(tmp_path.glob("built_*"))) == 1, "an xdist_group ran on both workers: pin pytest below 9.2"
