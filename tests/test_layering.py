"""Repository-wide structure checks, done statically on the sources (no package needs installing).

* imports point one way: app → models → (methods, kernels); methods and kernels never import
  each other or anything above them;
* each package imports only the third-party distributions its ``pyproject.toml`` declares;
* ``flashsvd`` stays an implicit namespace: no package ships ``flashsvd/__init__.py``;
* every package has a single-source version that hatch reads.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "methods", "models", "app")
#: the flashsvd subpackages each package may import (besides itself)
ALLOWED_INTERNAL = {
    "kernels": set(),
    "methods": set(),
    "models": {"kernels", "methods"},
    "app": {"kernels", "methods", "models"},
}
#: import name → distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "google": "protobuf"}


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / "packages" / f"flashsvd-{package}" / "src").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in ``path``, with flashsvd.X kept as 'flashsvd.X'."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        for mod in mods:
            parts = mod.split(".")
            names.add(".".join(parts[:2]) if parts[0] == "flashsvd" and len(parts) > 1 else parts[0])
    return names


def _declared(package: str) -> set[str]:
    meta = tomllib.loads((ROOT / "packages" / f"flashsvd-{package}" / "pyproject.toml").read_text())
    reqs = list(meta["project"]["dependencies"])
    for extra in meta["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_or_sideways_imports(package: str) -> None:
    bad = []
    for path in _sources(package):
        for name in _imports(path):
            if name.startswith("flashsvd."):
                target = name.split(".")[1]
                if target != package and target not in ALLOWED_INTERNAL[package]:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports must point app → models → (methods, kernels):\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_third_party_imports_are_declared(package: str) -> None:
    declared = _declared(package)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    missing = []
    for path in _sources(package):
        for name in _imports(path):
            if name == "flashsvd" or name.startswith("flashsvd.") or name in stdlib:
                continue
            dist = IMPORT_TO_DIST.get(name, name).lower().replace("_", "-")
            if dist not in declared:
                missing.append(f"{path.relative_to(ROOT)} imports {name}, not declared in pyproject.toml")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("package", PACKAGES)
def test_namespace_stays_implicit_and_version_is_single_sourced(package: str) -> None:
    src = ROOT / "packages" / f"flashsvd-{package}" / "src"
    assert not (src / "flashsvd" / "__init__.py").exists(), "flashsvd/__init__.py would break the namespace"
    about = src / "flashsvd" / package / "__about__.py"
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+[^"]*"$', about.read_text(), re.M)
    meta = tomllib.loads((src.parent / "pyproject.toml").read_text())
    assert meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["hatch"]["version"]["path"] == f"src/flashsvd/{package}/__about__.py"
    for name in ("README.md", "CHANGELOG.md"):
        assert (src.parent / name).is_file(), f"flashsvd-{package} lacks {name}"


def test_kernels_depend_only_on_torch_and_triton() -> None:
    assert _declared("kernels") == {"torch", "triton"}
