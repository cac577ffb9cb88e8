"""The stationarity measure of the KKT certificate.

Given gradients of ``f`` and Jacobians of ``c = [c_I; c_E]`` at ``k`` points (``k = 1``: the current
point; ``k > 1``: nearby iterates, *gradient sampling* for nonsmooth problems), fit multipliers by

    min_{w, λ}  ½ ‖ Σ_j w_j ∇f_j + Σ_j J_jᵀ λ_j ‖²  +  ½ Σ_j Σ_{i∈I} (κ_i ‖∇c_i‖ λ_{j,i})²
    s.t.        w ≥ 0,  Σ_j w_j = 1,   λ_{j,I} ≥ 0,

(a row equal at all k points, of a constraint linear in x, has one multiplier λ_i for all of them), where
``κ_i = σ_i / (σ_i + tol_ineq)`` with ``σ_i = max(0, −c_i / min(1, ‖∇c_i‖₂) − tol_ineq)`` (0 for
constraints whose value *and* first-order distance to their boundary are within the tolerance, which count as
active; → 1 for clearly inactive ones) charges a multiplier on an inactive constraint as much as the residual
it removes, so that complementarity is part of the fit. The distance matters for badly scaled constraints: one
scaled by 1e-8 is not "active" wherever its value is below an absolute 1e-8. The objective weights sum to one and the multipliers scale with
``f``: the measures below do not depend on the penalty parameter, on the BFGS matrix or on a positive
rescaling of ``f`` (or of any constraint):

    stationarity    = ‖ Σ_j w_j ∇f_j + Σ_j J_jᵀ λ_j ‖∞ / s
    complementarity = max_{i∈I} κ_i ‖∇c_i‖∞ Σ_j λ_{j,i} / s,        s = max(‖∇f(x)‖∞, g_ref).

Rows are normalized by ``‖∇c_i‖`` and ``∇f`` by ``s`` before the QP so that it is well scaled. At one point the
QP needs only ``J Jᵀ`` and ``J ∇f`` (m-sized), and the residual one product ``Jᵀ λ``.

:func:`measure_batched` is the single-point fit (k = 1) for A independent problems, one QP batch for all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ._flat import max_abs
from .jacobian import Jacobian
from .qp import QPResult, solve_box_qp, solve_qp


@dataclass
class Stationarity:
    stationarity: float
    complementarity: float
    multipliers: Tensor  # (m,) λ = Σ_j λ_j, in the units of f per unit of c
    solved: bool
    qp: QPResult | None = None  # the fit at one point (k = 1): a warm start for the next fit
    points: int = 1             # the points the fit used (k, or fewer under ``max_size``)


@dataclass
class BatchedStationarity:
    stationarity: Tensor     # (A,)
    complementarity: Tensor  # (A,)
    multipliers: Tensor      # (A, m)
    solved: Tensor           # (A,) bool
    qp: QPResult             # the fit batch (A,): a warm start for the next


def measure(grads: Tensor, jacobians: Sequence[Jacobian], c: Tensor, p: int, g_scale: float, tol_ineq: float,
            warm_start: QPResult | None = None, max_size: int | None = None,
            Jg: Tensor | None = None) -> Stationarity:
    """Fit multipliers and measure stationarity and complementarity (see module doc).

    Args:
        grads: (k, n) objective gradients, row 0 at the current point.
        jacobians: the k constraint Jacobians (m, n) at the same points.
        c: (m,) constraint values at the current point, inequalities first.
        p: number of inequality rows.
        g_scale: the gradient scale ``s`` (positive).
        tol_ineq: inequality feasibility tolerance (sets ``κ``).
        warm_start: the ``qp`` of an earlier single-point measure with the same m (speed only).
        max_size: the most variables of the sampled fit's QP (k > 1): only the first points that fit are used.
        Jg: ``J₀ ∇f₀`` when the caller has it (a pass over J saved; single-point fit only).
    """
    J0 = jacobians[0]
    m, n = J0.shape
    unit, live = _safe(J0.row_norms())
    kappa, lower, upper = _activity(c, unit, live, p, tol_ineq)
    qp = None
    if len(jacobians) == 1:
        # (∇f and the residual in the units of f, scaled as m-vectors and by the norm: no scaled n-vector)
        gram = J0.gram() / (unit[:, None] * unit[None, :])        # unit rows: J_u J_uᵀ
        qp = solve_box_qp(gram + torch.diag(kappa * kappa), (J0 @ grads[0] if Jg is None else Jg) / (unit * g_scale), lower, upper,
                          warm_start=warm_start)
        lam_unit, solved, points = qp.z, bool(qp.solved), 1
        residual = max_abs(J0.rmatmul(qp.z * (g_scale / unit), base=grads[0])) / g_scale
    else:
        J = torch.stack([Js.to_dense().to(grads.dtype) for Js in jacobians]) / unit[:, None]
        lam_unit, r, solved, points = _sampled(grads / g_scale, J, kappa, lower, upper, max_size)
        residual = max_abs(r)
    lam = lam_unit / unit * g_scale
    charged = (kappa * lam.abs())[:p]
    # ‖∇c_i‖∞ (a pass over J) only where a multiplier sits on a clearly inactive row
    comp = charged * J0.row_amax()[:p] if bool((charged > 0).any()) else charged
    return Stationarity(
        stationarity=residual,
        complementarity=float(comp.max() / g_scale) if p else 0.0,
        multipliers=lam,
        solved=solved,
        qp=qp,
        points=points,
    )


def measure_batched(g: Tensor, J: Tensor, c: Tensor, p: int, g_scale: Tensor, tol_ineq: float,
                    warm_start: QPResult | None = None) -> BatchedStationarity:
    """The single-point measure (k = 1, see module doc) of A independent problems, one box QP batch.

    Args:
        g: (A, n) objective gradients. J: (A, m, n) constraint Jacobians. c: (A, m) constraint values,
            inequalities first. p: inequality rows. g_scale: (A,) gradient scales ``s`` (positive).
        tol_ineq: inequality feasibility tolerance. warm_start: an earlier batch of the same shape (speed only).
    """
    n = g.shape[-1]
    unit, live = _row_norms(J)
    Ju = J / unit[..., None]
    gu = g / g_scale[:, None]
    kappa, lower, upper = _activity(c, unit, live, p, tol_ineq)
    qp = solve_box_qp(Ju @ Ju.mT + torch.diag_embed(kappa * kappa), (Ju @ gu[..., None])[..., 0], lower, upper,
                      warm_start=warm_start)
    r = gu + (Ju.mT @ qp.z[..., None])[..., 0]
    lam = qp.z / unit * g_scale[:, None]
    comp = kappa[:, :p] * J[:, :p].abs().amax(-1) * lam[:, :p].abs()
    zero = torch.zeros_like(g_scale)
    return BatchedStationarity(
        stationarity=r.abs().amax(-1) if n else zero,
        complementarity=comp.amax(-1) / g_scale if p else zero,
        multipliers=lam, solved=qp.solved, qp=qp)


def _activity(c: Tensor, unit: Tensor, live: Tensor, p: int, tol_ineq: float) -> tuple[Tensor, Tensor, Tensor]:
    """``κ`` (see module doc) and the bounds of the multipliers (λ_I >= 0; 0 for zero rows), over the last
    dimension of ``c`` (m) and ``unit``/``live`` (the row norms of J and which rows are nonzero)."""
    kappa = torch.zeros_like(c)
    slack = (-c[..., :p] / unit[..., :p].clamp(max=1.0) - tol_ineq).clamp(min=0)
    kappa[..., :p] = slack / (slack + tol_ineq)
    lower = torch.full_like(c, float("-inf"))
    lower[..., :p] = 0.0
    upper = torch.where(live, torch.full_like(c, float("inf")), torch.zeros_like(c))
    lower = torch.where(live, lower, torch.zeros_like(c))
    return kappa, lower, upper


def _sampled(g: Tensor, J: Tensor, kappa: Tensor, lower: Tensor, upper: Tensor, max_size: int | None = None):
    """The sampled fit (k points, the first ones that keep the QP within ``max_size`` variables). Rows equal at
    every point (constraints linear in x, bounds) get one multiplier for all points instead of one per point
    (``Σ_j J_jᵀλ_j = J_iᵀ Σ_j λ_j`` for such a row i): the QP has ``k + s + k (m − s)`` variables for s such rows,
    not ``k (1 + m)``."""
    k, m, n = J.shape
    shared = (J == J[:1]).all(dim=2).all(dim=0)
    own = ~shared
    s = int(shared.sum())
    o = m - s
    if max_size is not None:
        k = max(1, min(k, (max_size - s) // (1 + o)))
        g, J = g[:k], J[:k]
    C = torch.cat([g.T, J[0, shared].T, J[:, own].reshape(k * o, n).T], dim=1)   # (n, k + s + k o)
    zeros = torch.zeros(k, dtype=g.dtype, device=g.device)
    penalty = torch.cat([zeros, kappa[shared] ** 2, (kappa[own] ** 2).repeat(k)])
    Q = C.T @ C + torch.diag(penalty)
    size = k + s + k * o
    lo = torch.cat([zeros, lower[shared], lower[own].repeat(k)])
    hi = torch.cat([torch.full((k,), float("inf"), dtype=g.dtype, device=g.device), upper[shared], upper[own].repeat(k)])
    eye = torch.eye(size, dtype=g.dtype, device=g.device)
    has_lo, has_hi = torch.isfinite(lo), torch.isfinite(hi)
    G = torch.cat([-eye[has_lo], eye[has_hi]])
    h = torch.cat([-lo[has_lo], hi[has_hi]])
    A = torch.cat([torch.ones(1, k, dtype=g.dtype, device=g.device),
                   torch.zeros(1, size - k, dtype=g.dtype, device=g.device)], dim=1)
    b = torch.ones(1, dtype=g.dtype, device=g.device)
    res = solve_qp(Q, torch.zeros(size, dtype=g.dtype, device=g.device), G, h, A, b)
    z = res.z
    lam = torch.zeros(m, dtype=g.dtype, device=g.device)
    lam[shared] = z[k:k + s]
    lam[own] = z[k + s:].reshape(k, o).sum(dim=0)
    return lam, C @ z, bool(res.solved), k


def infeasibility(J: Jacobian, c: Tensor, p: int, tol_ineq: float, tol_eq: float) -> float:
    """Stationarity of the violation ``v`` at an infeasible point (small: locally infeasible).

        min_y ‖Jᵀy‖∞ / max_i ‖∇c_i‖∞   over  y ∈ ∂v:
        y_i = 1 (c_I,i > tol), y_i ∈ [0, 1] (|c_I,i| <= tol), y_i = 0 (c_I,i < −tol),
        y_j = sign(c_E,j) (|c_E,j| > tol), y_j ∈ [−1, 1] (|c_E,j| <= tol),

    over the violated and nearly active rows (the QP minimizes ‖Jᵀy‖₂). Rows are normalized, so the
    measure does not depend on the scaling of the constraints.
    """
    norms, _ = _safe(J.row_norms())
    ci, ce = c[:p], c[p:]
    lower = torch.cat([(ci > tol_ineq).to(c.dtype), torch.where(ce.abs() > tol_eq, torch.sign(ce), -torch.ones_like(ce))])
    upper = torch.cat([(ci >= -tol_ineq).to(c.dtype), torch.where(ce.abs() > tol_eq, torch.sign(ce), torch.ones_like(ce))])
    res = solve_box_qp(J.gram() / (norms[:, None] * norms[None, :]), torch.zeros_like(c), lower, upper)
    if not bool(res.solved):
        return float("inf")
    return float((J.T @ (res.z / norms)).abs().max())


def infeasibility_batched(J: Tensor, c: Tensor, p: int, tol_ineq: float, tol_eq: float) -> Tensor:
    """:func:`infeasibility` of independent problems, J (..., m, n) and c (..., m): one QP batch; inf where its
    QP is not solved."""
    norms, _ = _row_norms(J)
    unit = J / norms[..., None]
    ci, ce = c[..., :p], c[..., p:]
    signs = torch.where(ce.abs() > tol_eq, torch.sign(ce), torch.ones_like(ce))
    lower = torch.cat([(ci > tol_ineq).to(c.dtype), torch.where(ce.abs() > tol_eq, signs, -signs)], dim=-1)
    upper = torch.cat([(ci >= -tol_ineq).to(c.dtype), signs], dim=-1)
    res = solve_box_qp(unit @ unit.mT, torch.zeros_like(c), lower, upper)
    value = (unit.mT @ res.z[..., None])[..., 0].abs().amax(-1)
    return torch.where(res.solved, value, torch.full_like(value, float("inf")))


def _safe(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Row norms with 1 for zero rows (safe divisors), and which rows are nonzero."""
    live = norms > 0
    return torch.where(live, norms, torch.ones_like(norms)), live


def _row_norms(J: Tensor) -> tuple[Tensor, Tensor]:
    """Row 2-norms of a dense J (..., m, n), safe as divisors (see :func:`_safe`)."""
    return _safe(torch.linalg.vector_norm(J, dim=-1))
