"""Adaptive Rank Selection (ARS; Gao et al., NAACL 2024, "Adaptive Rank Selections for Low-Rank
Approximation of Large Language Models"). Alias: ``adasvd``.

A small hypernetwork (learned per-layer embeddings → GRU over the layer sequence → linear head) emits
one logit per singular value of every layer. Masks are sampled with a straight-through Gumbel-sigmoid
(hard 0/1 forward, soft gradient backward) and trained on::

    loss = objective(masks) + γ · (params(masks) / budget − 1)²

where ``params`` counts ``min(kept·(in+out), in·out)`` per layer (a layer whose mask keeps more than
the break-even rank costs — and is — dense). The default objective is label-free reconstruction: the
dropped share of each layer's (whitened) spectrum, ``Σ_l w_l Σ_i (1 − m_li) σ²_li / Σ_i σ²_li``, with
optional per-layer weights ``w_l`` (e.g. loss sensitivity); a task objective ``loss_fn(masks)`` that
runs a masked model can be added instead. The trained mask probabilities are then turned into
per-module ranks that hit the budget exactly (:func:`flashsvd.methods.ranks.allocate_by_curves`);
save them with :func:`flashsvd.methods.ranks.save_ranks` and feed them to any method.

The factorization registered as ``ars`` is whitening when a Gram matrix is available, else plain SVD:
ARS chooses ranks, not factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.ranks import KINDS, LayerShape, RankAllocation, allocate_by_curves, check_keep_ratio
from flashsvd.methods.svd import svd_method
from flashsvd.methods.whiten import whiten_method


class RankHypernetwork(nn.Module):
    """Per-layer embeddings → GRU → logits over ``max_rank`` singular-value slots per layer."""

    def __init__(self, n_layers: int, max_slots: int, features: torch.Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(n_layers, hidden) * 0.1)
        self.register_buffer("features", features)
        self.inp = nn.Linear(hidden + features.shape[1], hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, max_slots)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 2.0)  # start near "keep everything"

    def forward(self) -> torch.Tensor:
        z = torch.relu(self.inp(torch.cat([self.embed, self.features], dim=1)))
        h, _ = self.gru(z[None])
        return self.head(h[0])  # [layers, slots]


def gumbel_sigmoid(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: hard {0,1} values forward, sigmoid gradients backward."""
    u1 = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
    u2 = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
    noise = torch.log(torch.log(u2) / torch.log(u1))  # difference of two Gumbels
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


@dataclass
class ARSResult:
    allocation: RankAllocation
    probabilities: dict[str, torch.Tensor]
    history: list[tuple[float, float]]


def ars_select_ranks(
    shapes: Sequence[LayerShape],
    spectra: Mapping[str, Sequence[torch.Tensor]],
    keep_ratio: float,
    *,
    weights: Mapping[str, float] | None = None,
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    steps: int = 400,
    lr: float = 2e-2,
    tau: float = 0.5,
    budget_weight: float = 20.0,
    hidden: int = 64,
    seed: int = 0,
) -> ARSResult:
    """Train the hypernetwork and return budget-exact ranks.

    Args:
        shapes: the target layers.
        spectra: ``name → [σ per head]`` (whitened singular values for data-aware reconstruction;
            :func:`layer_spectrum` computes them).
        keep_ratio: kept fraction of the target layers' parameters.
        weights: optional per-layer importance multiplying the reconstruction term.
        loss_fn: optional extra differentiable objective of ``{name: mask [max_rank]}``.
    """
    keep = check_keep_ratio(keep_ratio)
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    n = len(shapes)
    slots = max(s.max_rank for s in shapes)
    energy = torch.zeros(n, slots, dtype=torch.float32)
    valid = torch.zeros(n, slots, dtype=torch.bool)
    for i, s in enumerate(shapes):
        e = sum(sv.to(torch.float64).square() for sv in spectra[s.name])
        e = e / e.sum().clamp_min(1e-300)
        w = 1.0 if weights is None else float(weights[s.name])
        energy[i, : s.max_rank] = (e[: s.max_rank] * w).to(torch.float32)
        valid[i, : s.max_rank] = True
    per_rank = torch.tensor([float(s.params_per_rank) for s in shapes])
    dense = torch.tensor([float(s.dense_params) for s in shapes])
    target = keep * float(dense.sum())
    feats = torch.stack(
        [
            torch.tensor(
                [
                    *(1.0 if s.kind == k else 0.0 for k in KINDS),
                    s.in_features / 1024.0,
                    s.out_features / 1024.0,
                    float(s.n_heads is not None),
                    i / max(1, n - 1),
                ]
            )
            for i, s in enumerate(shapes)
        ]
    )
    net = RankHypernetwork(n, slots, feats, hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    try:
        for _ in range(steps):
            logits = net()
            m = gumbel_sigmoid(logits, tau, gen) * valid
            recon = ((1.0 - m) * energy).sum()
            kept = m.sum(1)
            params = torch.minimum(kept * per_rank, dense).sum()
            loss = recon + budget_weight * (params / target - 1.0).square()
            if loss_fn is not None:
                loss = loss + loss_fn({s.name: m[i, : s.max_rank] for i, s in enumerate(shapes)})
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append((float(recon.detach()), float(params.detach()) / float(dense.sum())))
        with torch.no_grad():
            probs = torch.sigmoid(net()) * valid
    finally:
        torch.random.set_rng_state(torch_state)
    prob_of = {s.name: probs[i, : s.max_rank].to(torch.float64) for i, s in enumerate(shapes)}
    # Curve: probability mass (weighted by energy share, so ties follow the spectrum) left out at rank r.
    curves = {}
    for i, s in enumerate(shapes):
        score = prob_of[s.name] * (1.0 + energy[i, : s.max_rank].to(torch.float64))
        tail = torch.cat([score.flip(0).cumsum(0).flip(0), score.new_zeros(1)])
        curves[s.name] = tail
    allocation = allocate_by_curves(shapes, curves, keep)
    return ARSResult(allocation, prob_of, history)


def layer_spectrum(
    weight: torch.Tensor,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    damping: float = 0.0,
) -> list[torch.Tensor]:
    """Singular values (per head) of ``W S`` (whitened when ``stats`` has a Gram matrix, else of ``W``)."""
    from flashsvd.methods.linalg import split_heads, whitening_transform

    w = weight.to(torch.float64)
    if stats is not None and stats.has("gram"):
        w = whitening_transform(stats.gram, damping=damping).right(w)
    blocks = [w] if n_heads is None else split_heads(w, n_heads)
    return [torch.linalg.svdvals(b) for b in blocks]


def ars_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Factorize at an ARS-chosen rank: whitening if a Gram matrix is available, else SVD."""
    if stats is not None and stats.has("gram"):
        u, v, info = whiten_method(weight, rank, stats=stats, n_heads=n_heads, **options)
        return u, v, {**info, "base": "whiten"}
    u, v, info = svd_method(weight, rank, stats=None, n_heads=n_heads)
    return u, v, {**info, "base": "svd"}
