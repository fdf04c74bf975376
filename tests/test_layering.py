"""The import layering the README promises: cli -> API -> tuners -> ops -> kernels/csrc, patch -> ops.

Read from the source with ``ast`` (imports inside functions count too), so a shortcut across the
layers fails here instead of turning into an import cycle later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    """Every module name ``path`` imports, absolute (relative imports resolved inside the package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if package.startswith("kernels"):
        package = "fastpeft." + package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def _files(*parts):
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def _violations(files, allowed):
    return {f"{f.relative_to(ROOT)}: {m}" for f in files for m in _imports(f) if not allowed(m)}


def test_ops_import_only_ops_kernels_and_csrc():
    ok = ("fastpeft.ops", "fastpeft.kernels", "fastpeft.csrc")
    assert not _violations(_files("fastpeft", "ops"), lambda m: not m.startswith("fastpeft") or m.startswith(ok))


def test_kernels_import_nothing_from_the_package():
    assert _files("kernels")
    assert not _violations(_files("kernels"),
                           lambda m: not m.startswith("fastpeft") or m.startswith("fastpeft.kernels"))


@pytest.mark.parametrize("layer", ["tuners", "utils"])
def test_tuners_and_utils_do_not_import_the_api_layer(layer):
    api = ("fastpeft.peft_model", "fastpeft.mapping", "fastpeft.patch", "fastpeft.integrations", "fastpeft.cli",
           "fastpeft.callbacks")
    files = _files("fastpeft", layer)
    # utils/distributed.py gathers adapters through the API on purpose; it is imported by the CLI only
    files = [f for f in files if f.name != "distributed.py"]
    assert not _violations(files, lambda m: not m.startswith(api))


def test_only_the_cli_imports_the_cli():
    lib = [f for f in _files("fastpeft") if "cli" not in f.relative_to(ROOT).parts]
    assert not _violations(lib, lambda m: not m.startswith("fastpeft.cli"))


def test_library_never_imports_peft():
    """peft is the tests' oracle; the library recognises its layers by class module names."""
    lib = _files("fastpeft") + _files("kernels")
    assert not _violations(lib, lambda m: m != "peft" and not m.startswith("peft."))
