"""Sums of float64 tensors whose bits do not depend on the order of the terms.

Why: calibration statistics are sums over batches, and under ``torch.distributed`` each process sums its
shard before an all-reduce adds the shards. Plain float64 addition is not associative, so one process and
two processes get sums that differ in the last bit. That is harmless for one layer, but sequential
(block-by-block) calibration feeds each compressed block's outputs to the next: a last-bit difference
that flips one bf16 rounding in block 16 changes every later block (measured on a 32-layer model, 1 vs 2
H200s). A checkpoint must not depend on how many GPUs made it.

How (binned summation, after Demmel & Nguyen's reproducible BLAS): the float64 axis is cut into fixed
bins of ``BIN_BITS`` bits. Per element we keep the two highest bins that any term has reached (the top
bin index ``bin`` and two float64 limbs ``hi``, ``lo``). A term is split, at the fixed bin edges, into its
digit in the top bin and its digit in the next bin; everything below is dropped. Every digit is an
integer multiple of its bin's unit and smaller than ``2**BIN_BITS`` units, so each limb adds exactly for
up to :data:`MAX_TERMS` terms. When a larger term raises the top bin, the limbs shift down and the
lowest is dropped — exactly the digits that would have been dropped had that term come first. So the
kept digits, and their exact sums, are the same in any order and any grouping; the value ``hi + lo`` is
one correctly rounded float64 addition. Merging shards: all-reduce MAX of the bins, align, then an
all-reduce SUM of the limbs, which is exact for the same reason.

Precision: at least ``BIN_BITS`` (36) bits below the largest term of each element (2**-36 ≈ 1.5e-11
relative), 72 bits at best — per element, so small entries of a Gram matrix keep their own precision.
Memory: two float64 limbs and an int8 bin per element (2.1× a plain float64 sum).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashsvd.methods.errors import FlashSVDMethodError

#: width of one bin in bits; two bins are kept
BIN_BITS = 36
#: limbs stay exact for this many terms (``MAX_TERMS · 2**BIN_BITS < 2**53``)
MAX_TERMS = 1 << (52 - BIN_BITS)
#: bin range: ``2**(bin·BIN_BITS)`` and ``2**((bin-1)·BIN_BITS)`` stay normal float64 numbers
_BIN_MIN, _BIN_MAX = -(1008 // BIN_BITS) + 1, 1008 // BIN_BITS


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0**k`` for an integer tensor, built from the exponent bits (exact; ``-1022 <= k <= 1023``)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _bin_of(term: torch.Tensor) -> torch.Tensor:
    """The bin holding each element's leading bit, read from the exponent bits (zeros, subnormals: lowest)."""
    biased = (term.view(torch.int64) >> 52) & 0x7FF  # leading bit 2**(biased - 1023) for normal numbers
    b = torch.div(biased - 1023, BIN_BITS, rounding_mode="floor").clamp(_BIN_MIN, _BIN_MAX)
    return torch.where(biased == 0, _BIN_MIN, b)


def _raise_bins(hi: torch.Tensor, lo: torch.Tensor, b: torch.Tensor, new: torch.Tensor) -> None:
    """Move the limbs onto the top bins ``new`` (elementwise >= ``b``), in place: raising a bin by one moves
    ``hi`` into ``lo``; by two or more clears both (their digits fall below the two bins kept)."""
    step = new.to(torch.int64) - b.to(torch.int64)
    lo.copy_(torch.where(step == 0, lo, torch.where(step == 1, hi, 0.0)))
    hi.copy_(torch.where(step == 0, hi, 0.0))
    b.copy_(new)


def _add_into(term: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, b: torch.Tensor) -> None:
    """One term into the limbs, in place: align the bins to the term's, split it at the bin edges, add.

    Written as elementwise tensor ops only, so ``torch.compile`` fuses it into one kernel on CUDA (each
    op alone is a full pass over the matrix: eagerly, ~30 passes per batch cost as much as the Gram).
    """
    new = torch.maximum(b.to(torch.int64), _bin_of(term))
    _raise_bins(hi, lo, b, new)
    e = new * BIN_BITS
    top = torch.trunc(term * _pow2(-e)) * _pow2(e)  # the digit in the top bin
    rest = term - top  # exact: ``top`` is ``term`` cut at a bin edge
    hi.add_(top)
    lo.add_(torch.trunc(rest * _pow2(BIN_BITS - e)) * _pow2(e - BIN_BITS))


_FUSED: dict[str, Callable[..., None] | None] = {}

#: CPU sums at least this large run compiled too (inductor's C++ loop: one pass instead of ~30). SmolLM2's
#: 1,536² Gram on 2 cores: 0.54 s per term eager, 0.029 s compiled, after a one-time compile of ~34 s
#: (~9 s from inductor's disk cache), so small sums (tests, tiny models) stay eager.
CPU_FUSED_MIN_ELEMENTS = 1 << 18


def _fused_add_into() -> Callable[..., None] | None:
    """``_add_into`` compiled once (CUDA, and large CPU sums); ``None`` where compiling is not possible here."""
    if "fn" not in _FUSED:
        try:
            _FUSED["fn"] = torch.compile(_add_into, dynamic=True, fullgraph=True)
        except Exception as err:  # pragma: no cover - a torch without a working compiler
            warnings.warn(
                f"torch.compile is unavailable ({err}); reproducible sums run unfused.", stacklevel=3
            )
            _FUSED["fn"] = None
    return _FUSED["fn"]


@dataclass
class ReproducibleSum:
    """A running float64 sum (any shape) with the same bits for any order and grouping of its terms.

    ``add_(term)`` adds a float64 tensor (or a block of rows of one, ``rows=slice``); ``value()`` is the
    float64 sum. Under ``torch.distributed``, ``flashsvd.methods.distributed.all_reduce_statistics``
    merges the processes' sums exactly (the bins' MAX, then the limbs' SUM).
    """

    hi: torch.Tensor
    lo: torch.Tensor | None  # ``None`` once :meth:`settle_` consumed the sum
    bin: torch.Tensor | None
    n_terms: int = 0

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None
    ) -> ReproducibleSum:
        hi = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(
            hi, torch.zeros_like(hi), torch.full(hi.shape, _BIN_MIN, dtype=torch.int8, device=hi.device)
        )

    @classmethod
    def of(cls, term: torch.Tensor) -> ReproducibleSum:
        """A sum holding one term."""
        out = cls.zeros(term.shape, term.device)
        out.add_(term)
        return out

    @property
    def shape(self) -> torch.Size:
        return self.hi.shape

    @property
    def device(self) -> torch.device:
        return self.hi.device

    def add_(self, term: torch.Tensor, rows: slice | None = None) -> ReproducibleSum:
        """Add ``term`` (float64; with ``rows``, the rows ``rows`` of the sum only). Returns ``self``.

        ``n_terms`` counts calls that touch the whole sum, or the first row block of it, so a Gram matrix
        added block by block counts one term per batch.
        """
        self._check_open("start a new one")
        if rows is None or rows.start in (None, 0):
            if self.n_terms >= MAX_TERMS:
                raise FlashSVDMethodError(
                    f"a calibration statistic received more than {MAX_TERMS} batches: pass fewer, larger "
                    "batches (the order-independent sum is exact up to that many)."
                )
            self.n_terms += 1
        term = term.to(torch.float64).contiguous()
        hi, lo, b = (
            (self.hi, self.lo, self.bin) if rows is None else (self.hi[rows], self.lo[rows], self.bin[rows])
        )
        if term.shape != hi.shape:
            raise ValueError(f"term of shape {tuple(term.shape)} added to a sum of shape {tuple(hi.shape)}.")
        fused = _fused_add_into() if term.is_cuda or term.numel() >= CPU_FUSED_MIN_ELEMENTS else None
        if fused is not None:
            try:
                fused(term, hi, lo, b)
                return self
            except Exception as err:  # pragma: no cover - a compiler failure on this machine
                _FUSED["fn"] = None
                warnings.warn(
                    f"compiling the reproducible sum failed ({err}); running it unfused.", stacklevel=2
                )
        _add_into(term, hi, lo, b)
        return self

    def align_(self, new_bin: torch.Tensor) -> ReproducibleSum:
        """Express the sum on the bins ``new_bin`` (elementwise >= ``bin``; the all-reduce's MAX)."""
        self._check_open("it cannot be merged")
        _raise_bins(self.hi, self.lo, self.bin, new_bin.to(self.bin.device))
        return self

    @property
    def settled(self) -> bool:
        """Whether :meth:`settle_` consumed the limbs (only the value in ``hi`` is left)."""
        return self.lo is None or self.bin is None

    def _check_open(self, advice: str) -> None:
        if self.settled:
            raise FlashSVDMethodError(f"this sum was settled (read out in place by settle_()): {advice}.")

    def value(self) -> torch.Tensor:
        """The float64 sum: ``hi + lo`` rounded once, so equal kept digits give equal bits."""
        return self.hi if self.settled else self.hi + self.lo

    def settle_(self) -> torch.Tensor:
        """:meth:`value` computed into ``hi`` and the limbs dropped: the same bits without a new matrix.

        Why: once every term is in (and, under ``torch.distributed``, the shards are merged) only the
        value is needed, and the limbs are 2.1× its size — for a LLaMA-7B ``down_proj`` Gram, 2 GB that
        would otherwise sit on the GPU beside the factorization. The sum cannot be added to afterwards.
        """
        if self.settled:
            return self.hi
        self.hi.add_(self.lo)
        self.lo = self.bin = None
        return self.hi

    def to(self, device: torch.device | str) -> ReproducibleSum:
        if self.settled:
            return ReproducibleSum(self.hi.to(device), None, None, self.n_terms)
        return ReproducibleSum(self.hi.to(device), self.lo.to(device), self.bin.to(device), self.n_terms)
