"""Damped BFGS approximations ``H ≈ ∇²φ⁻¹`` of the inverse Hessian, applied as operators.

Both classes expose ``apply(V) = H V`` for a vector (n,) or a matrix (n, r) of columns, ``update(s, y)``
and ``reset()``.

Inverse BFGS update with ``ρ = 1 / sᵀy``:

    H₊ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ

Damping (the inverse form of Powell's rule): if ``sᵀy < θ yᵀHy`` the step is replaced by
``s ← τ s + (1 − τ) H y`` with ``τ = (1 − θ) yᵀHy / (yᵀHy − sᵀy)``, which makes ``sᵀy = θ yᵀHy > 0``
so that ``H`` stays positive definite on nonconvex or nonsmooth functions. A pair whose curvature is
still not positive and finite is skipped.

:class:`DenseBFGS` stores the n×n matrix (initially ``I``, rescaled by ``sᵀy / yᵀy`` before the first
update). :class:`LBFGS` stores the last ``k`` pairs and applies ``H`` with the two-loop recursion to
all columns of ``V`` at once; its initial matrix is ``γ I`` with ``γ = sᵀy / yᵀy`` of the newest pair.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _damp(s: Tensor, y: Tensor, Hy: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Powell-damped ``s`` and its curvature ``sᵀy``."""
    sy, yHy = s.dot(y), y.dot(Hy)
    if sy < theta * yHy:
        tau = (1 - theta) * yHy / (yHy - sy)
        s = tau * s + (1 - tau) * Hy
        sy = s.dot(y)
    return s, sy


def _acceptable(sy: Tensor, s: Tensor, y: Tensor) -> bool:
    scale = torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)
    return bool(torch.isfinite(sy) & torch.isfinite(scale) & (sy > 1e-14 * scale))


class DenseBFGS:
    """Inverse BFGS matrix stored densely (n×n): for n up to a few thousand."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, damping: float = 1e-4):
        self.n, self.dtype, self.device, self.damping = n, dtype, device, damping
        self.reset()

    def reset(self) -> None:
        self.H = torch.eye(self.n, dtype=self.dtype, device=self.device)
        self.updates = 0

    def apply(self, V: Tensor) -> Tensor:
        return self.H @ V

    def update(self, s: Tensor, y: Tensor) -> bool:
        """Apply one damped BFGS update; returns False when the pair was skipped."""
        if self.updates == 0:
            sy0, yy = s.dot(y), y.dot(y)
            if sy0 > 0 and yy > 0 and torch.isfinite(sy0 / yy):
                self.H = (sy0 / yy) * self.H
        Hy = self.H @ y
        s, sy = _damp(s, y, Hy, self.damping)
        if not _acceptable(sy, s, y):
            return False
        rho = 1.0 / sy
        Hy_s = torch.outer(Hy, s)
        self.H = self.H - rho * (Hy_s + Hy_s.T) + (rho * rho * y.dot(Hy) + rho) * torch.outer(s, s)
        self.H = 0.5 * (self.H + self.H.T)
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {"H": self.H.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.H = state["H"].to(dtype=self.dtype, device=self.device).clone()
        self.updates = int(state["updates"])


class LBFGS:
    """Limited-memory inverse BFGS: the last ``memory`` pairs, O(memory·n) storage, never an n×n matrix."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, memory: int, damping: float = 1e-4):
        self.n, self.dtype, self.device, self.memory, self.damping = n, dtype, device, memory, damping
        self.reset()

    def reset(self) -> None:
        self.S: list[Tensor] = []
        self.Y: list[Tensor] = []
        self.updates = 0

    def _gamma(self) -> Tensor | float:
        if not self.S:
            return 1.0
        return self.S[-1].dot(self.Y[-1]) / self.Y[-1].dot(self.Y[-1])

    def apply(self, V: Tensor) -> Tensor:
        """``H V`` by the two-loop recursion, all columns of ``V`` at once."""
        Q = V.clone()
        alphas = []
        for s, y in zip(reversed(self.S), reversed(self.Y)):
            a = (s @ Q) / s.dot(y)
            Q = Q - (torch.outer(y, a) if Q.dim() == 2 else y * a)
            alphas.append(a)
        R = self._gamma() * Q
        for (s, y), a in zip(zip(self.S, self.Y), reversed(alphas)):
            b = (y @ R) / s.dot(y)
            R = R + (torch.outer(s, a - b) if R.dim() == 2 else s * (a - b))
        return R

    def update(self, s: Tensor, y: Tensor) -> bool:
        s, sy = _damp(s, y, self.apply(y), self.damping)
        if not _acceptable(sy, s, y):
            return False
        self.S.append(s.clone())
        self.Y.append(y.clone())
        if len(self.S) > self.memory:
            self.S.pop(0)
            self.Y.pop(0)
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {"S": [s.clone() for s in self.S], "Y": [y.clone() for y in self.Y], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.S = [s.to(dtype=self.dtype, device=self.device).clone() for s in state["S"]]
        self.Y = [y.to(dtype=self.dtype, device=self.device).clone() for y in state["Y"]]
        self.updates = int(state["updates"])
