"""Triton device function for storing fp32 tiles in the kernel's I/O dtype.

Why a module: every kernel (FFN, prefill and decode attention) narrows fp32 accumulators to fp16/bf16
before a ``tl.dot`` or a store, and the interpreter needs the same rounding fix in all of them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``x.to(dtype)``; under the interpreter, round fp32 -> bf16 to nearest-even by hand.

    Triton's CPU interpreter *truncates* fp32 -> bf16 conversions (a ~2.8e-3 relative bias that
    doubles a kernel's error against the float64 oracle); compiled code rounds correctly, so the
    flag is only set for interpreter + bf16 runs.
    """
    if INTERPRET_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
