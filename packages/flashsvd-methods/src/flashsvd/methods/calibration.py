"""Streaming calibration statistics gathered by hooks on linear layers.

Per layer we keep only ``O(in²)`` float64 state, so memory is bounded by the layer sizes and not by
the number of calibration tokens:

* ``gram = XᵀX`` (float64) over every token that entered the layer (``X: [tokens, in]``), and the
  column sums ``x_sum`` (so methods can work on the centered covariance and fold the mean into the bias),
* ``abs_sum`` / ``abs_max`` of the inputs per input feature (ASVD's activation scales),
* ``cross = X̃ᵀ X_ref`` when the layer's actual inputs ``X̃`` (from an already-compressed prefix) are
  paired with reference inputs ``X_ref`` of the dense model (used to steer the factorization towards
  the dense outputs in sequential mode),
* Fisher diagonals from gradients of a loss: ``fisher_in[j] = Σ_i (∂L/∂W_ij)²`` (summed over the
  output dim, the FWSVD row-sum in the paper's ``Y = XW`` orientation), ``fisher_out[i]`` (summed
  over the input dim), and ``grad_out_sq[i] = Σ_tokens (∂L/∂y_i)²``.

Hooks work for ``nn.Linear`` out of the box. Any other module whose first positional argument is the
input with features on the last dim (e.g. GPT-2's ``Conv1D``) works as is; for anything else pass
``input_of(module, args) -> Tensor``. Weight gradients are read from ``module.weight.grad`` laid out
``[out, in]``; pass ``weight_of(module) -> Tensor [out, in]`` for modules storing it transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from flashsvd.methods.errors import CalibrationMissingError, ShapeError
from flashsvd.methods.linalg import STREAM_CHUNK_ELEMENTS, check_finite, rows_per_block
from flashsvd.methods.reproducible import ReproducibleSum

InputOf = Callable[[nn.Module, tuple], torch.Tensor]
WeightOf = Callable[[nn.Module], torch.Tensor]


def default_input_of(module: nn.Module, args: tuple) -> torch.Tensor:
    """The first positional argument (``nn.Linear``, GPT-2 ``Conv1D`` and most projections)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError(
            f"cannot find the input tensor of {type(module).__name__}: pass input_of=callable(module, args)."
        )
    return args[0]


def default_weight_grad_of(module: nn.Module) -> torch.Tensor | None:
    """``module.weight.grad`` as ``[out, in]`` (``nn.Linear`` layout)."""
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.grad


_SUMS = ("gram", "x_sum", "abs_sum", "cross", "ref_sum", "fisher_in", "fisher_out", "grad_out_sq")


def _sum_property(name: str, doc: str) -> property:
    """A float64 tensor read from ``self.sums[name]`` (``None`` if absent); assigning stores a fixed value."""

    def get(self: LayerStatistics) -> torch.Tensor | None:
        v = self.sums.get(name)
        return v.value() if isinstance(v, ReproducibleSum) else v

    def put(self: LayerStatistics, value: torch.Tensor | None) -> None:
        if value is None:
            self.sums.pop(name, None)
        else:
            self.sums[name] = value

    return property(get, put, doc=doc)


@dataclass(init=False)
class LayerStatistics:
    """Accumulated statistics of one layer's inputs (and optionally its gradients).

    Every sum lives in ``sums`` as a :class:`~flashsvd.methods.reproducible.ReproducibleSum` while it is
    accumulated, so its bits do not depend on the order of the batches or on how many processes shared
    them; the attributes ``gram``, ``x_sum``, … read it as a float64 tensor. Assigning one (or passing it
    to the constructor) stores a fixed tensor instead, as derived copies like :meth:`centered` do.
    """

    in_features: int
    n_tokens: int = 0
    n_cross_tokens: int = 0
    n_grad_batches: int = 0
    n_grad_tokens: int = 0
    abs_max: torch.Tensor | None = None
    sums: dict[str, ReproducibleSum | torch.Tensor] = field(default_factory=dict)

    gram = _sum_property("gram", "``XᵀX`` over every input token (float64).")
    x_sum = _sum_property("x_sum", "Column sums of the inputs (for the mean).")
    abs_sum = _sum_property("abs_sum", "Per-feature sums of ``|x|`` (ASVD's scales).")
    cross = _sum_property("cross", "``X̃ᵀ X_ref`` of paired compressed/dense inputs (sequential mode).")
    ref_sum = _sum_property("ref_sum", "Column sums of the paired dense inputs.")
    fisher_in = _sum_property("fisher_in", "``Σ_i (∂L/∂W_ij)²`` per input feature.")
    fisher_out = _sum_property("fisher_out", "``Σ_j (∂L/∂W_ij)²`` per output feature.")
    grad_out_sq = _sum_property("grad_out_sq", "``Σ_tokens (∂L/∂y)²`` per output feature.")

    def __init__(
        self,
        in_features: int,
        n_tokens: int = 0,
        n_cross_tokens: int = 0,
        n_grad_batches: int = 0,
        n_grad_tokens: int = 0,
        abs_max: torch.Tensor | None = None,
        sums: Mapping[str, ReproducibleSum | torch.Tensor] | None = None,
        **values: torch.Tensor | None,
    ) -> None:
        unknown = sorted(set(values) - set(_SUMS))
        if unknown:
            raise TypeError(f"LayerStatistics has no statistic {unknown[0]!r} (sums: {', '.join(_SUMS)}).")
        self.in_features, self.n_tokens, self.n_cross_tokens = in_features, n_tokens, n_cross_tokens
        self.n_grad_batches, self.n_grad_tokens, self.abs_max = n_grad_batches, n_grad_tokens, abs_max
        self.sums = dict(sums or {})
        for name, value in values.items():
            setattr(self, name, value)

    # ---- accumulation -------------------------------------------------------------------------
    def _accumulator(self, name: str, shape: tuple[int, ...], device: torch.device) -> ReproducibleSum:
        acc = self.sums.get(name)
        if not isinstance(acc, ReproducibleSum):
            acc = ReproducibleSum.zeros(shape, device) if acc is None else ReproducibleSum.of(acc)
            self.sums[name] = acc
        return acc

    def _add(self, name: str, term: torch.Tensor) -> None:
        self._accumulator(name, tuple(term.shape), term.device).add_(term)

    def update(self, x: torch.Tensor, *, gram: bool = True, scales: bool = True) -> None:
        """Add a batch of inputs ``x: [..., in]``."""
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[1]
        if n != self.in_features:
            raise ShapeError(f"input has {n} features, statistics expect {self.in_features}.")
        if gram:  # by row blocks and token blocks: bounded float64 temporaries
            acc = self._accumulator("gram", (n, n), x.device)
            step = rows_per_block(n)
            # on CUDA the sum's update is one fused kernel, so a row block of 4 chunks costs no extra
            # temporaries and converts ``x`` to float64 a quarter as often; elsewhere its ~10 temporaries
            # are each one row block
            row_step = max(1, (4 if x.is_cuda else 1) * STREAM_CHUNK_ELEMENTS // n)
            for r0 in range(0, n, row_step):
                rows = slice(r0, min(n, r0 + row_step))
                term = x.new_zeros(rows.stop - r0, n, dtype=torch.float64)
                for lo in range(0, x.shape[0], step):
                    xb = x[lo : lo + step].to(torch.float64)
                    term.addmm_(xb[:, rows].T, xb)
                acc.add_(term, rows=rows)
            self._add("x_sum", x.sum(0, dtype=torch.float64))
        if scales:
            a = x.abs()
            m = (
                a.amax(0).to(torch.float64)
                if a.shape[0]
                else torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
            )
            self._add("abs_sum", a.sum(0, dtype=torch.float64))
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        self.n_tokens += x.shape[0]

    def update_cross(self, x_actual: torch.Tensor, x_reference: torch.Tensor) -> None:
        """Add ``X̃ᵀ X_ref`` for paired inputs (same tokens, compressed vs dense prefix)."""
        a = x_actual.detach().reshape(-1, x_actual.shape[-1]).to(torch.float64)
        b = x_reference.detach().reshape(-1, x_reference.shape[-1]).to(torch.float64)
        if a.shape != b.shape:
            raise ShapeError(f"paired inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}.")
        self._add("cross", a.T @ b)
        self._add("ref_sum", b.sum(0))
        self.n_cross_tokens += a.shape[0]

    def update_weight_grad(self, grad: torch.Tensor) -> None:
        """Add the squared gradient of an ``[out, in]`` weight, summed per input and per output."""
        g2 = grad.detach().to(torch.float64).square()
        self._add("fisher_in", g2.sum(0))
        self._add("fisher_out", g2.sum(1))
        self.n_grad_batches += 1

    def update_output_grad(self, grad_out: torch.Tensor) -> None:
        """Add ``Σ_tokens (∂L/∂y)²`` from a backward hook."""
        g = grad_out.detach().reshape(-1, grad_out.shape[-1]).to(torch.float64)
        self._add("grad_out_sq", g.square().sum(0))
        self.n_grad_tokens += g.shape[0]

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def abs_mean(self) -> torch.Tensor | None:
        if not self.has("abs_sum") or self.n_tokens == 0:
            return None
        return self.abs_sum / self.n_tokens

    @property
    def covariance(self) -> torch.Tensor | None:
        """``XᵀX / n_tokens`` (the Gram normalized per token)."""
        if not self.has("gram") or self.n_tokens == 0:
            return None
        return self.gram / self.n_tokens

    @property
    def mean(self) -> torch.Tensor | None:
        """Mean input ``x_sum / n_tokens`` (float64), or ``None`` if no Gram was collected."""
        if not self.has("x_sum") or self.n_tokens == 0:
            return None
        return self.x_sum / self.n_tokens

    @property
    def reference_mean(self) -> torch.Tensor | None:
        """Mean of the paired dense-model inputs (sequential mode), else the mean input."""
        if not self.has("ref_sum") or self.n_cross_tokens == 0:
            return self.mean
        return self.ref_sum / self.n_cross_tokens

    def centered(self) -> LayerStatistics:
        """A copy whose ``gram``/``cross`` are about the means: ``XᵀX − n·μμᵀ``, ``X̃ᵀX_ref − n·μ̃μ_refᵀ``.

        Minimizing the error on centered inputs and then correcting the bias by the mean
        (:func:`flashsvd.methods.factorize` with ``center=True``) is the optimal *affine* fit; the plain
        Gram spends rank on reproducing the mean, which a bias does for free.
        """
        mu = self.require("x_sum", "centering") / max(self.n_tokens, 1)
        gram = self.require("gram", "centering") - self.n_tokens * torch.outer(mu, mu)
        out = replace(self, sums=self.sums)
        out.gram = (gram + gram.T) / 2
        if self.has("cross"):
            if not self.has("ref_sum"):
                raise CalibrationMissingError(
                    "centering needs the reference-input sums of the paired statistics; recollect them "
                    "with this version of flashsvd.methods."
                )
            mu_ref = self.ref_sum / max(self.n_cross_tokens, 1)
            out.cross = self.cross - self.n_cross_tokens * torch.outer(mu, mu_ref)
        return out

    def has(self, field_name: str) -> bool:
        """Whether the statistic ``field_name`` was collected, without reading it: reading a running sum
        builds its float64 value, a new ``[in, in]`` matrix for ``gram`` and ``cross``."""
        return self.sums.get(field_name) is not None

    def require(self, field_name: str, method: str) -> torch.Tensor:
        """The named statistic, checked present and finite, or a clear error naming the method."""
        value = getattr(self, field_name)
        if value is None:
            raise CalibrationMissingError(
                f"method '{method}' needs calibration statistic '{field_name}' but it was not collected. "
                "Run flashsvd.methods.collect_statistics(...) (with gradients for Fisher statistics) first."
            )
        check_finite(value, f"statistic '{field_name}'")
        return value

    def settle_(self) -> LayerStatistics:
        """Turn every running sum into its float64 value in place (:meth:`ReproducibleSum.settle_`).

        Call it after the last update (and after the all-reduce under ``torch.distributed``) and
        before factorizing: it halves the statistics' memory without changing a bit. Returns ``self``.
        """
        for name, value in self.sums.items():
            if isinstance(value, ReproducibleSum):
                self.sums[name] = value.settle_()
        return self

    def to(self, device: torch.device | str) -> LayerStatistics:
        return replace(
            self,
            abs_max=None if self.abs_max is None else self.abs_max.to(device),
            sums={k: v.to(device) for k, v in self.sums.items()},
        )


# The architecture document names the per-model mapping ``CalibrationStats``.
CalibrationStats = dict[str, LayerStatistics]


class StatisticsCollector:
    """Context manager that hooks ``modules`` and accumulates :class:`LayerStatistics`.

    Example::

        with StatisticsCollector({"fc": model.fc}) as col:
            for batch in batches:
                model(batch)
        stats = col.stats  # {"fc": LayerStatistics}

    Args:
        modules: name → module.
        gram / scales: which input statistics to accumulate.
        output_grads: also register backward hooks accumulating ``(∂L/∂y)²`` (needs a backward pass).
        record: keep the most recent input of each module in ``last_inputs`` (for pairing).
        reference: name → callable returning the paired reference input for the current batch; when
            given, ``cross = X̃ᵀ X_ref`` is accumulated.
        input_of: how to find the input tensor in a module's forward args.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        gram: bool = True,
        scales: bool = True,
        output_grads: bool = False,
        record: bool = False,
        reference: Mapping[str, torch.Tensor] | None = None,
        input_of: InputOf = default_input_of,
        stats: dict[str, LayerStatistics] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.gram, self.scales, self.output_grads = gram, scales, output_grads
        self.record = record
        self.reference = reference
        self.input_of = input_of
        self.stats: dict[str, LayerStatistics] = {} if stats is None else stats
        self.last_inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _stat(self, name: str, in_features: int) -> LayerStatistics:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = LayerStatistics(in_features)
        return st

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = self.input_of(module, args)
            st = self._stat(name, x.shape[-1])
            if self.gram or self.scales:
                st.update(x, gram=self.gram, scales=self.scales)
            if self.record:
                self.last_inputs[name] = x.detach()
            if self.reference is not None and name in self.reference:
                st.update_cross(x, self.reference[name])

        return hook

    def _back_hook(self, name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            if grad_output and grad_output[0] is not None:
                weight = getattr(module, "weight", None)
                in_features = weight.shape[1] if weight is not None and weight.dim() == 2 else -1
                st = self.stats.get(name) or self._stat(name, in_features)
                st.update_output_grad(grad_output[0])

        return hook

    def __enter__(self) -> StatisticsCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            if self.output_grads:
                self._handles.append(module.register_full_backward_hook(self._back_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def collect_statistics(
    modules: Mapping[str, nn.Module],
    run: Callable[[object], object],
    batches: Iterable[object],
    *,
    gram: bool = True,
    scales: bool = True,
    input_of: InputOf = default_input_of,
    stats: dict[str, LayerStatistics] | None = None,
) -> dict[str, LayerStatistics]:
    """Run ``run(batch)`` for every batch under ``no_grad`` with hooks on ``modules``; return the stats."""
    with (
        torch.no_grad(),
        StatisticsCollector(modules, gram=gram, scales=scales, input_of=input_of, stats=stats) as col,
    ):
        for batch in batches:
            run(batch)
    if not col.stats:
        raise CalibrationMissingError(
            "no calibration batch reached the hooked modules: check that `batches` is non-empty and "
            "that `run` calls the model containing these modules."
        )
    return col.stats


def collect_fisher(
    modules: Mapping[str, nn.Module],
    loss_of: Callable[[object], torch.Tensor],
    batches: Iterable[object],
    *,
    output_grads: bool = False,
    weight_grad_of: WeightOf = default_weight_grad_of,
    stats: dict[str, LayerStatistics] | None = None,
) -> dict[str, LayerStatistics]:
    """Accumulate Fisher diagonals (squared weight gradients of ``loss_of(batch)``) per module.

    ``loss_of`` must return a scalar computed through the modules (e.g. the model's own loss when
    labels exist, or any task proxy). Gradients are only kept transiently; parameters' ``.grad`` is
    reset to ``None`` after each batch, and the modules' ``requires_grad`` flags are restored.
    """
    stats = {} if stats is None else stats
    params = {name: getattr(m, "weight", None) for name, m in modules.items()}
    flags = {name: (p.requires_grad if p is not None else False) for name, p in params.items()}
    for p in params.values():
        if p is not None:
            p.requires_grad_(True)
    collector = StatisticsCollector(modules, gram=False, scales=False, output_grads=output_grads, stats=stats)
    try:
        with collector:
            for batch in batches:
                for p in params.values():
                    if p is not None:
                        p.grad = None
                loss = loss_of(batch)
                if loss.dim() != 0:
                    raise ShapeError("loss_of(batch) must return a scalar tensor.")
                loss.backward()
                for name, module in modules.items():
                    grad = weight_grad_of(module)
                    if grad is None:
                        continue
                    st = stats.get(name)
                    if st is None:
                        st = stats[name] = LayerStatistics(grad.shape[1])
                    st.update_weight_grad(grad)
    finally:
        for name, p in params.items():
            if p is not None:
                p.grad = None
                p.requires_grad_(flags[name])
    return stats
