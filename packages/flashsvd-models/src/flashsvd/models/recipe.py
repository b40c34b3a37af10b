"""A compression recipe: every choice of the pipeline in one typed, serializable object.

``flashsvd.models.compress(model, recipe=...)`` and ``flashsvd compress --recipe FILE`` read it; the
checkpoint stores it (``quantization_config.recipe`` and the report) and ``flashsvd info`` prints it.
A recipe does not hold the budget (``keep_ratio`` or ranks): the same recipe serves every ratio.

The defaults (:func:`default_recipe`) are the best recipes we measured per model family and, for
encoders, per budget (below ``keep_ratio`` 0.6 another recipe wins); each names the figure that
justifies it (``docs/results.md``, ``benchmarks/results/QUALITY.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOCATIONS",
    "CALIB_SOURCES",
    "GRADIENTS",
    "RECIPES",
    "Recipe",
    "RecipeError",
    "default_recipe",
    "load_recipe",
]

#: how ranks are spread over the targeted layers under the keep_ratio budget.
ALLOCATIONS = ("uniform", "loss_curve", "asvd", "ars")
#: which loss the gradient statistics (output Fisher, FWSVD) come from.
GRADIENTS = ("auto", "lm", "labels", "simcse", "none")
#: what the statistics are collected on: the calibration batches, or the model's samples prompted by them.
CALIB_SOURCES = ("data", "model")
ROLES = ("q", "k", "v", "o", "up", "gate", "down")


class RecipeError(ValueError):
    """A recipe (object or file) that cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class Recipe:
    """Every choice of :func:`flashsvd.models.compress` except the budget.

    Attributes:
        name: a label recorded with the checkpoint.
        method: factorization method (``flashsvd.methods.METHODS``).
        allocation: ``uniform`` (same kept share everywhere), ``loss_curve`` (minimize the summed
            estimated loss, :func:`flashsvd.methods.allocate_by_curves`), ``asvd`` (ASVD sensitivity
            search) or ``ars`` (adaptive rank selection).
        keep_dense: roles (``q``, ``k``, ``v``, ``o``, ``up``, ``gate``, ``down``) or module paths left
            dense; their parameters still count against ``keep_ratio``.
        center: fit centered inputs and fold the mean into the bias (whiten/svdllm).
        output_fisher: weight each output by its loss sensitivity (whiten).
        update: svdllm's closed-form factor update (``None``, ``"v"``, ``"u"``, ``"uv"``).
        sequential: calibrate block by block on the compressed prefix's outputs (cached block inputs).
        paired: in sequential mode, aim every layer at the dense model's outputs.
        gradients: loss of the gradient statistics: ``auto`` (task labels if present, the LM loss for
            decoders, else SimCSE for embedding encoders), ``lm``, ``labels``, ``simcse`` or ``none``.
        gradient_batches: calibration batches used for gradients (``None``: all).
        rank_multiple: round every rank to a multiple of this (GPU tiles; 1 = no rounding).
        calib_samples: calibration texts (or token windows when ``calib_window`` is set).
        calib_max_length: tokens per calibration text.
        calib_batch_size: texts per calibration batch.
        calib_window: pack calibration text into windows of this many tokens (decoders).
        calib_min_words: skip calibration texts shorter than this many words (SST-2 has phrase rows).
        calib_source: ``data`` (calibrate on the batches given) or ``model`` (causal LMs: on the
            model's own samples, each continuing the first ``calib_prompt_tokens`` tokens of one given
            calibration row to that row's length, :mod:`flashsvd.models.self_calibration`).
        calib_prompt_tokens: prompt length of ``calib_source: model``.
        options: further method options (e.g. ``damping``, ``alpha``).
        evidence: the measured figure behind this recipe.
    """

    name: str = "custom"
    method: str = "whiten"
    allocation: str = "uniform"
    keep_dense: tuple[str, ...] = ()
    center: bool = False
    output_fisher: bool = False
    update: str | None = None
    sequential: bool = False
    paired: bool = True
    gradients: str = "auto"
    gradient_batches: int | None = None
    rank_multiple: int = 8
    calib_samples: int = 2048
    calib_max_length: int = 128
    calib_batch_size: int = 32
    calib_window: int | None = None
    calib_min_words: int = 4
    calib_source: str = "data"
    calib_prompt_tokens: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    evidence: str = ""

    def __post_init__(self) -> None:
        from flashsvd.methods import get_method

        try:
            object.__setattr__(self, "method", get_method(self.method).name)
        except Exception as err:
            raise RecipeError(f"recipe {self.name!r}: method: {err}") from err
        object.__setattr__(self, "keep_dense", tuple(self.keep_dense))
        object.__setattr__(self, "options", dict(self.options))
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(
                f"recipe {self.name!r}: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}"
            )
        if self.gradients not in GRADIENTS:
            raise RecipeError(
                f"recipe {self.name!r}: gradients must be one of {GRADIENTS}, got {self.gradients!r}"
            )
        if self.update not in (None, "v", "u", "uv"):
            raise RecipeError(
                f"recipe {self.name!r}: update must be null, 'v', 'u' or 'uv', got {self.update!r}"
            )
        if self.update is not None and self.method != "svdllm":
            raise RecipeError(
                f"recipe {self.name!r}: update is svdllm's option, the method is {self.method!r}"
            )
        if self.center and self.method not in ("whiten", "svdllm"):
            raise RecipeError(
                f"recipe {self.name!r}: center needs method whiten or svdllm, got {self.method!r}"
            )
        if self.output_fisher and self.method != "whiten":
            raise RecipeError(f"recipe {self.name!r}: output_fisher needs method whiten, got {self.method!r}")
        if self.output_fisher and self.sequential:
            # the block-by-block pass collects input statistics only; the gradients come from one pass of
            # the whole dense model, which sequential mode does not run (it failed deep inside before)
            raise RecipeError(
                f"recipe {self.name!r}: output_fisher needs the dense model's gradient statistics, which "
                "sequential calibration does not collect: use sequential: false, or drop output_fisher"
            )
        if self.calib_source not in CALIB_SOURCES:
            raise RecipeError(
                f"recipe {self.name!r}: calib_source must be one of {CALIB_SOURCES}, got {self.calib_source!r}"
            )
        for key in (
            "rank_multiple",
            "calib_samples",
            "calib_max_length",
            "calib_batch_size",
            "calib_prompt_tokens",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"recipe {self.name!r}: {key} must be a positive integer, got {value!r}")
        for key in ("gradient_batches", "calib_window"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RecipeError(
                    f"recipe {self.name!r}: {key} must be a positive integer or null, got {value!r}"
                )
        if (
            self.calib_source == "model"
            and self.calib_window is not None
            and self.calib_prompt_tokens >= self.calib_window
        ):
            raise RecipeError(
                f"recipe {self.name!r}: calib_prompt_tokens ({self.calib_prompt_tokens}) must be below "
                f"calib_window ({self.calib_window})"
            )

    @property
    def data_aware(self) -> bool:
        """Whether the recipe needs calibration data (the method or the allocation is data-aware)."""
        from flashsvd.methods import get_method

        return get_method(self.method).data_aware or self.allocation != "uniform" or self.sequential

    def method_options(self) -> dict[str, Any]:
        """The options ``flashsvd.methods.factorize`` receives."""
        out = dict(self.options)
        if self.center:
            out["center"] = True
        if self.output_fisher:
            out["output_fisher"] = True
        if self.update is not None:
            out["update"] = self.update
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_dense"] = list(self.keep_dense)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping of recipe fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))

    def save(self, path: str | Path) -> None:
        """Write the recipe as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        text = (
            _yaml().safe_dump(self.to_json(), sort_keys=False)
            if path.suffix.lower() in (".yaml", ".yml")
            else json.dumps(self.to_json(), indent=1)
        )
        path.write_text(text, encoding="utf-8")

    def with_(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for logs and ``flashsvd info``."""
        parts = [self.method, f"{self.allocation} allocation"]
        if self.keep_dense:
            parts.append("dense " + "/".join(self.keep_dense))
        parts += [n for n in ("center", "output_fisher", "sequential") if getattr(self, n)]
        if self.update:
            parts.append(f"update {self.update}")
        if self.calib_source == "model":
            parts.append("calibrated on the model's samples")
        parts.append(f"ranks × {self.rank_multiple}")
        return f"{self.name}: " + ", ".join(parts)


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a declared dependency
        raise RecipeError("YAML recipes need PyYAML: pip install pyyaml (or use a .json recipe)") from err
    return yaml


def load_recipe(source: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    """A :class:`Recipe` from itself, a mapping, a built-in name (:data:`RECIPES`) or a JSON/YAML file."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_json(source)
    if isinstance(source, str) and source in RECIPES:
        return RECIPES[source]
    path = Path(source)
    if not path.is_file():
        raise RecipeError(
            f"recipe {str(source)!r} is neither a file nor a built-in recipe ({', '.join(sorted(RECIPES))})"
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = _yaml().safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise RecipeError(
            f"{path}: not valid {'YAML' if path.suffix.lower() != '.json' else 'JSON'} ({err})"
        ) from err
    return Recipe.from_json(data, where=str(path))


#: The best recipes we measured, by model family.
RECIPES: dict[str, Recipe] = {
    "encoder": Recipe(
        name="encoder",
        method="whiten",
        allocation="loss_curve",
        keep_dense=("q", "k"),
        center=True,
        output_fisher=True,
        gradients="auto",
        calib_samples=2048,
        evidence=(
            "all-MiniLM-L6-v2 zero-shot STS-B 0.8072 / 0.8004 / 0.7449 at keep 0.9 / 0.75 / 0.5 "
            "(dense 0.8100), calibrated on 2,048 SST-2 train sentences: benchmarks/results/QUALITY.md"
        ),
    ),
    "decoder": Recipe(
        name="decoder",
        method="whiten",
        allocation="loss_curve",
        center=True,
        output_fisher=True,
        gradients="auto",
        gradient_batches=16,
        calib_samples=256,
        calib_window=256,
        calib_batch_size=1,
        calib_source="model",
        evidence=(
            "SmolLM2-135M WikiText-2 perplexity 52.32 / 35.32 at keep 0.8 / 0.9 through the CLI (CPU fp32; dense "
            "28.41; 60.34 / 36.22 before), calibrated on the model's own samples continuing 8-token prompts from "
            "256 windows of SST-2 train text; chosen on STS-B train perplexity among 14 self-calibrated variants "
            "on the H200 (51.15 / 35.26 there): benchmarks/results/smollm_decoder_search_h200.log, QUALITY.md"
        ),
    ),
    "svd": Recipe(
        name="svd",
        method="svd",
        allocation="uniform",
        evidence="data-free: plain truncated SVD, uniform ranks",
    ),
}
# The encoder recipe with SVD-LLM's block-by-block fit and ASVD's allocation: what measured best below
# keep 0.75 (see ENCODER_LEAN_BELOW), i.e. exactly the variant the split search scored.
RECIPES["encoder-lean"] = RECIPES["encoder"].with_(
    name="encoder-lean",
    method="svdllm",
    allocation="asvd",
    output_fisher=False,
    sequential=True,
    update="v",
    evidence=(
        "all-MiniLM-L6-v2 zero-shot STS-B on the even / odd pairs, Q/K dense: 0.7761 / 0.7652 at keep 0.5, "
        "0.7924 / 0.7806 at 0.6, 0.8002 / 0.7891 at 0.7 (the encoder default: 0.7515 / 0.7407, "
        "0.7812 / 0.7734, 0.7931 / 0.7880); ties it at 0.75: benchmarks/results/minilm_keep05_split_search.log"
    ),
)


#: encoders compressed to a keep_ratio below this get ``encoder-lean``: MiniLM STS-B on the even /
#: odd pairs (chosen on the even ones), default vs lean with Q/K dense, 0.7515 / 0.7407 vs 0.7761 /
#: 0.7652 at keep 0.5, 0.7812 / 0.7734 vs 0.7924 / 0.7806 at 0.6, 0.7931 / 0.7880 vs 0.8002 / 0.7891 at
#: 0.7, 0.8037 / 0.7971 vs 0.8035 / 0.7959 at 0.75 (a tie: the default stays)
#: (``benchmarks/results/minilm_keep05_split_search.log``).
ENCODER_LEAN_BELOW = 0.75


def default_recipe(model_or_decoder: Any, keep_ratio: float | None = None) -> Recipe:
    """The best measured recipe for the model's family (``decoder`` for causal LMs, else ``encoder``)
    and budget: encoders below ``keep_ratio`` :data:`ENCODER_LEAN_BELOW` get ``encoder-lean``."""
    if isinstance(model_or_decoder, bool):
        decoder = model_or_decoder
    else:
        from flashsvd.models.adapters import get_adapter

        decoder = get_adapter(model_or_decoder).decoder
    if decoder:
        return RECIPES["decoder"]
    if keep_ratio is not None and keep_ratio < ENCODER_LEAN_BELOW:
        return RECIPES["encoder-lean"]
    return RECIPES["encoder"]
