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
* Box QPs (``solve_box_qp``): a primal-dual interior point method specialised to boxes (Mehrotra
  predictor-corrector). The primal iterate stays strictly inside the box, so only stationarity and
  complementarity are Newton-solved; with :math:`D = \lambda_l/s_l + \lambda_u/s_u` each
  iteration needs ONE batched Cholesky factorisation of :math:`Q + D + \delta I` (``cholesky_ex``,
  so a failed element does not stop the others; :math:`\delta = 10^{-10}` on the unit diagonal,
  grown per element on failure). The active-set guess :math:`\{\lambda > s\}` is *polished*
  whenever it settles: the active variables are fixed at their bounds and
  :math:`Q_{FF}\Delta = -(Qz+p)_F` is solved from the current iterate (regularised Cholesky plus
  refinement, which converges to the smallest correction, so singular :math:`Q` gives the
  minimiser nearest the interior point iterate); the polished point is kept where its residual is
  smaller, and an element stops once it is below ``tol``. Where that does not finish, a few
  primal-dual active-set (PDAS, semismooth Newton) iterations with a 1-/2-cycle guard follow from
  the last guess; warm starts begin with PDAS from the previous active set. Variables with
  :math:`l = u` are fixed and eliminated.
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

For box QPs :math:`G = [-I; I]`, :math:`h = [-l; u]`, rows with infinite bounds are ignored, and
the residual is evaluated on the Jacobi-equilibrated problem (:math:`\tilde Q = DQD`,
:math:`\tilde p = Dp`, :math:`\tilde z = z/d`, bounds :math:`/d`, :math:`\tilde\lambda = d\lambda`),
so it does not depend on the units of the variables: in original units a row of :math:`Q` at scale
1e8 carries rounding noise of order 1e-8 in :math:`Qz` that no float64 :math:`z` can remove.
A problem is SOLVED when ``residual <= tol``.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from dataclasses import dataclass, fields

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
# Refinement steps of the box polish inside the interior point method ...
_BOX_POLISH_REFINE_STEPS = 4
# ... and in the (fallback / warm start) active-set iterations, which must finish on their own.
_PDAS_REFINE_STEPS = 12
# Active-set (PDAS) iterations from a warm start, and after the box interior point method.
_WARM_PDAS_ITER = 5
_FINAL_PDAS_ITER = 5
# Fraction of the way to the boundary an interior point step may go.
_STEP_FRACTION = 0.99
# The box interior point method stops an element once mu has fallen by this factor (polishing
# and the final active-set phase take over).
_MU_FLOOR = 1e-24
# A settled active-set guess is polished again once mu has fallen by this factor.
_REPOLISH = 1e-3
# Working batches up to this size are neither compacted nor polished selectively (the indexing
# costs more than the arithmetic it saves).
_SMALL_BATCH = 16
# Bounds with slack below this times sqrt(mu) join the active-set guess once mu < _DEGENERATE_MU
# (degenerate bounds, where lam and s both vanish).
_DEGENERATE = 10.0
_DEGENERATE_MU = 1e-6
# The box solvers stop an element at residual <= _TARGET * tol (status still uses tol).
_TARGET = 0.1
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
# box QPs  l <= z <= u  (equilibrated data: unit diagonal wherever the diagonal is non-zero)


@dataclass
class _Box:
    """Equilibrated box-QP batch (b, n): Q~ = D Q D, p~ = D p, bounds / d, with z = d z~ and
    lam = lam~ / d in original units.

    ``fl``/``fu`` mark finite lower/upper bounds of variables that are not ``fixed`` (l == u).
    ``lo``/``up`` hold the bounds where they exist (both the fixed value at fixed variables) and
    0 elsewhere; ``lb``/``ub`` the same with -inf/+inf for clamping; ``bscale`` = max |bound|.
    """

    Q: Tensor
    p: Tensor
    lo: Tensor
    up: Tensor
    lb: Tensor
    ub: Tensor
    fl: Tensor
    fu: Tensor
    fixed: Tensor
    bscale: Tensor

    @staticmethod
    def make(Q: Tensor, p: Tensor, lo: Tensor, up: Tensor, fl: Tensor, fu: Tensor, fixed: Tensor) -> _Box:
        has_l, has_u = fl | fixed, fu | fixed
        lo, up = torch.where(has_l, lo, 0.0), torch.where(has_u, torch.where(fixed, lo, up), 0.0)
        return _Box(Q, p, lo, up, torch.where(has_l, lo, -torch.inf), torch.where(has_u, up, torch.inf),
                    fl, fu, fixed, torch.maximum(_amax(lo), _amax(up)))

    def index(self, idx: Tensor) -> _Box:
        return _Box(*(getattr(self, f.name)[idx] for f in fields(self)))


def _bmv(M: Tensor, x: Tensor) -> Tensor:
    """(b, n, n) @ (b, n) with bmm (less overhead than matmul's broadcasting)."""
    return torch.bmm(M, x.unsqueeze(-1)).squeeze(-1)


def _tri_solve(L: Tensor, r: Tensor) -> Tensor:
    """Solve L Lᵀ x = r (r: (b, n, 1)); two triangular solves are much cheaper than
    ``torch.cholesky_solve`` for small matrices."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, r, upper=False), upper=True)


def _box_kkt(S: _Box, Qz: Tensor, z: Tensor, lam_l: Tensor, lam_u: Tensor, signs: bool = False) -> Tensor:
    """The residual of the module docstring for G = [-I; I], h = [-l; u] on the equilibrated
    problem (rows: the finite bounds). ``signs`` adds the dual-sign term, which is zero for the
    multipliers built by :func:`_box_multipliers`. NaN reads as +inf."""
    has_l, has_u = S.fl | S.fixed, S.fu | S.fixed
    GTl = lam_u - lam_l
    stat = _amax(Qz + S.p + GTl) / (1 + torch.maximum(torch.maximum(_amax(Qz), _amax(S.p)), _amax(GTl)))
    ineq_scale = 1 + torch.maximum(_amax(torch.where(has_l | has_u, z, 0.0)), S.bscale)
    slack_l, slack_u = torch.where(has_l, z - S.lo, 0.0), torch.where(has_u, S.up - z, 0.0)
    violation = _amax(torch.minimum(slack_l, slack_u).clamp(max=0.0)) / ineq_scale
    lam_max = torch.maximum(_amax(lam_l), _amax(lam_u))
    comp = torch.maximum(_amax(lam_l * slack_l), _amax(lam_u * slack_u)) / (1 + lam_max * ineq_scale)
    res = torch.maximum(torch.maximum(stat, violation), comp)
    if signs:
        sign = torch.maximum(_amax(torch.where(has_l, lam_l.clamp(max=0.0), lam_l)),
                             _amax(torch.where(has_u, lam_u.clamp(max=0.0), lam_u)))
        res = torch.maximum(res, sign / (1 + lam_max))
    return torch.where(res.isnan(), torch.inf, res)


def _box_multipliers(S: _Box, g: Tensor, at_l: Tensor, at_u: Tensor) -> tuple[Tensor, Tensor]:
    """Multipliers from the gradient g = Qz + p: lam_l - lam_u = g on the active bounds."""
    lam_l = torch.where(at_l | S.fixed, g.clamp(min=0.0), 0.0)
    lam_u = torch.where(at_u | S.fixed, (-g).clamp(min=0.0), 0.0)
    return lam_l, lam_u


def _reduced_solve(S: _Box, z: Tensor, at_l: Tensor, at_u: Tensor, refine: int = _BOX_POLISH_REFINE_STEPS):
    """Fix the active variables at their bounds and minimise over the free ones F, starting from z:
    z_F += Δ with Q_FF Δ = -(Qz + p)_F. Δ comes from a Cholesky factor of Q_FF + δI and
    refinement against Q_FF; started at 0, the refinement stays in range(Q_FF), so for a singular
    but consistent system it converges to the *smallest* correction: among the many minimisers the
    one nearest z (an interior point iterate or the previous active-set iterate), which keeps the
    free variables feasible where the minimiser is not unique.

    Returns z, g = Qz + p, lam_l, lam_u, the residual and z before clamping."""
    active = at_l | at_u | S.fixed
    z = torch.where(at_u, S.up, torch.where(at_l | S.fixed, S.lo, z))
    free = (~active).to(_F64)
    K = S.Q * (free.unsqueeze(-1) * free.unsqueeze(-2))
    K.diagonal(dim1=-2, dim2=-1).add_(1 - free)
    rhs = (-(_bmv(S.Q, z) + S.p) * free).unsqueeze(-1)
    K_reg = K.clone()
    K_reg.diagonal(dim1=-2, dim2=-1).add_(_DELTA * free)
    L, _ = torch.linalg.cholesky_ex(K_reg)
    x = _tri_solve(L, rhs)
    for _ in range(refine):
        x = x + _tri_solve(L, rhs - torch.bmm(K, x))
    # clamped, so that the residual (and the answer) is that of a feasible point: a free variable
    # that ends a little outside its box costs stationarity instead, and the point is rejected
    # unless that is small
    z_raw = z + x.squeeze(-1)
    z = torch.minimum(torch.maximum(z_raw, S.lb), S.ub)
    Qz = _bmv(S.Q, z)
    g = Qz + S.p
    lam_l, lam_u = _box_multipliers(S, g, at_l, at_u)
    return z, g, lam_l, lam_u, _box_kkt(S, Qz, z, lam_l, lam_u), z_raw


def _box_pdas(S: _Box, z: Tensor, at_l: Tensor, at_u: Tensor, tol: float, max_iter: int):
    """Primal-dual active-set iterations (semismooth Newton on the complementarity conditions: with
    y = lam_u - lam_l the next upper set is {y + z - u > 0}, the lower set {y + z - l < 0}) from the
    given active set and point. An element stops when solved, when its active set repeats (1- and
    2-cycles, which singular Q can cause) or when the reduced solve is not finite.

    Returns the best z, lam_l, lam_u, residual and the iterations."""
    b = S.p.shape[0]
    best_z, best_l, best_u = torch.zeros_like(z), torch.zeros_like(z), torch.zeros_like(z)
    best_res = S.p.new_full((b,), torch.inf)
    iterations = torch.zeros(b, dtype=torch.int64, device=S.p.device)
    running = torch.ones(b, dtype=torch.bool, device=S.p.device)
    history: list[Tensor] = []
    for it in range(max_iter):
        key = torch.where(at_u, 2, at_l.to(torch.int8)).to(torch.int8)
        for old in history:
            running &= (key != old).any(-1)
        history = (history + [key])[-2:]
        if it > 0 and not bool(running.any()):
            break
        z, g, lam_l, lam_u, res, z_raw = _reduced_solve(S, torch.minimum(torch.maximum(z, S.lb), S.ub), at_l, at_u,
                                                        _PDAS_REFINE_STEPS)
        iterations += running.to(torch.int64)
        better = running & (res < best_res)
        best_z, best_l, best_u = (_where_b(better, a, c) for a, c in ((z, best_z), (lam_l, best_l), (lam_u, best_u)))
        best_res = torch.where(better, res, best_res)
        running &= (best_res > tol) & g.sum(-1).isfinite()
        y = torch.where(at_l | at_u, -g, 0.0)
        at_u = S.fu & (y + z_raw - S.up > 0)
        at_l = S.fl & (y + z_raw - S.lo < 0) & ~at_u
    return best_z, best_l, best_u, best_res, iterations


def _box_ipm(S: _Box, tol: float, max_iter: int):
    """Mehrotra predictor-corrector for the box QP (see the module docstring).

    Lower and upper bounds are stacked: s = [z - l, u - z], lam = [lam_l, lam_u] (2n entries;
    s = 1, lam = 0 for absent bounds). Fixed variables are eliminated (identity rows). Whenever
    the active-set guess {lam > s} has settled (same as in the previous iteration, and new, or
    polished last at a 1000 times larger mu), it is polished by :func:`_reduced_solve`; the best
    polished point is kept and an element stops at residual <= tol, or when mu has fallen by
    ``_MU_FLOOR``. Finished elements leave the working batch (batches above ``_SMALL_BATCH``).
    One host synchronisation per iteration (two when every running element polished).

    Returns the best z, lam_l, lam_u, residual, iterations and, for a final active-set phase, the
    last interior point iterate z with its active-set guess."""
    b, n = S.p.shape
    dev = S.p.device
    out_z, out_l, out_u = S.p.new_zeros(b, n), S.p.new_zeros(b, n), S.p.new_zeros(b, n)
    out_res = S.p.new_full((b,), torch.inf)
    out_it = torch.zeros(b, dtype=torch.int64, device=dev)
    out_iz, out_gl, out_gu = torch.zeros_like(out_z), S.fl.clone(), torch.zeros_like(S.fu)
    if b == 0:
        return out_z, out_l, out_u, out_res, out_it, out_iz, out_gl, out_gu
    # fixed variables: identity rows in the Newton systems, z = l throughout
    if bool(S.fixed.any()):
        nf = (~S.fixed).to(_F64)
        Qm = S.Q * (nf.unsqueeze(-1) * nf.unsqueeze(-2))
        Qm.diagonal(dim1=-2, dim2=-1).add_(1 - nf)
        pm = torch.where(S.fixed, -S.lo, S.p + _bmv(S.Q, torch.where(S.fixed, S.lo, 0.0)))
    else:
        Qm, pm = S.Q, S.p
    W = S  # the working batch
    has = torch.cat([W.fl, W.fu], -1)
    hasf = has.to(_F64)
    sign = torch.cat([W.fl.to(_F64), -W.fu.to(_F64)], -1)  # ds = sign * [dz, dz]; 0 for absent bounds
    offset = torch.where(has, torch.cat([W.lo, -W.up], -1), -1.0)  # s = sign * [z, z] - offset (1 if absent)
    count = hasf.sum(-1, keepdim=True).clamp(min=1)
    # strictly interior start: the middle of two-sided boxes, one unit inside one-sided bounds;
    # multipliers a little above what makes the start dual feasible
    fl, fu = W.fl, W.fu
    z = torch.where(fl & fu, 0.5 * (W.lo + W.up), torch.where(fl, W.lo + 1, torch.where(fu, W.up - 1, 0.0)))
    z = torch.where(W.fixed, W.lo, z)
    g = _bmv(Qm, z) + pm
    tau = 1 + 0.1 * _amax(g).unsqueeze(-1)
    lam = (torch.cat([g, -g], -1).clamp(min=0) + tau) * hasf
    s = sign * torch.cat([z, z], -1) - offset
    delta = S.p.new_full((b, 1), _DELTA)
    idx = torch.arange(b, device=dev)
    best_z, best_l, best_u, best_res, iters = (t.clone() for t in (out_z, out_l, out_u, out_res, out_it))
    running = torch.ones(b, dtype=torch.bool, device=dev)
    prev_guess = torch.full((b, 2 * n), False, dtype=torch.bool, device=dev)
    polished = prev_guess.clone()
    mu_pol = S.p.new_full((b,), torch.inf)  # mu at the last polish
    mu_floor = None
    guess = prev_guess

    def halves(v):
        return v.unflatten(-1, (2, n)).sum(-2)

    def step_length(s, lam, ds, dlam):
        v, dv = torch.cat([s, lam], -1), torch.cat([ds, dlam], -1)
        return torch.where(dv < 0, v / -dv, torch.inf).amin(-1, keepdim=True)

    for it in range(max_iter):
        w = lam / s
        mu = (lam * s).sum(-1, keepdim=True) / count
        if mu_floor is None:
            mu_floor = _MU_FLOOR * mu
        D = halves(w)
        r_d = g - halves(sign * lam)
        K = Qm.clone()
        K.diagonal(dim1=-2, dim2=-1).add_(D + delta)
        L, info = torch.linalg.cholesky_ex(K)
        # predictor: complementarity target 0 makes the right-hand side -r_d - lam_l + lam_u = -g
        dz = _tri_solve(L, -g.unsqueeze(-1)).squeeze(-1)
        ds = sign * torch.cat([dz, dz], -1)
        dlam = -lam - w * ds
        alpha = step_length(s, lam, ds, dlam).clamp(max=1.0)
        mu_aff = ((s + alpha * ds) * (lam + alpha * dlam)).sum(-1, keepdim=True) / count
        sigma = (mu_aff / mu.clamp(min=1e-300)).clamp(0, 1)
        sigma = sigma * sigma * sigma
        # corrector: centring plus the second-order term (no refinement: the directions need not be
        # accurate, the polished points are)
        rc = (sigma * mu) * hasf - lam * s - ds * dlam
        r = (halves(sign * rc / s) - r_d).unsqueeze(-1)
        dz = _tri_solve(L, r).squeeze(-1)
        ds = sign * torch.cat([dz, dz], -1)
        dlam = (rc - lam * ds) / s
        alpha = (_STEP_FRACTION * step_length(s, lam, ds, dlam)).clamp(max=1.0)
        ok = (info == 0).unsqueeze(-1) & (dz.sum(-1, keepdim=True) + dlam.sum(-1, keepdim=True)).isfinite()
        move = running.unsqueeze(-1) & ok
        z = torch.where(move, z + alpha * dz, z)
        lam = torch.where(move, lam + alpha * dlam, lam)
        delta = torch.where(ok, delta, delta * 100)  # a failed factorisation: larger shift next time
        iters = iters + running.to(torch.int64)
        running = running & ((delta < 1e10) & (mu > mu_floor)).squeeze(-1)
        g = _bmv(Qm, z) + pm
        s = sign * torch.cat([z, z], -1) - offset
        # active-set guess {lam > s or s < C sqrt(mu)}, polished once it has settled; a repeated guess is polished
        # again once the iterate has moved much closer (the polished point depends on it where the
        # minimiser is not unique)
        mu = mu.squeeze(-1)
        degenerate = torch.where(mu < _DEGENERATE_MU, _DEGENERATE * mu.sqrt(), 0.0).unsqueeze(-1)
        guess = has & ((lam > s) | (s < degenerate))
        pol = running & (guess == prev_guess).all(-1) & ((guess != polished).any(-1) | (mu < _REPOLISH * mu_pol))
        prev_guess = guess
        n_run, n_pol = torch.stack([running.sum(), pol.sum()]).tolist()
        if n_run == 0:
            break
        if n_pol > 0:
            at_l, at_u = guess[..., :n], guess[..., n:] & ~guess[..., :n]
            if n_pol == len(idx) or len(idx) <= _SMALL_BATCH:
                # (small working batches polish everything: cheaper than selecting)
                zp, _, lp_l, lp_u, res, _ = _reduced_solve(W, z, at_l, at_u)
                better = running & (res < best_res)
                best_z, best_l, best_u = (_where_b(better, a, c) for a, c in ((zp, best_z), (lp_l, best_l), (lp_u, best_u)))
                best_res = torch.where(better, res, best_res)
                pol = running
            else:
                sel = pol.nonzero().squeeze(-1)
                zp, _, lp_l, lp_u, res, _ = _reduced_solve(W.index(sel), z[sel], at_l[sel], at_u[sel])
                better = res < best_res[sel]
                best_z[sel] = _where_b(better, zp, best_z[sel])
                best_l[sel] = _where_b(better, lp_l, best_l[sel])
                best_u[sel] = _where_b(better, lp_u, best_u[sel])
                best_res[sel] = torch.where(better, res, best_res[sel])
            polished = torch.where(pol.unsqueeze(-1), guess, polished)
            mu_pol = torch.where(pol, mu, mu_pol)
            running = running & (best_res > tol)
            if n_pol == n_run or len(idx) <= _SMALL_BATCH:
                n_run = int(running.sum())
                if n_run == 0:
                    break
        if n_run <= len(idx) // 2 and len(idx) > _SMALL_BATCH:
            # write back, then shrink the working batch to the running elements
            out_z[idx], out_l[idx], out_u[idx], out_res[idx], out_it[idx] = best_z, best_l, best_u, best_res, iters
            out_iz[idx], out_gl[idx], out_gu[idx] = z, guess[..., :n], guess[..., n:] & ~guess[..., :n]
            keep = running.nonzero().squeeze(-1)
            idx, W, Qm, pm = idx[keep], W.index(keep), Qm[keep], pm[keep]
            has, sign, offset, hasf, count = has[keep], sign[keep], offset[keep], hasf[keep], count[keep]
            z, g, s, lam, delta, mu_floor = z[keep], g[keep], s[keep], lam[keep], delta[keep], mu_floor[keep]
            best_z, best_l, best_u, best_res, iters = best_z[keep], best_l[keep], best_u[keep], best_res[keep], iters[keep]
            running, prev_guess, polished, guess = running[keep], prev_guess[keep], polished[keep], guess[keep]
            mu_pol = mu_pol[keep]
    out_z[idx], out_l[idx], out_u[idx], out_res[idx], out_it[idx] = best_z, best_l, best_u, best_res, iters
    out_iz[idx], out_gl[idx], out_gu[idx] = z, guess[..., :n], guess[..., n:] & ~guess[..., :n]
    return out_z, out_l, out_u, out_res, out_it, out_iz, out_gl, out_gu


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


_QPTH_SHIFT = 1e-11   # relative diagonal shift that lets qpth factorise a singular Q


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
    ``max_iter``. Q is shifted by ``1e-11 (1 + max diag Q) I`` so that qpth can factorise singular
    matrices. Status comes from this module's KKT residual of qpth's answer to the unshifted problem.
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
    # qpth factorises Q itself and fails on a singular one (J H Jᵀ with dependent rows, say): give it
    # the smallest shift that makes the factorisation possible; the status below is still judged by
    # the KKT residual of the *original* problem.
    shift = _QPTH_SHIFT * (1 + P.Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1))
    Q = P.Q + shift[:, None, None] * torch.eye(n, dtype=P.Q.dtype, device=P.Q.device)
    try:
        Q_LU, S_LU, R = pdipm.pre_factor_kkt(Q, G, A)
        z, nu, lam_kept, _ = pdipm.forward(Q, P.p, G, h, A, b, Q_LU, S_LU, R, tol, -1, 3, max_iter)
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
    if backend == "qpth":
        rows = torch.cat([lo.isfinite(), up.isfinite()], -1)
        eye = torch.eye(n, dtype=_F64, device=device)
        G = torch.cat([-eye, eye], -2).expand(B, 2 * n, n)
        P = _Problem(Qf, pf, G, torch.cat([-lo, up], -1), Qf.new_zeros(B, 0, n), Qf.new_zeros(B, 0), rows)
        return _solve_qpth(P, batch, dtype, tol, max_iter, box=True)
    if backend != "builtin":
        raise ValueError(f"unknown backend {backend!r}; use 'builtin' or 'qpth'")
    # NaN/inf data make an element NUMERICAL (a cheap sum test, confirmed exactly where it fires)
    bad = ~(Qf.sum((-2, -1)) + pf.sum(-1)).isfinite()
    if bool(bad.any()):
        bad = ~(_finite_rows(Qf) & _finite_rows(pf))
    bad = bad | lo.isnan().any(-1) | up.isnan().any(-1)
    infeasible = ~bad & ((lo > up) | (lo == torch.inf) | (up == -torch.inf)).any(-1)
    skip = bad | infeasible
    if bool(skip.any()):
        Qf, pf = _where_b(skip, torch.zeros_like(Qf), Qf), _where_b(skip, torch.zeros_like(pf), pf)
        lo, up = _where_b(skip, torch.zeros_like(lo), lo), _where_b(skip, torch.zeros_like(up), up)
    has_l = lo.isfinite()
    fixed = has_l & (lo == up)
    fl, fu = has_l & ~fixed, up.isfinite() & ~fixed
    d = _column_scale(Qf)  # z = d z~, box multipliers lam = lam~ / d
    S = _Box.make(Qf * (d.unsqueeze(-1) * d.unsqueeze(-2)), pf * d, lo / d, up / d, fl, fu, fixed)
    zs = torch.zeros_like(pf)
    lam_l, lam_u = torch.zeros_like(zs), torch.zeros_like(zs)
    res = torch.where(skip, 0.0, torch.inf).to(_F64)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)

    def merge(sel, cand, it):
        """Take the candidate (z, lam_l, lam_u, res) for the elements ``sel`` where it is better."""
        nonlocal zs, lam_l, lam_u, res, iterations
        z_c, l_c, u_c, r_c = cand
        if sel is None:
            better = r_c < res
            zs, lam_l, lam_u = _where_b(better, z_c, zs), _where_b(better, l_c, lam_l), _where_b(better, u_c, lam_u)
            res, iterations = torch.where(better, r_c, res), iterations + it
            return
        better = r_c < res[sel]
        zs[sel] = _where_b(better, z_c, zs[sel])
        lam_l[sel] = _where_b(better, l_c, lam_l[sel])
        lam_u[sel] = _where_b(better, u_c, lam_u[sel])
        res[sel] = torch.where(better, r_c, res[sel])
        iterations[sel] += it

    # the solvers aim below tol: the returned point is clamped and re-evaluated, which can cost a
    # little (rounding)
    target = _TARGET * tol
    if warm_start is not None:
        # active-set iterations from the previous answer (often right at once)
        lam_ws = _nan_to_zero(_flat(warm_start.lam.detach(), batch, (2 * n,))) * torch.cat([d, d], -1)
        z_ws = _nan_to_zero(_flat(warm_start.z.detach(), batch, (n,)) / d)
        y = lam_ws[..., n:] - lam_ws[..., :n]
        at_u = fu & (y + z_ws - S.up > 0)
        at_l = fl & (y + z_ws - S.lo < 0) & ~at_u
        *cand, it = _box_pdas(S, z_ws, at_l, at_u, target, min(max_iter, _WARM_PDAS_ITER))
        merge(None, cand, it)
    todo = ~(res <= target)
    n_todo = int(todo.sum())
    if n_todo > 0:
        idx = None if n_todo == B else todo.nonzero().squeeze(-1)
        Si = S if idx is None else S.index(idx)
        *cand, it, z_i, at_l, at_u = _box_ipm(Si, target, max_iter)
        merge(idx, cand, it)
        # where polishing inside the interior point method did not finish, active-set iterations
        # from its last iterate and active-set guess usually do
        left = ~((res if idx is None else res[idx]) <= target)
        if bool(left.any()):
            sub = left.nonzero().squeeze(-1)
            *cand, it = _box_pdas(Si.index(sub), z_i[sub], at_l[sub], at_u[sub], target, _FINAL_PDAS_ITER)
            merge(sub if idx is None else idx[sub], cand, it)
    # back to original units, clamping rounding-level bound violations; the residual is that of
    # exactly what is returned, evaluated on the equilibrated problem
    z = torch.where(fixed, lo, torch.minimum(torch.maximum(zs * d, lo), up))
    zs = z / d
    res = _box_kkt(S, _bmv(S.Q, zs), zs, lam_l, lam_u, signs=True)
    res = torch.where(skip, torch.inf, res)
    status = _status(res, tol, bad, infeasible)
    return _result(batch, dtype, z, status, torch.cat([lam_l / d, lam_u / d], -1), Qf.new_zeros(B, 0), iterations, res)
