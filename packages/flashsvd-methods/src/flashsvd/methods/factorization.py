"""The result of factorizing one weight: low-rank factors in the project-wide u/v layout.

A dense ``nn.Linear`` computes ``y = x @ W.T + b`` with ``W: [out, in]``. Its low-rank form is
``y = (x @ u) @ v + b`` with ``u: [in, r]`` and ``v: [r, out]``, i.e. ``W ≈ (u @ v).T``.
Per-head factors (attention projections) use ``u: [in, H * r]`` (one block of ``r`` columns per head)
and ``v: [H, r, d_head]``; head ``h`` is ``(x @ u[:, h*r:(h+1)*r]) @ v[h]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Factorization:
    """Low-rank factors of one ``[out, in]`` weight.

    Attributes:
        u: ``[in, r]`` or, per head, ``[in, H * r]``.
        v: ``[r, out]`` or, per head, ``[H, r, d_head]``.
        bias: ``[out]`` or ``None`` (carried through unchanged).
        rank: the rank (per head when ``v`` is 3-D).
        method: canonical name of the method that produced the factors.
        error: relative Frobenius error ``‖W − Ŵ‖ / ‖W‖`` of the merged approximation.
        data_error: relative data-weighted error ``‖(W − Ŵ) Xᵀ‖ / ‖W Xᵀ‖`` when a Gram matrix was
            available, else ``None``.
        info: free-form method details (e.g. the jitter a Cholesky needed).
    """

    u: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    rank: int
    method: str
    error: float | None = None
    data_error: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def per_head(self) -> bool:
        return self.v.dim() == 3

    @property
    def n_heads(self) -> int | None:
        return int(self.v.shape[0]) if self.per_head else None

    @property
    def in_features(self) -> int:
        return int(self.u.shape[0])

    @property
    def out_features(self) -> int:
        if self.per_head:
            return int(self.v.shape[0] * self.v.shape[2])
        return int(self.v.shape[1])

    @property
    def num_parameters(self) -> int:
        """Parameters of the factors (``u`` and ``v``); the bias is not counted (dense keeps it too)."""
        return int(self.u.numel() + self.v.numel())

    @property
    def dense_parameters(self) -> int:
        return self.in_features * self.out_features

    def merged_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` approximation ``Ŵ`` (same dtype as the factors)."""
        if not self.per_head:
            return (self.u @ self.v).T.contiguous()
        heads, r, _ = self.v.shape
        u = self.u.reshape(self.in_features, heads, r).permute(1, 0, 2)  # [H, in, r]
        w_t = torch.bmm(u, self.v)  # [H, in, d_head]
        return w_t.permute(0, 2, 1).reshape(self.out_features, self.in_features).contiguous()

    def to(self, *args: Any, **kwargs: Any) -> Factorization:
        """Move/cast the tensors (like ``Tensor.to``); returns a new Factorization."""
        bias = None if self.bias is None else self.bias.to(*args, **kwargs)
        return Factorization(
            self.u.to(*args, **kwargs),
            self.v.to(*args, **kwargs),
            bias,
            self.rank,
            self.method,
            self.error,
            self.data_error,
            dict(self.info),
        )
