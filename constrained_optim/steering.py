"""The penalty QP direction and penalty-parameter steering (Curtis, Mitchell & Overton 2017).

Violation and exact penalty, with ``c = [c_I; c_E]``:

    v(x) = Σ_i max(c_I,i, 0) + Σ_j |c_E,j|,        φ(x; μ) = μ f(x) + v(x).

Direction: the penalty QP ``min_d μ∇fᵀd + ½ dᵀH⁻¹d + v(c + J d)`` is solved through its dual, a box
QP of size m (never n):

    min_y ½ yᵀ (J H Jᵀ) y + (μ J H ∇f − c)ᵀ y    s.t.  0 ≤ y_I ≤ 1,  −1 ≤ y_E ≤ 1,
    d(μ) = −H (μ ∇f + Jᵀ y).

Steering, with the predicted violation reduction ``ℓ(d) = v(c) − v(c + J d)``:
  1. accept d(μ) if ``ℓ(d(μ)) ≥ c_v v(x)``;
  2. else accept it if ``ℓ(d(μ)) ≥ c_v ℓ(d(0))``;
  3. else try μ ← c_μ μ, c_μ² μ, ..., c_μ^r μ (r = ``max_reductions``) and then, where the penalty
     needs a much smaller μ to be exact, c_μ^r μ 10⁻¹, ..., c_μ^r μ 10⁻⁶, taking the first that passes
     test 2 (the last one if none does).
All candidate penalties of a stage are solved as one batch of QPs. μ never increases.

For B independent problems (:meth:`Steering.batch_direction`) the same rule runs per problem, with one
QP batch per stage for all of them: stage one solves d(μ) of every problem; stage two, for the problems
that fail test 1 only, d(0) and the candidate penalties of step 3 together (tests 2 and 3 then pick).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .hessian import Sandwich
from .qp import QPResult, solve_box_qp


def violation(c: Tensor, p: int) -> Tensor:
    """``v = Σ max(c_I, 0) + Σ |c_E|`` over the last dimension."""
    return c[..., :p].clamp(min=0).sum(-1) + c[..., p:].abs().sum(-1)


def violation_weights(c: Tensor, p: int) -> Tensor:
    """``w`` with ``Jᵀw ∈ ∂v``: 1 on violated inequalities, sign(c_E) on equalities, 0 elsewhere (over the
    last dimension)."""
    return torch.cat([(c[..., :p] > 0).to(c.dtype), torch.sign(c[..., p:])], dim=-1)


def at_rounding(c: Tensor, floor: Tensor, p: int) -> Tensor:
    """The rows within their rounding ``δ = floor`` of the bound, whose sign in v is rounding: ``c_I <= δ_I``,
    ``|c_E| <= δ_E`` (over the last dimension)."""
    return torch.cat([c[..., :p] <= floor[..., :p], c[..., p:].abs() <= floor[..., p:]], dim=-1)


def phi_noise(f: Tensor | float, c: Tensor, mu: Tensor | float, floor: Tensor, p: int, eps: float) -> Tensor:
    """The rounding error of ``φ = μ f + v(c)`` near a point: ``10 eps μ|f|`` (``eps``: of the dtype f and c were
    computed in, the parameters', not the float64 they are kept in) plus the rounding ``δ_i = floor`` of each
    row that can enter v (equalities, inequalities above ``−δ_i``), over the last dimension. Near an active
    constraint it is that constraint's rounding which hides a decrease of μ f, the more so the smaller f is scaled."""
    enters = torch.cat([c[..., :p] >= -floor[..., :p], torch.ones_like(c[..., p:], dtype=torch.bool)], dim=-1)
    return 10 * eps * mu * abs(f) + torch.where(enters, floor, 0.0).sum(-1)


@dataclass
class Direction:
    d: Tensor             # (n,) search direction
    mu: float             # penalty parameter it was computed for
    y: Tensor             # (m,) dual solution (QP multipliers, μ-scaled)
    qp_ok: bool           # the QP that gave d was solved


@dataclass
class BatchedDirection:
    d: Tensor             # (A, n) search directions
    mu: Tensor            # (A,) penalty parameters they were computed for
    y: Tensor             # (A, m) dual solutions
    qp_ok: Tensor         # (A,) the QP that gave d was solved
    qp: QPResult          # the stage-one QP batch (A, 1): warm start of the next iteration


class Steering:
    """Computes steered directions for one problem; holds the constants of the rule.

    ``slack`` (absolute, a fraction of the feasibility tolerance) is subtracted from the right-hand
    sides of tests 1 and 2.
    """

    def __init__(self, c_v: float = 0.1, c_mu: float = 0.9, max_reductions: int = 10, slack: float = 0.0,
                 qp_tol: float = 1e-10, backend: str = "builtin"):
        self.c_v, self.c_mu, self.max_reductions, self.slack = c_v, c_mu, max_reductions, slack
        self.warm = None      # the last solved QP batch: warm start of the next (state of a run)
        self.qp_tol, self.backend = qp_tol, backend

    def reset(self) -> None:
        self.warm = None

    def direction(self, c: Tensor, p: int, sandwich: Sandwich, mu: float) -> Direction:
        """The steered direction at a point with constraints ``c`` and ``sandwich = H.sandwich(J, ∇f)``
        (``J H Jᵀ``, ``J H ∇f`` and the step of a dual solution)."""
        m = c.numel()
        M, Jg = sandwich.M, sandwich.JHg
        M = 0.5 * (M + M.T)
        lower = torch.cat([c.new_zeros(p), -c.new_ones(m - p)])
        upper = c.new_ones(m)
        v = float(violation(c, p))

        def solve(mus: Tensor):
            # the previous iteration's answer seeds the active set (same shapes: the first batch)
            warm = self.warm if self.warm is not None and self.warm.z.shape == (mus.numel(), m) else None
            res = solve_box_qp(M, mus[:, None] * Jg - c, lower, upper, tol=self.qp_tol, warm_start=warm,
                               backend=self.backend)
            if mus.numel() == 2:
                self.warm = res
            Y = res.z.to(c.dtype)
            JD = -(mus[:, None] * Jg + Y @ M)               # J d for every candidate, (K, m)
            ell = v - violation(c + JD, p)
            return Y, ell, res.solved

        # Violations below the feasibility tolerance are QP-accuracy noise: the tests get that much slack
        # so that μ is not driven to zero near a feasible point (where ℓ(d) >= 0 is asked for).
        slack = self.slack
        Y, ell, ok = solve(c.new_tensor([mu, 0.0]))
        ell_mu, ell_ref = float(ell[0]), float(ell[1])
        if ell_mu >= self.c_v * v - slack or ell_mu >= self.c_v * ell_ref - slack:
            return _make(sandwich, mu, Y[0], bool(ok[0]))
        mus = self._candidates(mu, c)
        Yr, ellr, okr = solve(mus)
        passed = (ellr >= self.c_v * ell_ref - slack).nonzero()
        i = int(passed[0]) if passed.numel() else mus.numel() - 1
        return _make(sandwich, float(mus[i]), Yr[i], bool(okr[i]))

    def batch_direction(self, g: Tensor, c: Tensor, J: Tensor, p: int, apply_H: Callable[[Tensor], Tensor],
                        mu: Tensor, warm: QPResult | None = None) -> BatchedDirection:
        """Steered directions of A independent problems: rows of ``g`` (A, n), ``c`` (A, m), ``J`` (A, m, n),
        ``mu`` (A,); ``apply_H(V)`` is ``H_a V_a`` for V (A, n, r). ``warm``: an earlier stage-one batch (A, 1)."""
        m = c.shape[-1]
        HV = apply_H(torch.cat([g[:, :, None], J.mT], dim=2))  # [H∇f, HJᵀ] per problem in one application
        Hg, HJt = HV[:, :, 0], HV[:, :, 1:]
        M = J @ HJt
        M = 0.5 * (M + M.mT)
        Jg = (J @ Hg[:, :, None])[:, :, 0]
        lower = torch.cat([c.new_zeros(p), -c.new_ones(m - p)])
        upper = c.new_ones(m)
        v = violation(c, p)

        def solve(M, Jg, c, v, mus, warm=None):
            # mus (R, K): K candidate penalties for each of R problems, one QP batch (R, K)
            res = solve_box_qp(M[:, None], mus[..., None] * Jg[:, None] - c[:, None], lower, upper, tol=self.qp_tol,
                               warm_start=warm, backend=self.backend)
            Y = res.z.to(c.dtype)
            JD = -(mus[..., None] * Jg[:, None] + Y @ M)    # J d for every candidate, (R, K, m)
            return res, Y, v[:, None] - violation(c[:, None] + JD, p)

        res, Y, ell = solve(M, Jg, c, v, mu[:, None], warm)
        y, ok = Y[:, 0].clone(), res.solved[:, 0].clone()
        F = (ell[:, 0] < self.c_v * v - self.slack).nonzero().squeeze(-1)     # test 1 fails
        if F.numel():
            mu = mu.clone()
            factors = torch.cat([c.new_zeros(1), self._candidates(1.0, c)])
            mus = mu[F, None] * factors                                          # 0, then the candidates
            res_r, Y_r, ell_r = solve(M[F], Jg[F], c[F], v[F], mus)
            bar = self.c_v * ell_r[:, :1] - self.slack                           # test 2: c_v ℓ(d(0)) - slack
            keep = ell[F, :1] >= bar
            test = ell_r[:, 1:] >= bar
            # the first candidate that passes test 2, the last one if none does
            i = 1 + torch.where(test.any(1), test.long().argmax(1), test.shape[1] - 1)
            rows = torch.arange(F.numel(), device=c.device)
            y[F] = torch.where(keep, y[F], Y_r[rows, i])
            mu[F] = torch.where(keep[:, 0], mu[F], mus[rows, i])
            ok[F] = torch.where(keep[:, 0], ok[F], res_r.solved[rows, i])
        d = -(mu[:, None] * Hg + (HJt @ y[:, :, None])[:, :, 0])
        return BatchedDirection(d, mu, y, ok, res)

    def _candidates(self, mu: float, c: Tensor) -> Tensor:
        """μ c_μ^j (j = 1..max_reductions), then μ c_μ^max_reductions 10^-k (k = 1..6)."""
        j = torch.arange(1, self.max_reductions + 1, dtype=c.dtype, device=c.device)
        k = torch.arange(1, 7, dtype=c.dtype, device=c.device)
        last = self.c_mu ** self.max_reductions
        return mu * torch.cat([self.c_mu ** j, last * 10.0 ** -k])


def _make(sandwich: Sandwich, mu: float, y: Tensor, ok: bool) -> Direction:
    """``d(μ) = −H (μ ∇f + Jᵀ y)``."""
    return Direction(sandwich.direction(mu, y), mu, y, ok)
