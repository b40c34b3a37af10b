"""Low-rank linear layers in the project-wide ``u``/``v`` layout (see ``docs/architecture.md``).

Why these modules: they replace ``nn.Linear`` (or GPT-2's ``Conv1D``) inside Hugging Face modules
while keeping the HF forward code untouched, which gives the "torch" backend (plain low-rank
matmuls) for free and keeps the module names (hence the state-dict keys) HF-like.  The flash runtime
blocks read the same parameters (``u``, ``v``, ``bias``) and call the fused kernels instead.

* :class:`LowRankLinear` — ``y = (x·u)·v + b`` with ``u: [in, r]``, ``v: [r, out]``, or per head
  ``u: [in, H·r]``, ``v: [H, r, d_head]`` (head ``h`` = ``P[..., h·r:(h+1)·r]·v[h]``).
* :class:`FusedLinear` — a fused projection (GPT-2 ``c_attn``, ModernBERT ``Wqkv``/``Wi``) split into
  named parts whose outputs are concatenated; each part is low-rank or dense.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["FusedLinear", "LowRankLinear", "dense_weight_and_bias", "linear_from_dense"]


def dense_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [out, in], b [out] or None)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``.

    ``Conv1D`` stores ``weight: [in, out]`` (``y = x·W + b``), the transpose of ``nn.Linear``.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.T, module.bias
    if isinstance(module, LowRankLinear):
        return module.merged_weight(), module.bias
    raise TypeError(f"cannot read a dense weight from {type(module).__name__}: expected nn.Linear or Conv1D")


def linear_from_dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight [out, in]`` and ``bias`` (copied)."""
    lin = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class LowRankLinear(nn.Module):
    """``y = (x·u)·v + b`` — a rank-``r`` replacement of a dense ``[out, in]`` linear layer.

    Args:
        u: ``[in, r]`` (or ``[in, H·r]`` per head).
        v: ``[r, out]`` (or ``[H, r, d_head]`` per head).
        bias: ``[out]`` or ``None``.
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if u.dim() != 2 or v.dim() not in (2, 3):
            raise ValueError(
                f"u must be [in, r] and v [r, out] or [H, r, d_head]; got {tuple(u.shape)}, {tuple(v.shape)}"
            )
        cols = v.shape[0] * v.shape[1] if v.dim() == 3 else v.shape[0]
        if u.shape[1] != cols:
            raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} disagree on the rank dimension")
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)
        out = v.shape[0] * v.shape[2] if v.dim() == 3 else v.shape[1]
        if bias is not None and bias.shape != (out,):
            raise ValueError(f"bias must be [{out}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        n_heads: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Uninitialized factors of the right shapes (checkpoint loading fills them)."""
        kw = {"device": device, "dtype": dtype}
        if n_heads:
            d_head = out_features // n_heads
            u, v = torch.empty(in_features, n_heads * rank, **kw), torch.empty(n_heads, rank, d_head, **kw)
        else:
            u, v = torch.empty(in_features, rank, **kw), torch.empty(rank, out_features, **kw)
        return cls(u, v, torch.empty(out_features, **kw) if bias else None)

    @classmethod
    def from_factorization(cls, factorization, *, dtype: torch.dtype | None = None) -> LowRankLinear:
        """From a :class:`flashsvd.methods.Factorization` (``u``, ``v``, ``bias``)."""
        f = factorization
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        bias = None if f.bias is None else cast(f.bias.detach().clone())
        return cls(cast(f.u.detach().contiguous()), cast(f.v.detach().contiguous()), bias)

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def per_head(self) -> bool:
        return self.v.dim() == 3

    @property
    def n_heads(self) -> int | None:
        return int(self.v.shape[0]) if self.per_head else None

    @property
    def rank(self) -> int:
        return int(self.v.shape[1] if self.per_head else self.v.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.u.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.v.shape[0] * self.v.shape[2] if self.per_head else self.v.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The merged ``[out, in]`` weight (for code that inspects ``.weight``, e.g. dtype/device)."""
        return self.merged_weight()

    def extra_repr(self) -> str:
        heads = f", heads={self.n_heads}" if self.per_head else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}{heads}, bias={self.bias is not None}"

    def head_bias(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """A per-head projection's bias as ``[heads, d_head]`` (heads ``start:stop``), or ``None``."""
        return None if self.bias is None else self.bias.view(self.n_heads, -1)[start:stop]

    # ---- compute ---------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-space projection ``P = x·u`` (``[..., r]`` or ``[..., H·r]``)."""
        return x @ self.u

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        """``P·v + b`` back to ``[..., out]``."""
        if self.per_head:
            heads, r, _ = self.v.shape
            y = torch.einsum("...hr,hrd->...hd", p.unflatten(-1, (heads, r)), self.v).flatten(-2)
            return y if self.bias is None else y + self.bias
        if self.bias is None:
            return p @ self.v
        # bias in the GEMM's epilogue (a separate broadcast add costs a full pass over the output)
        return torch.addmm(self.bias, p.reshape(-1, p.shape[-1]), self.v).view(*p.shape[:-1], self.v.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.project(x))

    def merged_weight(self) -> torch.Tensor:
        """Dense ``[out, in]`` weight ``(u·v)ᵀ``."""
        if not self.per_head:
            return (self.u @ self.v).T
        heads, r, d = self.v.shape
        u = self.u.reshape(self.in_features, heads, r).permute(1, 0, 2)
        return torch.bmm(u, self.v).permute(0, 2, 1).reshape(heads * d, self.in_features)

    def to_dense(self) -> nn.Linear:
        """An equivalent ``nn.Linear`` (``W = (u·v)ᵀ``)."""
        with torch.no_grad():
            return linear_from_dense(self.merged_weight(), self.bias)


class FusedLinear(nn.Module):
    """A fused projection split into named parts; the output concatenates the parts' outputs.

    Used where HF fuses several projections in one matrix (GPT-2 ``c_attn`` = q|k|v, ModernBERT
    ``Wqkv`` and ``Wi`` = input|gate): each part gets its own factors (per head for q/k/v).
    """

    def __init__(self, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))

    @property
    def in_features(self) -> int:
        return next(iter(self.parts.values())).in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts.values())

    @property
    def weight(self) -> torch.Tensor:
        """The merged ``[out, in]`` weight (a computed tensor, for code that inspects ``.weight``)."""
        return self.merged_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts.values()], dim=-1)

    def merged_weight(self) -> torch.Tensor:
        return torch.cat([dense_weight_and_bias(p)[0] for p in self.parts.values()], dim=0)

    def merged_bias(self) -> torch.Tensor | None:
        biases = [dense_weight_and_bias(p)[1] for p in self.parts.values()]
        if all(b is None for b in biases):
            return None
        return torch.cat(
            [
                b if b is not None else p.weight.new_zeros(p.out_features)
                for b, p in zip(biases, self.parts.values())
            ]
        )

    def to_dense(self) -> nn.Linear:
        with torch.no_grad():
            return linear_from_dense(self.merged_weight(), self.merged_bias())
