"""Small batched linear algebra helpers and the KKT regularisation shared by the QP solvers."""

from __future__ import annotations

import torch
from torch import Tensor

_F64 = torch.float64
# Regularisation of the (unit-diagonal, equilibrated) KKT matrices; iterative refinement
# against the unregularised matrix removes its bias.
_DELTA = 1e-10
_REFINE_STEPS = 2


def _mv(M: Tensor, x: Tensor) -> Tensor:
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def _mtv(M: Tensor, x: Tensor) -> Tensor:
    return (x.unsqueeze(-2) @ M).squeeze(-2)


def _amax(x: Tensor) -> Tensor:
    """Max-abs over the last dim; 0 for an empty last dim."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return x.abs().amax(-1)


def _where_b(cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.where with a per-problem (B,) condition."""
    return torch.where(cond.view(cond.shape + (1,) * (a.dim() - 1)), a, b)


def _nan_to_zero(v: Tensor) -> Tensor:
    return torch.where(v.isfinite(), v, 0.0)
