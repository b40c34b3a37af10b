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
    """The bin holding each element's leading bit (zeros and tiny values: the lowest bin), as int8."""
    _, exp = torch.frexp(term)  # term = m · 2**exp, 0.5 <= |m| < 1: leading bit 2**(exp-1)
    b = torch.div(exp - 1, BIN_BITS, rounding_mode="floor").clamp_(_BIN_MIN, _BIN_MAX)
    return b.masked_fill_(term == 0, _BIN_MIN).to(torch.int8)


@dataclass
class ReproducibleSum:
    """A running float64 sum (any shape) with the same bits for any order and grouping of its terms.

    ``add_(term)`` adds a float64 tensor (or a block of rows of one, ``rows=slice``); ``value()`` is the
    float64 sum. Under ``torch.distributed``, ``flashsvd.methods.distributed.all_reduce_statistics``
    merges the processes' sums exactly (the bins' MAX, then the limbs' SUM).
    """

    hi: torch.Tensor
    lo: torch.Tensor
    bin: torch.Tensor
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
        if rows is None or rows.start in (None, 0):
            if self.n_terms >= MAX_TERMS:
                raise FlashSVDMethodError(
                    f"a calibration statistic received more than {MAX_TERMS} batches: pass fewer, larger "
                    "batches (the order-independent sum is exact up to that many)."
                )
            self.n_terms += 1
        term = term.to(torch.float64)
        hi, lo, b = (
            (self.hi, self.lo, self.bin) if rows is None else (self.hi[rows], self.lo[rows], self.bin[rows])
        )
        if term.shape != hi.shape:
            raise ValueError(f"term of shape {tuple(term.shape)} added to a sum of shape {tuple(hi.shape)}.")
        self._align(hi, lo, b, torch.maximum(b, _bin_of(term)))
        e = b.to(torch.int64) * BIN_BITS
        top = torch.trunc(term * _pow2(-e)) * _pow2(e)  # the digit in the top bin
        rest = term - top  # exact: ``top`` is ``term`` cut at a bin edge
        hi.add_(top)
        lo.add_(torch.trunc(rest * _pow2(BIN_BITS - e)) * _pow2(e - BIN_BITS))
        return self

    @staticmethod
    def _align(hi: torch.Tensor, lo: torch.Tensor, b: torch.Tensor, new: torch.Tensor) -> None:
        """Raise the top bins to ``new`` (>= ``b``): limbs move down one bin per step, the lowest is dropped."""
        step = new.to(torch.int16) - b.to(torch.int16)
        lo.copy_(torch.where(step == 0, lo, torch.where(step == 1, hi, 0.0)))
        hi.masked_fill_(step != 0, 0.0)
        b.copy_(new)

    def align_(self, new_bin: torch.Tensor) -> ReproducibleSum:
        """Express the sum on the bins ``new_bin`` (elementwise >= ``bin``; the all-reduce's MAX)."""
        self._align(self.hi, self.lo, self.bin, new_bin.to(device=self.bin.device, dtype=torch.int8))
        return self

    def value(self) -> torch.Tensor:
        """The float64 sum: ``hi + lo`` rounded once, so equal kept digits give equal bits."""
        return self.hi + self.lo

    def to(self, device: torch.device | str) -> ReproducibleSum:
        return ReproducibleSum(self.hi.to(device), self.lo.to(device), self.bin.to(device), self.n_terms)
