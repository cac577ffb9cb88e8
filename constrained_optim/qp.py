r"""Batched convex quadratic programming in PyTorch.

Problem (one per batch element, leading dimensions broadcast):

.. math::
    \min_z \tfrac12 z^\top Q z + p^\top z \quad\text{s.t.}\quad G z \le h,\; A z = b,
    \qquad Q \succeq 0 \text{ (possibly singular)}.

KKT conditions with multipliers :math:`\lambda \ge 0`, :math:`\nu`, slack :math:`s = h - Gz \ge 0`:

.. math::
    Qz + p + G^\top\lambda + A^\top\nu = 0,\quad Az = b,\quad \lambda \circ s = 0.

Methods (all arithmetic in float64, on the device of the inputs):

* Jacobi equilibration: :math:`z = D\tilde z` with :math:`D = \mathrm{diag}(Q)^{-1/2}` (1 where the
  diagonal vanishes) and rows of :math:`G, A` scaled to unit max-norm, so badly scaled data
  (diagonal entries 1e-8 next to 1e8) become unit-diagonal problems.
* Box QPs (``solve_box_qp``): primal-dual active-set method (semismooth Newton on
  :math:`y = \min(\max(\cdot))` complementarity, Hintermüller-Ito-Kunisch). With
  :math:`y = \mu_u - \mu_l` it predicts :math:`\mathcal A_u = \{y + (z-u) > 0\}`,
  :math:`\mathcal A_l = \{y + (z-l) < 0\}`, fixes those variables at their bound, solves
  :math:`Q_{II} z_I = -p_I - Q_{IA} z_A` (regularised Cholesky plus iterative refinement, so a
  singular :math:`Q` yields *a* minimiser) and sets :math:`y_A = -(Qz+p)_A`. It terminates
  exactly once the active set is right; problems where it stalls or cycles fall back to the
  interior point method below.
* General QPs: infeasible-start primal-dual interior point method with Mehrotra
  predictor-corrector. Eliminating :math:`\Delta s, \Delta\lambda` with :math:`W = \lambda / s`
  leaves the quasi-definite system

  .. math::
      \begin{bmatrix} Q + G^\top W G + \delta I & A^\top \\ A & -\delta I \end{bmatrix}
      \begin{bmatrix}\Delta z\\ \Delta\nu\end{bmatrix} = \dots

  (LU, one refinement step against :math:`\delta = 0`). Near convergence the active set
  :math:`\{\lambda > s\}` is *polished*: the equality-constrained KKT system for that active set is
  solved directly, which gives the exact (to rounding) solution.
* Infeasibility: the phase-1 problem :math:`\min \tfrac12\|Az-b\|^2 + \tfrac12\|t\|^2` s.t.
  :math:`Gz - t \le h` (always feasible) is solved for elements that did not converge; a
  non-zero optimal violation means INFEASIBLE. Boxes with :math:`l > u` are INFEASIBLE at once.

Residual (``QPResult.residual``, original units, float64) is the max of the relative terms

* stationarity :math:`\|Qz+p+G^\top\lambda+A^\top\nu\|_\infty / (1+\max(\|Qz\|_\infty,\|p\|_\infty,
  \|G^\top\lambda\|_\infty,\|A^\top\nu\|_\infty))`,
* inequality violation :math:`\|(Gz-h)_+\|_\infty / (1+\max(\|Gz\|_\infty,\|h\|_\infty))`,
* equality violation :math:`\|Az-b\|_\infty / (1+\max(\|Az\|_\infty,\|b\|_\infty))`,
* complementarity :math:`\max_i|\lambda_i (h-Gz)_i| / (1+\|\lambda\|_\infty\max(\|Gz\|_\infty,\|h\|_\infty))`,
* dual sign :math:`\|(-\lambda)_+\|_\infty / (1+\|\lambda\|_\infty)` (and :math:`|\lambda_i|` for absent rows).

For box QPs :math:`G = [-I; I]`, :math:`h = [-l; u]`, and rows with infinite bounds are ignored.
A problem is SOLVED when ``residual <= tol``.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QPResult", "QPStatus", "solve_box_qp", "solve_qp"]

_F64 = torch.float64
# Regularisation of the (unit-diagonal, equilibrated) KKT matrices; iterative refinement
# against the unregularised matrix removes its bias.
_DELTA = 1e-10
_REFINE_STEPS = 2
# The polished active-set KKT system is often degenerate (dependent active rows, singular Q):
# more refinement steps drive its regularisation bias below rounding.
_POLISH_REFINE_STEPS = 8
# The active-set method gets at most this many iterations before falling back to the IPM.
_PDAS_MAX_ITER = 15
# Polishing is tried once the interior point residual is below this.
_POLISH_FROM = 1e-4
# Phase-1 violation (relative) above which a problem is declared infeasible.
_INFEASIBLE_VIOLATION = 1e-7


class QPStatus(enum.IntEnum):
    SOLVED = 0
    MAX_ITER = 1
    INFEASIBLE = 2
    NUMERICAL = 3


@dataclass
class QPResult:
    """Solution of a batch of QPs; see the module docstring for ``residual``."""

    z: Tensor
    status: Tensor
    lam: Tensor
    nu: Tensor
    iterations: Tensor
    residual: Tensor

    @property
    def solved(self) -> Tensor:
        return self.status == QPStatus.SOLVED


@dataclass
class _Problem:
    """Flattened float64 batch: Q (B,n,n), p (B,n), G (B,m,n), h (B,m), A (B,k,n), b (B,k).

    ``rows`` (B,m) marks the inequality rows that exist (box bounds may be infinite).
    """

    Q: Tensor
    p: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    rows: Tensor

    def index(self, idx: Tensor) -> _Problem:
        return _Problem(*(t[idx] for t in (self.Q, self.p, self.G, self.h, self.A, self.b, self.rows)))


# ----------------------------------------------------------------------------------------------
# small batched linear algebra helpers


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


# ----------------------------------------------------------------------------------------------
# KKT residual and equilibration


def _kkt_residual(P: _Problem, z: Tensor, lam: Tensor, nu: Tensor) -> Tensor:
    Qz, Gz, Az = _mv(P.Q, z), _mv(P.G, z), _mv(P.A, z)
    GTl, ATn = _mtv(P.G, lam), _mtv(P.A, nu)
    h = torch.where(P.rows, P.h, 0.0)
    Gz = torch.where(P.rows, Gz, 0.0)
    slack = h - Gz
    ineq_scale = 1 + torch.maximum(_amax(Gz), _amax(h))
    lam_max = _amax(lam)
    terms = (
        _amax(Qz + P.p + GTl + ATn)
        / (1 + torch.stack([_amax(Qz), _amax(P.p), _amax(GTl), _amax(ATn)]).amax(0)),
        _amax(slack.clamp(max=0.0)) / ineq_scale,
        _amax(Az - P.b) / (1 + torch.maximum(_amax(Az), _amax(P.b))),
        _amax(lam * slack) / (1 + lam_max * ineq_scale),
        # multipliers must be >= 0, and 0 on absent rows (infinite bounds)
        _amax(torch.where(P.rows, lam.clamp(max=0.0), lam)) / (1 + lam_max),
    )
    return torch.stack(terms).amax(0)


def _column_scale(Q: Tensor) -> Tensor:
    """D = diag(Q)^{-1/2} (1 where the diagonal is zero), so that DQD has unit diagonal."""
    diag = Q.diagonal(dim1=-2, dim2=-1)
    return torch.where(diag > 1e-300, diag.clamp(min=1e-300).rsqrt(), 1.0)


def _row_scale(M: Tensor) -> Tensor:
    norm = _amax(M)
    return torch.where(norm > 1e-300, 1.0 / norm.clamp(min=1e-300), 1.0)


# ----------------------------------------------------------------------------------------------
# primal-dual active-set method for  l <= z <= u  (equilibrated data, unit diagonal)


def _box_active_set(
    Q: Tensor, p: Tensor, lower: Tensor, upper: Tensor, z: Tensor, y: Tensor, max_iter: int, done_fn
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns z, y = mu_upper - mu_lower, per-problem iterations and a converged mask."""
    B, n = p.shape
    eye = torch.eye(n, dtype=_F64, device=p.device)
    iterations = torch.zeros(B, dtype=torch.int64, device=p.device)
    running = torch.ones(B, dtype=torch.bool, device=p.device)
    converged = torch.zeros_like(running)
    prev_up = prev_lo = None
    for _ in range(max_iter):
        up = (y + (z - upper) > 0) & upper.isfinite()
        lo = (y + (z - lower) < 0) & lower.isfinite() & ~up
        active = up | lo
        if prev_up is not None:
            # an unchanged active set that did not converge will not converge: stop it
            running &= ((up != prev_up) | (lo != prev_lo)).any(-1)
        prev_up, prev_lo = up, lo
        free = (~active).to(_F64)
        z_fixed = torch.where(up, upper, torch.where(lo, lower, 0.0))
        M = Q * (free.unsqueeze(-1) * free.unsqueeze(-2)) + torch.diag_embed(1 - free)
        rhs = torch.where(active, z_fixed, -p - _mv(Q, z_fixed))
        z_new = _regularised_solve(M, rhs, eye * _DELTA, free)
        y_new = torch.where(active, -(_mv(Q, z_new) + p), 0.0)
        ok = running & z_new.isfinite().all(-1)
        z, y = _where_b(ok, z_new, z), _where_b(ok, y_new, y)
        iterations += running.to(torch.int64)
        converged |= ok & done_fn(z, y)
        running &= ~converged & ok
        if not bool(running.any()):
            break
    return z, y, iterations, converged


def _regularised_solve(M: Tensor, rhs: Tensor, reg: Tensor, free: Tensor) -> Tensor:
    """Solve the PSD system M x = rhs via Cholesky of M + reg*diag(free) plus refinement."""
    L, _ = torch.linalg.cholesky_ex(M + reg * free.unsqueeze(-1))
    x = torch.cholesky_solve(rhs.unsqueeze(-1), L)
    for _ in range(_REFINE_STEPS):
        x = x + torch.cholesky_solve(rhs.unsqueeze(-1) - M @ x, L)
    return x.squeeze(-1)


# ----------------------------------------------------------------------------------------------
# interior point method for the general problem (equilibrated data)


def _lu_solver(K: Tensor, K_reg: Tensor, refine_steps: int = _REFINE_STEPS):
    """Solve K x = r with the LU factors of K_reg and refinement against K."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(K_reg)

    def solve(r: Tensor) -> Tensor:
        x = torch.linalg.lu_solve(LU, pivots, r.unsqueeze(-1))
        for _ in range(refine_steps):
            x = x + torch.linalg.lu_solve(LU, pivots, r.unsqueeze(-1) - K @ x)
        return x.squeeze(-1)

    return solve


def _quasi_definite(H: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """K = [[H, A^T], [A, 0]] and its regularisation diag(+delta I, -delta I)."""
    n, k = H.shape[-1], A.shape[-2]
    K = torch.cat([torch.cat([H, A.mT], -1), torch.cat([A, A.new_zeros(A.shape[:-2] + (k, k))], -1)], -2)
    sign = torch.cat([H.new_ones(n), -H.new_ones(k)])
    return K, K + torch.diag_embed(sign * _DELTA).expand_as(K)


def _max_step(v: Tensor, dv: Tensor, rows: Tensor) -> Tensor:
    """Largest alpha with v + alpha dv >= 0 over existing rows (inf if none blocks); NaN-safe."""
    blocking = (dv < 0) & rows
    ratio = torch.where(blocking, -v / torch.where(blocking, dv, -1.0), torch.inf)
    return ratio.amin(-1) if ratio.shape[-1] > 0 else v.new_full(v.shape[:-1], torch.inf)


def _ipm(P: _Problem, tol: float, max_iter: int, residual_fn, polish_guess: Tensor | None):
    """Mehrotra predictor-corrector. Returns z, lam, nu, iterations, residual."""
    B, n = P.p.shape
    m, k = P.h.shape[-1], P.b.shape[-1]
    rows = P.rows
    rowf = rows.to(_F64)
    count = rowf.sum(-1).clamp(min=1)
    G, h = P.G * rowf.unsqueeze(-1), P.h * rowf
    iterations = torch.zeros(B, dtype=torch.int64, device=P.p.device)

    def newton_system(W: Tensor):
        H = P.Q + (G.mT * W.unsqueeze(-2)) @ G
        return _lu_solver(*_quasi_definite(H, P.A))

    def direction(solve, r_d, r_in, r_eq, r_c, lam, s):
        rhs = torch.cat([-r_d - _mtv(G, (r_c + lam * r_in) / s), -r_eq], -1)
        x = solve(rhs)
        dz, dnu = x[..., :n], x[..., n:]
        ds = (-r_in - _mv(G, dz)) * rowf
        dlam = (r_c - lam * ds) / s * rowf
        return dz, ds, dlam, dnu

    # initial point: minimise 1/2 z'Qz + p'z + 1/2 |Gz - h|^2 s.t. Az = b, then shift s, lam > 0
    solve = newton_system(rowf)
    x = solve(torch.cat([-P.p + _mtv(G, h), P.b], -1))
    z, nu = x[..., :n], x[..., n:]
    s = h - _mv(G, z)
    lam = -s
    s = torch.where(rows, s + (1 - _masked_min(s, rows)).clamp(min=0).unsqueeze(-1), 1.0)
    lam = torch.where(rows, lam + (1 - _masked_min(lam, rows)).clamp(min=0).unsqueeze(-1), 0.0)
    z, lam, nu = _nan_to_zero(z), _nan_to_zero(lam), _nan_to_zero(nu)
    s = torch.where(s.isfinite(), s, 1.0)

    best = (z, lam, nu)
    best_res = torch.full((B,), torch.inf, dtype=_F64, device=P.p.device)
    if polish_guess is not None:
        best, best_res = _polish(P, polish_guess & rows, best, best_res, residual_fn)
    running = best_res > tol
    for _ in range(max_iter):
        if not bool(running.any()):
            break
        r_d = _mv(P.Q, z) + P.p + _mtv(G, lam) + _mtv(P.A, nu)
        r_in = (_mv(G, z) + s - h) * rowf
        r_eq = _mv(P.A, z) - P.b
        mu = (s * lam * rowf).sum(-1) / count
        solve = newton_system(lam / s * rowf)
        # predictor (affine scaling) step
        aff = direction(solve, r_d, r_in, r_eq, -s * lam * rowf, lam, s)
        alpha = _step(s, lam, aff, rows, 1.0)
        mu_aff = ((s + alpha * aff[1]) * (lam + alpha * aff[2]) * rowf).sum(-1) / count
        sigma = torch.where(mu > 0, (mu_aff / mu.clamp(min=1e-300)).clamp(0, 1) ** 3, 0.0)
        # corrector: centring plus second-order term
        r_c = (-s * lam + (sigma * mu).unsqueeze(-1) - aff[1] * aff[2]) * rowf
        dz, ds, dlam, dnu = direction(solve, r_d, r_in, r_eq, r_c, lam, s)
        alpha = _step(s, lam, (dz, ds, dlam, dnu), rows, 0.99)
        finite = torch.stack([_amax(v) for v in (dz, ds, dlam, dnu)]).amax(0).isfinite()
        move = running & finite
        z = _where_b(move, z + alpha * dz, z)
        s = _where_b(move, torch.where(rows, s + alpha * ds, 1.0), s)
        lam = _where_b(move, lam + alpha * dlam, lam)
        nu = _where_b(move, nu + alpha * dnu, nu)
        iterations += running.to(torch.int64)
        res = residual_fn(z, lam, nu)
        better = running & (res < best_res)
        best = tuple(_where_b(better, a, c) for a, c in zip((z, lam, nu), best))
        best_res = torch.where(better, res, best_res)
        if bool((running & (best_res < _POLISH_FROM)).any()):
            guess = (lam > s) & rows
            cand, cand_res = _polish(P, guess, best, best_res, residual_fn)
            best = tuple(_where_b(running, a, c) for a, c in zip(cand, best))
            best_res = torch.where(running, cand_res, best_res)
        running &= (best_res > tol) & finite
    return (*best, iterations, best_res)


def _masked_min(v: Tensor, rows: Tensor) -> Tensor:
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    return torch.where(rows, v, torch.inf).amin(-1).clamp(min=-1e300, max=1e300)


def _nan_to_zero(v: Tensor) -> Tensor:
    return torch.where(v.isfinite(), v, 0.0)


def _step(s: Tensor, lam: Tensor, d, rows: Tensor, fraction: float) -> Tensor:
    alpha = torch.minimum(_max_step(s, d[1], rows), _max_step(lam, d[2], rows))
    return (fraction * alpha).clamp(max=1.0).nan_to_num(0.0).unsqueeze(-1)


def _polish(P: _Problem, active: Tensor, best, best_res: Tensor, residual_fn):
    """Solve the KKT system of the guessed active set exactly; keep it where it is better."""
    n, m = P.p.shape[-1], P.h.shape[-1]
    a = active.to(_F64)
    G = P.G * a.unsqueeze(-1)
    # rows of inactive constraints read  -lam_i = 0
    k = P.b.shape[-1]
    zeros = P.A.new_zeros(P.A.shape[:-2] + (k, m))
    K = torch.cat(
        [
            torch.cat([P.Q, G.mT, P.A.mT], -1),
            torch.cat([G, -torch.diag_embed(1 - a), zeros.mT], -1),
            torch.cat([P.A, zeros, P.A.new_zeros(P.A.shape[:-2] + (k, k))], -1),
        ],
        -2,
    )
    sign = torch.cat([a.new_ones(n), -a.new_ones(m + k)])
    K_reg = K + torch.diag_embed(sign * _DELTA)
    x = _lu_solver(K, K_reg, _POLISH_REFINE_STEPS)(torch.cat([-P.p, P.h * a, P.b], -1))
    # rounding can leave multipliers at -1e-16; zero them so the reported lam is a valid sign
    cand = (x[..., :n], x[..., n : n + m].clamp(min=0.0), x[..., n + m :])
    res = residual_fn(*cand)
    better = res < best_res
    return tuple(_where_b(better, c, b) for c, b in zip(cand, best)), torch.where(better, res, best_res)


def _phase_one_infeasible(P: _Problem, max_iter: int) -> Tensor:
    """min 1/2|Az-b|^2 + 1/2|t|^2 s.t. Gz - t <= h: a positive optimal violation proves infeasibility."""
    B, n = P.p.shape
    m = P.h.shape[-1]
    eye_m = torch.eye(m, dtype=_F64, device=P.p.device).expand(B, m, m)
    cross = P.p.new_zeros(B, n, m)
    Q1 = torch.cat([torch.cat([P.A.mT @ P.A, cross], -1), torch.cat([cross.mT, eye_m], -1)], -2)
    P1 = _Problem(
        Q1,
        torch.cat([-_mtv(P.A, P.b), P.p.new_zeros(B, m)], -1),
        torch.cat([P.G, -eye_m], -1),
        P.h,
        P.p.new_zeros(B, 0, n + m),
        P.p.new_zeros(B, 0),
        P.rows,
    )
    x, _, _, _, res = _ipm(P1, 1e-10, max_iter, lambda *v: _kkt_residual(P1, *v), None)
    z = x[..., :n]
    over = torch.where(P.rows, _mv(P.G, z) - P.h, 0.0).clamp(min=0)
    violation = torch.maximum(_amax(over), _amax(_mv(P.A, z) - P.b))
    scale = 1 + torch.maximum(_amax(torch.where(P.rows, P.h, 0.0)), _amax(P.b))
    return (violation > _INFEASIBLE_VIOLATION * scale) & (res < 1e-6)


# ----------------------------------------------------------------------------------------------
# optional qpth backend


def _import_qpth():
    """Import ``qpth.qp`` without needing cvxpy.

    ``import qpth`` loads ``qpth.solvers.cvxpy``, which imports cvxpy at module load although only
    its unused CVXPY solver path needs it. When cvxpy is not installed, a placeholder module stands
    in for it during the import only; a real cvxpy is never touched.
    """
    placeholder = None
    if "cvxpy" not in sys.modules and importlib.util.find_spec("cvxpy") is None:
        placeholder = types.ModuleType("cvxpy")
        sys.modules["cvxpy"] = placeholder
    try:
        import qpth.qp
    except ImportError as err:
        raise ImportError("backend='qpth' needs the qpth package: pip install --no-deps qpth") from err
    finally:
        if placeholder is not None and sys.modules.get("cvxpy") is placeholder:
            del sys.modules["cvxpy"]
    return qpth.qp


def _solve_qpth(P: _Problem, batch, dtype, tol: float, max_iter: int, box: bool | None) -> QPResult:
    """Solve with qpth's batched PDIPM, the solver behind ``qpth.qp.QPFunction`` (called directly,
    as ``QPFunction`` returns z only): eps=tol, maxIter=max_iter, notImprovedLim=3, verbose=-1 (no
    printing). Tested with qpth 0.0.18 on torch 2.13 (float64, CPU).

    qpth has no per-problem row masks: inequality rows that are absent (infinite bounds) in every
    batch element are dropped; rows absent in only some elements get the finite bound
    ``±(1e6 * (1 + max |finite bound|))``. qpth needs at least one constraint, so an unconstrained
    problem gets the vacuous row ``0 z <= 1``. qpth does not report iterations; ``iterations`` holds
    ``max_iter``. Status comes from this module's KKT residual of qpth's answer.
    """
    qpth_qp = _import_qpth()
    B, n = P.p.shape
    m = P.h.shape[-1]
    keep = P.rows.any(0)
    G, h = P.G[:, keep], P.h[:, keep]
    if bool((~P.rows[:, keep]).any()):
        far = 1e6 * (1 + _amax(torch.where(P.rows, P.h, 0.0).flatten()[None])[0])
        h = torch.where(P.rows[:, keep], h, far)
    vacuous = G.shape[1] == 0 and P.b.shape[-1] == 0
    if vacuous:
        G, h = P.G.new_zeros(B, 1, n), P.h.new_ones(B, 1)
    empty = P.p.new_zeros(0)
    A, b = (P.A, P.b) if P.b.shape[-1] > 0 else (empty, empty)
    pdipm = qpth_qp.pdipm_b
    try:
        Q_LU, S_LU, R = pdipm.pre_factor_kkt(P.Q, G, A)
        z, nu, lam_kept, _ = pdipm.forward(P.Q, P.p, G, h, A, b, Q_LU, S_LU, R, tol, -1, 3, max_iter)
    except RuntimeError:  # qpth factorises the whole batch at once; a singular one fails it all
        z = torch.full_like(P.p, torch.nan)
        lam_kept = P.p.new_full((B, G.shape[1]), torch.nan)
        nu = None
    lam = P.p.new_zeros(B, m)
    if not vacuous:
        lam[:, keep] = torch.where(P.rows[:, keep], lam_kept, 0.0)
    nu = nu.reshape(B, P.b.shape[-1]) if nu is not None and nu.numel() > 0 else P.p.new_zeros(B, P.b.shape[-1])
    res = _kkt_residual(P, _nan_to_zero(z), _nan_to_zero(lam), _nan_to_zero(nu))
    bad = ~(z.isfinite().all(-1) & lam.isfinite().all(-1))
    iterations = torch.full((B,), max_iter, dtype=torch.int64, device=P.p.device)
    status = _status(res, tol, bad, torch.zeros_like(bad))
    return _result(batch, dtype, z, status, lam, nu, iterations, torch.where(bad, torch.inf, res))


# ----------------------------------------------------------------------------------------------
# input handling


def _check_tensor(name: str, x, min_dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def _common(tensors: dict[str, Tensor]) -> tuple[torch.device, torch.dtype]:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    dtype = None
    for t in tensors.values():
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return devices.pop(), dtype


def _batch_shape(shapes: dict[str, tuple]) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError as err:
        detail = ", ".join(f"{k}: {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dimensions do not broadcast ({detail})") from err


def _flat(x: Tensor, batch: torch.Size, tail: tuple[int, ...]) -> Tensor:
    return x.to(_F64).expand(batch + tail).reshape((batch.numel(),) + tail)


def _finite_rows(x: Tensor) -> Tensor:
    return x.flatten(1).isfinite().all(-1)


def _status(res: Tensor, tol: float, bad: Tensor, infeasible: Tensor) -> Tensor:
    status = torch.full(res.shape, int(QPStatus.MAX_ITER), dtype=torch.int64, device=res.device)
    status = torch.where(res <= tol, int(QPStatus.SOLVED), status)
    status = torch.where(infeasible, int(QPStatus.INFEASIBLE), status)
    return torch.where(bad | res.isnan(), int(QPStatus.NUMERICAL), status)


def _result(batch, dtype, z, status, lam, nu, iterations, res) -> QPResult:
    def out(t: Tensor) -> Tensor:
        return _nan_to_zero(t).to(dtype).reshape(batch + t.shape[1:])

    return QPResult(
        out(z), status.reshape(batch), out(lam), out(nu), iterations.reshape(batch), res.reshape(batch)
    )


# ----------------------------------------------------------------------------------------------
# public API


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    warm_start: QPResult | None = None,
    backend: str = "builtin",
) -> QPResult:
    """Solve ``min ½ zᵀQz + pᵀz  s.t.  G z <= h,  A z = b`` for a batch of problems.

    Q: (*B, n, n) PSD (maybe singular), p: (*B, n), G: (*B, m, n), h: (*B, m), A: (*B, k, n),
    b: (*B, k); leading batch dimensions broadcast. Computation is in float64; ``z``, ``lam``,
    ``nu`` come back in the promoted input dtype, ``residual`` in float64 (see module docstring).
    ``warm_start`` (a previous result of the same shapes) seeds the active set. ``backend="qpth"``
    uses ``qpth.qp.QPFunction`` when installed.
    """
    Q = _check_tensor("Q", Q, 2)
    p = _check_tensor("p", p, 1)
    n = p.shape[-1]
    if Q.shape[-2:] != (n, n):
        raise ValueError(f"Q must be (*B, n, n) with n = p.shape[-1] = {n}, got {tuple(Q.shape)}")
    if (G is None) != (h is None) or (A is None) != (b is None):
        raise ValueError("G and h (and A and b) must be given together")
    inputs = {"Q": Q, "p": p}
    if G is None:
        G, h = Q.new_zeros(0, n), Q.new_zeros(0)
    else:
        inputs.update(G=_check_tensor("G", G, 2), h=_check_tensor("h", h, 1))
    if A is None:
        A, b = Q.new_zeros(0, n), Q.new_zeros(0)
    else:
        inputs.update(A=_check_tensor("A", A, 2), b=_check_tensor("b", b, 1))
    m, k = G.shape[-2], A.shape[-2]
    for name, M, rhs, rows in (("G", G, h, m), ("A", A, b, k)):
        if M.shape[-1] != n or rhs.shape[-1] != rows:
            raise ValueError(
                f"{name} must be (*B, rows, {n}) with a matching right-hand side, got "
                f"{tuple(M.shape)} and {tuple(rhs.shape)}"
            )
    device, dtype = _common(inputs)
    batch = _batch_shape(
        {"Q": Q.shape[:-2], "p": p.shape[:-1], "G": G.shape[:-2], "h": h.shape[:-1], "A": A.shape[:-2], "b": b.shape[:-1]}
    )
    P = _Problem(
        _flat(Q, batch, (n, n)),
        _flat(p, batch, (n,)),
        _flat(G, batch, (m, n)),
        _flat(h, batch, (m,)),
        _flat(A, batch, (k, n)),
        _flat(b, batch, (k,)),
        torch.ones(batch.numel(), m, dtype=torch.bool, device=device),
    )
    if backend == "qpth":
        return _solve_qpth(P, batch, dtype, tol, max_iter, box=None)
    if backend != "builtin":
        raise ValueError(f"unknown backend {backend!r}; use 'builtin' or 'qpth'")
    bad = ~(_finite_rows(P.Q) & _finite_rows(P.p) & _finite_rows(P.G) & _finite_rows(P.h) & _finite_rows(P.A) & _finite_rows(P.b))
    P = _Problem(*(_where_b(bad, torch.zeros_like(t), t) for t in (P.Q, P.p, P.G, P.h, P.A, P.b)), P.rows)

    # equilibrate: z = d z~, lam = rG lam~, nu = rA nu~
    d = _column_scale(P.Q)
    rG, rA = _row_scale(P.G * d.unsqueeze(-2)), _row_scale(P.A * d.unsqueeze(-2))
    S = _Problem(
        P.Q * d.unsqueeze(-1) * d.unsqueeze(-2),
        P.p * d,
        P.G * rG.unsqueeze(-1) * d.unsqueeze(-2),
        P.h * rG,
        P.A * rA.unsqueeze(-1) * d.unsqueeze(-2),
        P.b * rA,
        P.rows,
    )

    def residual_fn(z, lam, nu):
        return _kkt_residual(P, z * d, lam * rG, nu * rA)

    guess = None
    if warm_start is not None:
        guess = _flat(warm_start.lam.detach(), batch, (m,)) > 0
    zs, lam, nu, iterations, res = _ipm(S, tol, max_iter, residual_fn, guess)
    infeasible = torch.zeros_like(bad)
    unsolved = ~bad & ~(res <= tol)
    if m + k > 0 and bool(unsolved.any()):
        idx = unsolved.nonzero().squeeze(-1)
        infeasible[idx] = _phase_one_infeasible(S.index(idx), max_iter)
    status = _status(res, tol, bad, infeasible)
    return _result(batch, dtype, zs * d, status, lam * rG, nu * rA, iterations, res)


def solve_box_qp(
    Q: Tensor,
    p: Tensor,
    lower: Tensor | float,
    upper: Tensor | float,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    warm_start: QPResult | None = None,
    backend: str = "builtin",
) -> QPResult:
    """Solve ``min ½ zᵀQz + pᵀz  s.t.  lower <= z <= upper`` for a batch of problems.

    ``lower``/``upper`` broadcast to ``p`` (Python floats allowed) and may hold -inf/+inf.
    ``lam`` is (*B, 2n) = [multipliers of z >= lower, multipliers of z <= upper].
    See :func:`solve_qp` for dtypes, batching and ``warm_start``.
    """
    Q = _check_tensor("Q", Q, 2)
    p = _check_tensor("p", p, 1)
    n = p.shape[-1]
    if Q.shape[-2:] != (n, n):
        raise ValueError(f"Q must be (*B, n, n) with n = p.shape[-1] = {n}, got {tuple(Q.shape)}")
    inputs = {"Q": Q, "p": p}
    bounds = {}
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = torch.tensor(float(v), dtype=_F64, device=p.device)
        else:
            inputs[name] = _check_tensor(name, v, 0)
        if v.dim() == 0:
            v = v.expand(n)
        if v.shape[-1] != n:
            raise ValueError(f"{name} must broadcast to p's shape (*B, {n}), got {tuple(v.shape)}")
        bounds[name] = v
    device, dtype = _common(inputs)
    lower, upper = bounds["lower"], bounds["upper"]
    if lower.device != device or upper.device != device:
        raise ValueError("lower/upper must be on the device of Q and p")
    batch = _batch_shape({"Q": Q.shape[:-2], "p": p.shape[:-1], "lower": lower.shape[:-1], "upper": upper.shape[:-1]})
    Qf, pf = _flat(Q, batch, (n, n)), _flat(p, batch, (n,))
    lo, up = _flat(lower, batch, (n,)), _flat(upper, batch, (n,))
    B = Qf.shape[0]
    rows = torch.cat([lo.isfinite(), up.isfinite()], -1)
    eye = torch.eye(n, dtype=_F64, device=device)
    G = torch.cat([-eye, eye], -2).expand(B, 2 * n, n)
    if backend == "qpth":
        P = _Problem(Qf, pf, G, torch.cat([-lo, up], -1), Qf.new_zeros(B, 0, n), Qf.new_zeros(B, 0), rows)
        return _solve_qpth(P, batch, dtype, tol, max_iter, box=True)
    if backend != "builtin":
        raise ValueError(f"unknown backend {backend!r}; use 'builtin' or 'qpth'")
    bad = ~(_finite_rows(Qf) & _finite_rows(pf)) | lo.isnan().any(-1) | up.isnan().any(-1)
    infeasible = ~bad & ((lo > up) | (lo == torch.inf) | (up == -torch.inf)).any(-1)
    skip = bad | infeasible
    Qf, pf = _where_b(skip, torch.zeros_like(Qf), Qf), _where_b(skip, torch.zeros_like(pf), pf)
    lo, up = _where_b(skip, torch.zeros_like(lo), lo), _where_b(skip, torch.zeros_like(up), up)
    rows = torch.cat([lo.isfinite(), up.isfinite()], -1)
    P = _Problem(Qf, pf, G, torch.where(rows, torch.cat([-lo, up], -1), 0.0), Qf.new_zeros(B, 0, n), Qf.new_zeros(B, 0), rows)

    d = _column_scale(Qf)  # z = d z~, box multipliers lam = lam~ / d
    Qs, ps, los, ups = Qf * d.unsqueeze(-1) * d.unsqueeze(-2), pf * d, lo / d, up / d
    dd = torch.cat([d, d], -1)
    no_nu = Qf.new_zeros(B, 0)

    def residual_fn(z, lam, nu=no_nu):
        return _kkt_residual(P, z * d, lam / dd, nu)

    def split(y):
        return torch.cat([(-y).clamp(min=0), y.clamp(min=0)], -1)

    if warm_start is not None:
        lam_ws = _flat(warm_start.lam.detach(), batch, (2 * n,)) * dd
        z0 = _flat(warm_start.z.detach(), batch, (n,)) / d
        y0 = lam_ws[..., n:] - lam_ws[..., :n]
    else:
        z0 = torch.zeros_like(ps)
        y0 = None
    z0 = _nan_to_zero(torch.maximum(torch.minimum(z0, ups), los))
    if y0 is None:
        y0 = -(_mv(Qs, z0) + ps)
    zs, y, iterations, converged = _box_active_set(
        Qs, ps, los, ups, z0, _nan_to_zero(y0), min(max_iter, _PDAS_MAX_ITER), lambda z, y: residual_fn(z, split(y)) <= tol
    )
    lam = split(y)
    res = residual_fn(zs, lam)
    fallback = ~skip & ~converged
    if bool(fallback.any()):
        idx = fallback.nonzero().squeeze(-1)
        S = _Problem(
            Qs[idx], ps[idx], G[idx], torch.where(rows, torch.cat([-los, ups], -1), 0.0)[idx], P.A[idx], no_nu[idx], rows[idx]
        )
        Pi, di = P.index(idx), d[idx]

        def residual_sub(z, lam, nu):
            return _kkt_residual(Pi, z * di, lam / torch.cat([di, di], -1), nu)

        z_i, lam_i, _, it_i, res_i = _ipm(S, tol, max_iter, residual_sub, lam[idx] > 0)
        # the interior point answer identifies the active set; the active-set method then finishes
        # exactly where the IPM's own polish was defeated by degeneracy
        z_a, y_a, it_a, _ = _box_active_set(
            Qs[idx], ps[idx], los[idx], ups[idx], z_i, lam_i[..., n:] - lam_i[..., :n], 5,
            lambda z, y: residual_sub(z, split(y), no_nu[idx]) <= tol,
        )
        res_a = residual_sub(z_a, split(y_a), no_nu[idx])
        use_a = res_a < res_i
        z_i, lam_i, res_i = _where_b(use_a, z_a, z_i), _where_b(use_a, split(y_a), lam_i), torch.where(use_a, res_a, res_i)
        it_i = it_i + it_a
        better = res_i < res[idx]
        zs[idx] = _where_b(better, z_i, zs[idx])
        lam[idx] = _where_b(better, lam_i, lam[idx])
        res[idx] = torch.where(better, res_i, res[idx])
        iterations[idx] += it_i
    status = _status(res, tol, bad, infeasible)
    return _result(batch, dtype, zs * d, status, lam / dd, no_nu, iterations, res)
