"""Shared small fixtures: low-rank-plus-noise weights and anisotropic inputs (CPU, float64)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
