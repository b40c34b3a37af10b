"""Rank budgets: turn a policy (keep_ratio, a unified rank, per-type ranks, a per-module JSON) into ranks.

``keep_ratio`` has one meaning everywhere: the fraction of the *compressed layers'* parameters that is
kept, ``Σ params_l(r_l) / Σ in_l·out_l`` over the targeted layers, where a factored layer costs
``r·(in + out)`` (per head: ``H·r·(in + d_head)``) and a layer left dense costs ``in·out``.
Allocations never exceed the budget and leave less than one rank step of it unused.

A rank that cannot save parameters (``r ≥ m·n/(m+n)``, per head ``r·H·(in + d_head) ≥ in·out``) keeps the
layer dense; the allocation says so in ``reasons``.

Unified rank (the original FlashSVD CLI convention): ``rank=64`` means attention Q/K/V factors of rank
64 (per head when the layer is per-head), and both FFN matrices and the attention output projection
("wo") of rank ``6 × 64 = 384`` — the FFN/output matrices are ~4× wider and carry more of the spectrum.
The multipliers are parameters of :func:`unified_ranks`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashsvd.methods.errors import FlashSVDMethodError, InvalidKeepRatioError, InvalidRankError

KINDS = ("attn", "wo", "ffn", "other")


@dataclass(frozen=True)
class LayerShape:
    """Geometry of one target layer (``weight: [out_features, in_features]``).

    ``kind`` groups layers for per-type ranks: ``"attn"`` (Q/K/V), ``"wo"`` (attention output),
    ``"ffn"`` (up/gate/down) or ``"other"``. ``n_heads`` makes the layer per-head (rank is per head).
    """

    name: str
    in_features: int
    out_features: int
    n_heads: int | None = None
    kind: str = "other"

    def __post_init__(self) -> None:
        if self.in_features <= 0 or self.out_features <= 0:
            raise FlashSVDMethodError(f"layer {self.name!r}: features must be positive.")
        if self.n_heads is not None and (self.n_heads <= 0 or self.out_features % self.n_heads):
            raise FlashSVDMethodError(
                f"layer {self.name!r}: n_heads={self.n_heads} must divide out_features={self.out_features}."
            )
        if self.kind not in KINDS:
            raise FlashSVDMethodError(f"layer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")

    @property
    def heads(self) -> int:
        return self.n_heads or 1

    @property
    def d_out(self) -> int:
        """Output dim of one factored block (the head dim when per-head)."""
        return self.out_features // self.heads

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.d_out)

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params_per_rank(self) -> int:
        return self.heads * (self.in_features + self.d_out)

    def params(self, rank: int | None) -> int:
        """Parameters at ``rank`` (``None`` = dense)."""
        return self.dense_params if rank is None else rank * self.params_per_rank

    @property
    def breakeven_rank(self) -> int:
        """Smallest rank that does not save parameters: ``ceil(m·n / (m+n))`` (per head accordingly)."""
        return math.ceil(self.dense_params / self.params_per_rank)

    def saves(self, rank: int) -> bool:
        return self.params(rank) < self.dense_params


@dataclass
class RankAllocation:
    """Ranks per layer (``None`` = kept dense), why layers stayed dense, and the exact budget used."""

    ranks: dict[str, int | None]
    reasons: dict[str, str] = field(default_factory=dict)
    kept_params: int = 0
    dense_params: int = 0
    #: ranks were rounded to multiples of this (``None``: not rounded); see :func:`round_ranks`.
    multiple: int | None = None
    #: layers whose rank could not be rounded (their largest useful rank is below ``multiple``).
    unrounded: tuple[str, ...] = ()

    @property
    def keep_fraction(self) -> float:
        return self.kept_params / self.dense_params if self.dense_params else 1.0

    def to_json(self) -> dict:
        return {
            "ranks": self.ranks,
            "reasons": self.reasons,
            "kept_params": self.kept_params,
            "dense_params": self.dense_params,
            "keep_fraction": self.keep_fraction,
            "multiple": self.multiple,
            "unrounded": list(self.unrounded),
        }


def check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise InvalidKeepRatioError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}.")
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise InvalidKeepRatioError(
            f"keep_ratio must be in (0, 1] (fraction of the compressed layers' parameters kept), got {keep_ratio}."
        )
    return float(keep_ratio)


def check_rank(rank: object, max_rank: int, what: str = "matrix") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InvalidRankError(f"rank must be a positive integer, got {rank!r}.")
    if rank <= 0:
        raise InvalidRankError(f"rank must be ≥ 1, got {rank}.")
    if rank > max_rank:
        raise InvalidRankError(f"rank {rank} exceeds the {what} size: the maximum is {max_rank}.")
    return rank


def _finish(shapes: Sequence[LayerShape], ranks: Mapping[str, int | None], reasons=None) -> RankAllocation:
    """Apply the "dense when no saving" rule and count parameters."""
    out: dict[str, int | None] = {}
    why: dict[str, str] = dict(reasons or {})
    kept = total = 0
    for s in shapes:
        r = ranks.get(s.name)
        if r is not None:
            check_rank(r, s.max_rank, f"layer {s.name!r} ({'per head' if s.n_heads else 'matrix'})")
            if not s.saves(r):
                why[s.name] = (
                    f"rank {r} ≥ break-even {s.breakeven_rank} (m·n/(m+n) for {s.out_features}×{s.in_features}"
                    f"{f', {s.n_heads} heads' if s.n_heads else ''}): factors would not save parameters; kept dense"
                )
                r = None
        elif s.name not in why:
            why[s.name] = "kept dense by the policy"
        out[s.name] = r
        kept += s.params(r)
        total += s.dense_params
    return RankAllocation(out, why, kept, total)


def _fill(shapes: Sequence[LayerShape], ranks: dict[str, int | None], budget: int, order: Callable) -> None:
    """Add +1 rank steps (in ``order`` priority) while they fit in ``budget`` and still save parameters."""
    used = sum(s.params(ranks[s.name]) for s in shapes)
    progress = True
    while progress:
        progress = False
        for s in sorted(shapes, key=order):
            r = ranks[s.name]
            if r is None or r + 1 > s.max_rank or not s.saves(r + 1):
                continue
            if used + s.params_per_rank <= budget:
                ranks[s.name] = r + 1
                used += s.params_per_rank
                progress = True


def minimum_keep_fraction(
    shapes: Sequence[LayerShape], min_rank: int = 1, keep_dense: Collection[str] = ()
) -> float:
    """The smallest feasible ``keep_ratio``: every layer at ``min_rank`` (or dense where that saves nothing).

    This is the number the "keep_ratio too small" errors quote, so any ratio at or above it is accepted.
    """
    kept, total = _minimum_params(shapes, min_rank, keep_dense), sum(s.dense_params for s in shapes)
    return kept / total if total else 1.0


def _minimum_params(shapes: Sequence[LayerShape], min_rank: int, keep_dense: Collection[str] = ()) -> int:
    kept = 0
    for s in shapes:
        r = min(min_rank, s.max_rank)
        kept += s.dense_params if s.name in keep_dense or not s.saves(r) else s.params(r)
    return kept


def _too_small(keep: float, shapes, min_rank: int, keep_dense: Collection[str] = ()) -> InvalidKeepRatioError:
    floor = minimum_keep_fraction(shapes, min_rank, keep_dense)
    return InvalidKeepRatioError(
        f"keep_ratio={keep} is below the smallest feasible value {floor:.4f} (rank {min_rank} in every "
        f"layer{', the keep_dense layers dense' if keep_dense else ''}); raise keep_ratio to at least "
        f"{math.ceil(floor * 1e4) / 1e4:.4f} or lower min_rank."
    )


def uniform_keep_ratio(shapes: Sequence[LayerShape], keep_ratio: float, min_rank: int = 1) -> RankAllocation:
    """The same kept fraction in every layer, then leftover budget filled one rank at a time.

    ``keep_ratio = 1`` keeps everything dense. Otherwise each layer gets
    ``r = floor(keep·in·out / params_per_rank)`` (at least ``min_rank``); if the ``min_rank`` floors
    overshoot the budget (tiny ratios, where one rank of a per-head layer costs more than its share),
    ranks are taken back one step at a time from the layers furthest above their share. The remaining
    budget then goes, one rank step at a time, to the layers furthest below their share; the total
    never exceeds ``keep·Σ in·out``. Every ratio down to :func:`minimum_keep_fraction` is feasible.
    """
    keep = check_keep_ratio(keep_ratio)
    if keep == 1.0:
        return _finish(shapes, {s.name: None for s in shapes}, {s.name: "keep_ratio=1" for s in shapes})
    total = sum(s.dense_params for s in shapes)
    budget = math.floor(keep * total)
    if _minimum_params(shapes, min_rank) > budget:
        raise _too_small(keep, shapes, min_rank)
    ranks: dict[str, int | None] = {}
    for s in shapes:
        r = max(min_rank, math.floor(keep * s.dense_params / s.params_per_rank))
        r = min(r, s.max_rank, s.breakeven_rank - 1)
        ranks[s.name] = r if r >= max(min_rank, 1) else None
    used = sum(s.params(ranks[s.name]) for s in shapes)
    while used > budget:  # take back from the layer furthest above its share
        s = max(
            (s for s in shapes if ranks[s.name] is not None and ranks[s.name] > min_rank),
            key=lambda s: s.params(ranks[s.name]) / s.dense_params,
        )
        ranks[s.name] -= 1
        used -= s.params_per_rank
    _fill(shapes, ranks, budget, order=lambda s: s.params(ranks[s.name]) / s.dense_params)
    return _finish(shapes, ranks)


def unified_ranks(
    shapes: Sequence[LayerShape], rank: int, *, attn: float = 1.0, wo: float = 6.0, ffn: float = 6.0
) -> RankAllocation:
    """Original FlashSVD CLI scaling: ``--rank 64`` → attn 64, wo 384, ffn 384 (clipped to max rank)."""
    check_rank(rank, 1 << 30)
    mult = {"attn": attn, "wo": wo, "ffn": ffn, "other": 1.0}
    ranks = {s.name: min(s.max_rank, max(1, round(rank * mult[s.kind]))) for s in shapes}
    return _finish(shapes, ranks)


def per_type_ranks(shapes: Sequence[LayerShape], ranks_by_kind: Mapping[str, int | None]) -> RankAllocation:
    """Separate ranks per projection type (``attn``/``wo``/``ffn``/``other``); a missing kind stays dense."""
    unknown = set(ranks_by_kind) - set(KINDS)
    if unknown:
        raise FlashSVDMethodError(f"unknown layer kind(s) {sorted(unknown)}; use {KINDS}.")
    return _finish(shapes, {s.name: ranks_by_kind.get(s.kind) for s in shapes})


def per_module_ranks(shapes: Sequence[LayerShape], ranks: Mapping[str, int | None]) -> RankAllocation:
    """Explicit ranks per module (``None`` or absent = dense); names not among ``shapes`` are an error."""
    unknown = set(ranks) - {s.name for s in shapes}
    if unknown:
        raise FlashSVDMethodError(f"ranks given for unknown module(s): {sorted(unknown)[:5]}...")
    return _finish(shapes, ranks)


def save_ranks(path: str | Path, allocation: RankAllocation, **meta: object) -> None:
    """Write a per-module ranks JSON (``{"ranks": {...}, "keep_fraction": ..., ...meta}``)."""
    Path(path).write_text(json.dumps({**allocation.to_json(), **meta}, indent=1, sort_keys=True))


def load_ranks(path: str | Path) -> dict[str, int | None]:
    """Read the ``ranks`` mapping of a per-module ranks JSON (plain ``{name: rank}`` also accepted)."""
    data = json.loads(Path(path).read_text())
    ranks = data.get("ranks", data) if isinstance(data, dict) else None
    if not isinstance(ranks, dict) or not all(v is None or isinstance(v, int) for v in ranks.values()):
        raise FlashSVDMethodError(
            f"{path}: expected a JSON object {{module: rank or null}} (optionally under 'ranks')."
        )
    return ranks


@dataclass
class RankPolicy:
    """A declarative rank policy; :func:`allocate_ranks` resolves it for a list of layers.

    Exactly one of ``keep_ratio``, ``rank``, ``ranks_by_kind``, ``ranks`` (per module, or a JSON path).
    """

    keep_ratio: float | None = None
    rank: int | None = None
    ranks_by_kind: Mapping[str, int | None] | None = None
    ranks: Mapping[str, int | None] | str | Path | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.keep_ratio, self.rank, self.ranks_by_kind, self.ranks)]
        if sum(given) != 1:
            raise FlashSVDMethodError(
                f"RankPolicy needs exactly one of keep_ratio, rank, ranks_by_kind, ranks (got {sum(given)})."
            )
        if self.keep_ratio is not None:
            check_keep_ratio(self.keep_ratio)


def allocate_ranks(
    shapes: Sequence[LayerShape], policy: RankPolicy | None = None, **kwargs
) -> RankAllocation:
    """Resolve ``policy`` (or ``RankPolicy(**kwargs)``) into per-layer ranks."""
    policy = policy or RankPolicy(**kwargs)
    if policy.keep_ratio is not None:
        return uniform_keep_ratio(shapes, policy.keep_ratio)
    if policy.rank is not None:
        return unified_ranks(shapes, policy.rank)
    if policy.ranks_by_kind is not None:
        return per_type_ranks(shapes, policy.ranks_by_kind)
    ranks = policy.ranks
    if isinstance(ranks, (str, Path)):
        ranks = load_ranks(ranks)
    return per_module_ranks(shapes, ranks)


# ---- non-uniform allocation ------------------------------------------------------------------------


def allocate_by_curves(
    shapes: Sequence[LayerShape],
    curves: Mapping[str, torch.Tensor],
    keep_ratio: float,
    *,
    min_rank: int = 1,
    allow_dense: bool = True,
    keep_dense: Collection[str] = (),
) -> RankAllocation:
    """Minimize ``Σ_l loss_l(r_l)`` under the keep_ratio budget.

    ``curves[name][r]`` is the (estimated) loss of layer ``name`` at rank ``r`` for ``r = 0..max_rank``
    (non-increasing; ``curves[name][max_rank]`` is the dense loss, usually 0). A Lagrangian search picks,
    for a price λ per parameter, each layer's best rank — or dense, which costs ``in·out`` and has loss
    ``curve[-1]`` — and bisects λ to the largest spend within budget; leftover budget then goes to the
    +1 rank steps with the largest loss decrease per parameter. Whitened tail energies, ASVD sensitivity
    tables and ARS mask scores all reduce to such curves.

    ``keep_dense``: names of layers to leave dense whatever their curves say (their parameters still
    count against the budget, so ``keep_ratio`` keeps its one meaning); the rest of the budget is spread
    over the other layers.
    """
    keep = check_keep_ratio(keep_ratio)
    unknown = set(keep_dense) - {s.name for s in shapes}
    if unknown:
        raise FlashSVDMethodError(f"keep_dense names layers that are not being allocated: {sorted(unknown)}.")
    budget = math.floor(keep * sum(s.dense_params for s in shapes))
    forced = sum(s.dense_params for s in shapes if s.name in keep_dense)
    if forced > budget:  # never at keep_ratio=1, whose budget is every layer's parameters
        raise InvalidKeepRatioError(
            f"the layers in keep_dense alone hold {forced} parameters, more than keep_ratio={keep} allows "
            f"({budget}); raise keep_ratio or keep fewer layers dense."
        )
    if keep == 1.0:
        return _finish(shapes, {s.name: None for s in shapes}, {s.name: "keep_ratio=1" for s in shapes})
    # curves computed on an accelerator are tiny: the search runs on the CPU
    curve_of = {s.name: torch.as_tensor(curves[s.name], dtype=torch.float64).flatten().cpu() for s in shapes}
    tabs = []
    for s in shapes:
        c = curve_of[s.name]
        if c.numel() != s.max_rank + 1:
            raise FlashSVDMethodError(
                f"curve of {s.name!r} has {c.numel()} entries, expected max_rank+1 = {s.max_rank + 1}."
            )
        hi = min_rank - 1 if s.name in keep_dense else min(s.max_rank, s.breakeven_rank - 1)
        r = torch.arange(min_rank, hi + 1)
        tabs.append((s, r, c[min_rank : hi + 1], r.to(torch.float64) * s.params_per_rank, float(c[-1])))

    def choose(lam: float) -> tuple[dict[str, int | None], int]:
        ranks, used = {}, 0
        for s, r, loss, cost, dense_loss in tabs:
            if r.numel() == 0:
                ranks[s.name], used = None, used + s.dense_params
                continue
            obj = loss + lam * cost
            i = int(torch.argmin(obj))
            if allow_dense and dense_loss + lam * s.dense_params < float(obj[i]):
                ranks[s.name], used = None, used + s.dense_params
            else:
                ranks[s.name], used = int(r[i]), used + int(cost[i])
        return ranks, used

    scale = max((float(t[2].max() - t[4]) for t in tabs if t[2].numel()), default=0.0) or 1.0
    lo, hi = 0.0, scale  # lam=0 → everything as large as possible; lam large → minimal ranks
    ranks, used = choose(hi)
    while used > budget and hi < scale * 1e12:
        hi *= 10.0
        ranks, used = choose(hi)
    if used > budget:
        raise _too_small(keep, shapes, min_rank, keep_dense)
    best = ranks
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ranks, used = choose(mid)
        if used <= budget:
            best, hi = ranks, mid
        else:
            lo = mid

    def gain(s: LayerShape) -> float:
        r = best[s.name]
        if r is None:
            return math.inf
        c = curve_of[s.name]
        return -float(c[r] - c[r + 1]) / s.params_per_rank if r < s.max_rank else math.inf

    _fill(shapes, best, budget, order=gain)
    reasons = {
        s.name: "kept dense on request (keep_dense); its parameters count against the budget"
        if s.name in keep_dense
        else "kept dense: its loss curve makes the dense layer worth its parameters under the budget"
        for s in shapes
        if best[s.name] is None
    }
    return _finish(shapes, best, reasons)


def round_ranks(
    shapes: Sequence[LayerShape],
    allocation: RankAllocation,
    multiple: int,
    keep_ratio: float,
    *,
    curves: Mapping[str, torch.Tensor] | None = None,
) -> RankAllocation:
    """Round every factored rank to a multiple of ``multiple`` within the same keep_ratio budget.

    GPU matmuls run much faster when the inner dimension is a multiple of the tile (the speed issue
    measured cuBLAS 2.3× slower at rank 460 than at 464), so the allocator hands out ranks in steps of
    ``multiple`` (per head for per-head layers). Each rank goes to its nearest multiple (at least
    ``multiple``, below the break-even rank); if that overshoots the budget, one step at a time is taken
    back where it costs least, then leftover budget is given back one step at a time where it helps
    most. "Costs least / helps most" is the loss decrease per parameter of ``curves`` when given (the
    curves :func:`allocate_by_curves` used), else the layer's kept share. The result never exceeds
    ``floor(keep_ratio · Σ in·out)`` and leaves less than one step of the largest layer unused (well
    within 0.5% of the budget for transformer-sized layers). Layers kept dense stay dense; a layer
    whose largest useful rank is below ``multiple`` keeps its rank and is listed in ``unrounded``.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise FlashSVDMethodError(f"rank multiple must be a positive integer, got {multiple!r}.")
    keep = check_keep_ratio(keep_ratio)
    if multiple == 1:
        return allocation
    by_name = {s.name: s for s in shapes}
    budget = math.floor(keep * sum(s.dense_params for s in shapes))
    ranks = dict(allocation.ranks)
    top = {s.name: (min(s.max_rank, s.breakeven_rank - 1) // multiple) * multiple for s in shapes}
    movable = [n for n, r in ranks.items() if r is not None and top[n] >= multiple]
    unrounded = tuple(n for n, r in ranks.items() if r is not None and top[n] < multiple)
    for n in movable:
        ranks[n] = min(top[n], max(multiple, multiple * round(ranks[n] / multiple)))
    curve = (
        None
        if curves is None
        else {n: torch.as_tensor(curves[n], dtype=torch.float64).cpu() for n in movable}
    )

    def delta(n: str, step: int) -> float:
        """Loss change per parameter of moving layer ``n`` by ``step`` ranks (or a share proxy)."""
        s, r = by_name[n], ranks[n]
        if curve is None:
            share = s.params(r) / s.dense_params  # take from the largest share, give to the smallest
            return share if step > 0 else -share
        return float(curve[n][r + step] - curve[n][r]) / (abs(step) * s.params_per_rank)

    used = sum(by_name[n].params(r) for n, r in ranks.items())
    while used > budget:
        down = [n for n in movable if ranks[n] > multiple]
        if not down:  # small budgets: round down instead; ranks already below one step stay as they are
            small = [n for n in movable if allocation.ranks[n] < multiple]
            unrounded += tuple(small)
            movable = [n for n in movable if n not in small]
            for n in small:
                ranks[n] = allocation.ranks[n]
            for n in movable:
                ranks[n] = (allocation.ranks[n] // multiple) * multiple
            used = sum(by_name[n].params(r) for n, r in ranks.items())
            break
        n = min(down, key=lambda n: delta(n, -multiple))
        ranks[n] -= multiple
        used -= multiple * by_name[n].params_per_rank
    while True:
        up = [
            n
            for n in movable
            if ranks[n] + multiple <= top[n] and used + multiple * by_name[n].params_per_rank <= budget
        ]
        if not up:
            break
        n = min(up, key=lambda n: delta(n, multiple))
        ranks[n] += multiple
        used += multiple * by_name[n].params_per_rank
    out = _finish(shapes, ranks, allocation.reasons)
    out.multiple, out.unrounded = multiple, unrounded
    return out


def spectrum_curves(
    spectra: Mapping[str, Sequence[torch.Tensor]], weights: Mapping[str, float] | None = None
):
    """Loss curves from (whitened) singular values: ``loss(r) = w · Σ_heads Σ_{i ≥ r} σ_i²``."""
    curves = {}
    for name, per_head in spectra.items():
        total = None
        for s in per_head:
            e = s.to(torch.float64).square()
            tail = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
            total = tail if total is None else total + tail
        curves[name] = total * (1.0 if weights is None else float(weights[name]))
    return curves


def asvd_sensitivity(
    shapes: Sequence[LayerShape],
    evaluate: Callable[[dict[str, int | None]], float],
    ratios: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """ASVD's sensitivity table: ``evaluate`` with one layer truncated to each parameter ratio.

    ``evaluate(ranks)`` receives ``{name: rank}`` for the single compressed layer (all others dense) and
    returns a loss/perplexity (lower is better). Returns ``{name: [(rank, loss), ...]}``.
    """
    table: dict[str, list[tuple[int, float]]] = {}
    for s in shapes:
        rows = []
        for ratio in ratios:
            r = max(1, min(s.max_rank, math.floor(ratio * s.dense_params / s.params_per_rank)))
            if not s.saves(r):
                continue
            rows.append((r, float(evaluate({s.name: r}))))
        table[s.name] = rows
        if progress is not None:
            progress(s.name)
    return table


def allocate_by_sensitivity(
    shapes: Sequence[LayerShape],
    sensitivity: Mapping[str, Sequence[tuple[int, float]]],
    keep_ratio: float,
) -> RankAllocation:
    """ASVD's sensitivity-based truncation rank search (STRS) over a parameter target.

    Binary search over a loss threshold ``τ``: every layer takes the smallest tested rank whose
    single-layer loss is ``≤ τ`` (dense if none). The smallest ``τ`` whose allocation fits the budget is
    chosen, and the leftover budget is filled one rank step at a time.
    """
    keep = check_keep_ratio(keep_ratio)
    budget = math.floor(keep * sum(s.dense_params for s in shapes))

    def pick(tau: float) -> dict[str, int | None]:
        out = {}
        for s in shapes:
            ok = [r for r, loss in sorted(sensitivity.get(s.name, [])) if loss <= tau]
            out[s.name] = ok[0] if ok else None
        return out

    def used(ranks):
        return sum(s.params(ranks[s.name]) for s in shapes)

    losses = sorted({loss for rows in sensitivity.values() for _, loss in rows})
    if not losses:
        raise FlashSVDMethodError("empty sensitivity table: run asvd_sensitivity first.")
    lo, hi = 0, len(losses) - 1  # index into candidate thresholds; higher τ → fewer parameters
    if used(pick(losses[hi])) > budget:
        raise InvalidKeepRatioError(
            f"keep_ratio={keep} cannot be met with the tested ratios; test smaller ratios in asvd_sensitivity."
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if used(pick(losses[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    ranks = pick(losses[lo])
    _fill(shapes, ranks, budget, order=lambda s: s.params(ranks[s.name]) / s.dense_params)
    return _finish(
        shapes,
        ranks,
        {
            s.name: "kept dense: no tested rank met the loss threshold"
            for s in shapes
            if ranks[s.name] is None
        },
    )


def search_keep_ratio_for_loss(
    allocate: Callable[[float], RankAllocation],
    evaluate: Callable[[dict[str, int | None]], float],
    target_loss: float,
    *,
    lo: float = 0.05,
    hi: float = 1.0,
    steps: int = 8,
) -> tuple[RankAllocation, float]:
    """ASVD's loss-target mode: bisect the smallest keep_ratio whose allocation evaluates ``≤ target_loss``."""
    best = allocate(hi)
    best_loss = float(evaluate(best.ranks))
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        alloc = allocate(mid)
        loss = float(evaluate(alloc.ranks))
        if loss <= target_loss:
            best, best_loss, hi = alloc, loss, mid
        else:
            lo = mid
    return best, best_loss
