"""Name → factorization method. Built-ins are listed statically (no import-time registration)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flashsvd.methods.ars import ars_method
from flashsvd.methods.asvd import asvd_method
from flashsvd.methods.errors import FlashSVDMethodError, UnknownMethodError
from flashsvd.methods.fwsvd import fwsvd_method
from flashsvd.methods.svd import svd_method
from flashsvd.methods.svdllm import svdllm_method
from flashsvd.methods.whiten import whiten_method


@dataclass(frozen=True)
class MethodSpec:
    """A factorization method: ``fn(weight, rank, *, stats, n_heads, **options) -> (u, v, info)``.

    ``data_aware`` methods need calibration statistics (``stats``); ``requires`` names the statistics.
    """

    name: str
    fn: Callable
    data_aware: bool
    requires: tuple[str, ...]
    description: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("svd", svd_method, False, (), "truncated SVD, √Σ split across both factors"),
        MethodSpec("fwsvd", fwsvd_method, True, ("fisher_in",), "Fisher-weighted SVD (Hsu et al. 2022)"),
        MethodSpec("whiten", whiten_method, True, ("gram",), "DRONE data-aware whitening (Chen et al. 2021)"),
        MethodSpec("svdllm", svdllm_method, True, ("gram",), "SVD-LLM truncation-aware whitening + update"),
        MethodSpec("asvd", asvd_method, True, ("abs_sum",), "activation-aware SVD (Yuan et al. 2023)"),
        MethodSpec(
            "ars", ars_method, False, (), "adaptive rank selection (Gao et al. 2024); whiten/svd factors"
        ),
    )
}

ALIASES: dict[str, str] = {"adasvd": "ars", "drone": "whiten", "svd-llm": "svdllm"}


def register_method(
    name: str,
    fn: Callable | None = None,
    *,
    data_aware: bool = False,
    requires: tuple[str, ...] = (),
    description: str = "",
    replace: bool = False,
):
    """Register ``fn`` under ``name`` (usable as a decorator). Refuses to shadow a name unless ``replace``."""

    def add(f: Callable) -> Callable:
        key = name.lower()
        if not replace and (key in METHODS or key in ALIASES):
            raise FlashSVDMethodError(
                f"method {name!r} is already registered; pass replace=True to override."
            )
        METHODS[key] = MethodSpec(key, f, data_aware, tuple(requires), description)
        return f

    return add if fn is None else add(fn)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownMethodError(f"method must be a string, got {type(name).__name__}.")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        known = ", ".join(sorted(METHODS))
        aliases = ", ".join(f"{a}→{b}" for a, b in sorted(ALIASES.items()))
        raise UnknownMethodError(f"unknown method {name!r}. Available: {known} (aliases: {aliases}).")
    return key


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` for ``name`` (case-insensitive; aliases such as ``adasvd`` → ``ars``)."""
    return METHODS[canonical_name(name)]
