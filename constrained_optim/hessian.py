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

:class:`BatchedDenseBFGS` and :class:`BatchedLBFGS` hold one such approximation for each of B independent
problems (a (B, n, n) tensor; (B, k, n) pairs) and apply the same rules to every problem at once: the
damping, the skip test and the first scaling are decided per problem, and ``update``/``reset``/``apply``
act on the problems listed in ``idx`` only.
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


def _damp_batched(s: Tensor, y: Tensor, Hy: Tensor, theta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of (A, n) pairs: Powell-damped ``s``, its curvature ``sᵀy`` and whether the pair is kept."""
    sy, yHy = (s * y).sum(-1), (y * Hy).sum(-1)
    damp = sy < theta * yHy
    tau = torch.where(damp, (1 - theta) * yHy / torch.where(damp, yHy - sy, 1.0), 1.0)
    s = torch.where(damp[:, None], tau[:, None] * s + (1 - tau[:, None]) * Hy, s)
    sy = (s * y).sum(-1)
    scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return s, sy, torch.isfinite(sy) & torch.isfinite(scale) & (sy > 1e-14 * scale)


class BatchedDenseBFGS:
    """B inverse BFGS matrices stored densely, (B, n, n)."""

    def __init__(self, batch: int, n: int, dtype: torch.dtype, device: torch.device, damping: float = 1e-4):
        self.n, self.damping = n, damping
        self.H = torch.eye(n, dtype=dtype, device=device).repeat(batch, 1, 1)
        self.updates = torch.zeros(batch, dtype=torch.int64, device=device)

    def reset(self, idx: Tensor) -> None:
        """``H_b ← I`` for the problems ``idx``."""
        self.H[idx] = torch.eye(self.n, dtype=self.H.dtype, device=self.H.device)
        self.updates[idx] = 0

    def apply(self, V: Tensor, idx: Tensor) -> Tensor:
        """``H_b V_b`` for the problems ``idx``; ``V`` is (A, n, r)."""
        return self.H[idx] @ V

    def update(self, s: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """One damped update per problem ``idx`` (rows of s, y: (A, n)); returns which pairs were kept."""
        H = self.H[idx]
        sy0, yy = (s * y).sum(-1), (y * y).sum(-1)
        first = (self.updates[idx] == 0) & (sy0 > 0) & (yy > 0) & torch.isfinite(sy0 / yy)
        H = torch.where(first[:, None, None], (sy0 / torch.where(first, yy, 1.0))[:, None, None] * H, H)
        Hy = (H @ y[:, :, None])[:, :, 0]
        s, sy, kept = _damp_batched(s, y, Hy, self.damping)
        rho = torch.where(kept, 1.0 / torch.where(kept, sy, 1.0), 0.0)[:, None, None]
        Hy_s = Hy[:, :, None] * s[:, None, :]
        yHy = (y * Hy).sum(-1)[:, None, None]
        H_new = H - rho * (Hy_s + Hy_s.mT) + (rho * rho * yHy + rho) * (s[:, :, None] * s[:, None, :])
        self.H[idx] = torch.where(kept[:, None, None], 0.5 * (H_new + H_new.mT), H)
        self.updates[idx] += kept.to(torch.int64)
        return kept

    def state_dict(self) -> dict:
        return {"H": self.H.clone(), "updates": self.updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.H = state["H"].to(dtype=self.H.dtype, device=self.H.device).clone()
        self.updates = state["updates"].to(self.updates.device).clone()


class BatchedLBFGS:
    """B limited-memory inverse BFGS approximations: the last ``memory`` pairs of each problem, (B, k, n),
    newest last; a problem with fewer pairs has zero pairs in front, which the recursion skips (ρ = 0)."""

    def __init__(self, batch: int, n: int, dtype: torch.dtype, device: torch.device, memory: int,
                 damping: float = 1e-4):
        self.memory, self.damping = memory, damping
        self.S = torch.zeros(batch, memory, n, dtype=dtype, device=device)
        self.Y = torch.zeros_like(self.S)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)   # pairs held, <= memory
        self.updates = torch.zeros(batch, dtype=torch.int64, device=device)

    def reset(self, idx: Tensor) -> None:
        self.S[idx] = 0.0
        self.Y[idx] = 0.0
        self.count[idx] = 0
        self.updates[idx] = 0

    def apply(self, V: Tensor, idx: Tensor) -> Tensor:
        """``H_b V_b`` for the problems ``idx`` by the two-loop recursion, all columns of V (A, n, r) at once."""
        S, Y, count = self.S[idx], self.Y[idx], self.count[idx]
        k = self.memory
        held = torch.arange(k, device=S.device) >= k - count[:, None]           # (A, k)
        sy = (S * Y).sum(-1)
        rho = torch.where(held, 1.0 / torch.where(held, sy, 1.0), 0.0)
        Q = V.clone()
        alphas = [None] * k
        for i in reversed(range(k)):
            alphas[i] = rho[:, i, None] * (S[:, i, :, None] * Q).sum(1)          # (A, r)
            Q = Q - Y[:, i, :, None] * alphas[i][:, None, :]
        yy = (Y[:, -1] * Y[:, -1]).sum(-1)
        gamma = torch.where(count > 0, sy[:, -1] / torch.where(count > 0, yy, 1.0), 1.0)
        R = gamma[:, None, None] * Q
        for i in range(k):
            beta = rho[:, i, None] * (Y[:, i, :, None] * R).sum(1)
            R = R + S[:, i, :, None] * (alphas[i] - beta)[:, None, :]
        return R

    def update(self, s: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """Append one damped pair per problem ``idx`` (dropping its oldest); returns which pairs were kept."""
        s, sy, kept = _damp_batched(s, y, self.apply(y[:, :, None], idx)[:, :, 0], self.damping)
        keep = kept[:, None, None]
        self.S[idx] = torch.where(keep, torch.cat([self.S[idx][:, 1:], s[:, None]], 1), self.S[idx])
        self.Y[idx] = torch.where(keep, torch.cat([self.Y[idx][:, 1:], y[:, None]], 1), self.Y[idx])
        self.count[idx] = torch.where(kept, (self.count[idx] + 1).clamp(max=self.memory), self.count[idx])
        self.updates[idx] += kept.to(torch.int64)
        return kept

    def state_dict(self) -> dict:
        return {"S": self.S.clone(), "Y": self.Y.clone(), "count": self.count.clone(), "updates": self.updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("S", "Y", "count", "updates"):
            old = getattr(self, key)
            setattr(self, key, state[key].to(dtype=old.dtype, device=old.device).clone())
