"""After installing only the kernels wheel: it imports, and nothing beyond torch/triton came along.

Everything installed must be the kernels wheel itself, the installer's own tools, or in the
dependency closure of torch and triton.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

import flashsvd.kernels


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> set[str]:
    """Names of the installed distributions that ``roots`` need, transitively (extras excluded)."""
    seen: set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(canonical(re.split(r"[ <>=!~;\[(]", req.strip(), maxsplit=1)[0]))
    return seen


allowed = closure(["torch", "triton"]) | {"flashsvd-kernels", "pip", "setuptools", "wheel"}
installed = {canonical(d.metadata["Name"]) for d in md.distributions()}
extra = sorted(installed - allowed)
for name in ("flashsvd.methods", "flashsvd.models", "flashsvd.app"):
    if name in sys.modules:
        sys.exit(f"importing flashsvd.kernels imported {name}")
if extra:
    sys.exit(f"installing flashsvd-kernels pulled in unexpected packages: {extra}")
print(
    "ok: flashsvd.kernels", flashsvd.kernels.__version__, "imports; installed:", ", ".join(sorted(installed))
)
