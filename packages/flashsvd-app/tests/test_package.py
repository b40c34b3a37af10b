"""The installed flashsvd-app: version from metadata, and importing it pulls in nothing above it."""

import importlib.metadata
import subprocess
import sys

import flashsvd.app

HIGHER = {"kernels": "methods models app", "methods": "kernels models app", "models": "app", "app": ""}["app"]


def test_version_matches_metadata():
    assert flashsvd.app.__version__ == importlib.metadata.version("flashsvd-app")


def test_import_pulls_in_no_higher_package():
    code = (
        "import importlib, pkgutil, sys, flashsvd.app as p\n"
        "for m in pkgutil.walk_packages(p.__path__, 'flashsvd.app.'): importlib.import_module(m.name)\n"
        "print(' '.join(sorted(n for n in sys.modules if n.startswith('flashsvd.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    leaked = [f"flashsvd.{h}" for h in HIGHER.split() if f"flashsvd.{h}" in loaded.split()]
    assert not leaked, f"importing flashsvd.app imported {leaked}"
