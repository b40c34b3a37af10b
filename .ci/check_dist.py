"""Check the built distributions: 4 wheels + 4 sdists, and the kernels wheel needs only torch/triton.

Usage: python .ci/check_dist.py DIST_DIR
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

PACKAGES = ("kernels", "methods", "models", "app")
KERNELS_ALLOWED = {"torch", "triton"}


def requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel, extras excluded."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


def main(dist: Path) -> int:
    problems = []
    for name in PACKAGES:
        wheels = list(dist.glob(f"flashsvd_{name}-*.whl"))
        sdists = list(dist.glob(f"flashsvd_{name}-*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            problems.append(
                f"flashsvd-{name}: expected 1 wheel and 1 sdist, found {len(wheels)} and {len(sdists)}"
            )
            continue
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
        if "flashsvd/__init__.py" in names:
            problems.append(f"{wheels[0].name} ships flashsvd/__init__.py: the namespace must stay implicit")
        if not any(n.startswith(f"flashsvd/{name}/") for n in names):
            problems.append(f"{wheels[0].name} does not contain flashsvd/{name}/")
    kernels = list(dist.glob("flashsvd_kernels-*.whl"))
    if kernels:
        names = {re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0].lower() for r in requirements(kernels[0])}
        if names != KERNELS_ALLOWED:
            problems.append(
                f"flashsvd-kernels requires {sorted(names)}; only {sorted(KERNELS_ALLOWED)} allowed"
            )
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print(f"ok: 4 wheels + 4 sdists in {dist}; flashsvd-kernels requires only torch and triton")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
