"""Box QPs ``l <= z <= u``: the specialised interior point method, the reduced-space polish, the
primal-dual active-set (PDAS) iterations, and ``solve_box_qp``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._linalg import _DELTA, _F64, _amax, _nan_to_zero, _where_b
from ._problem import QPResult, QPStatus, _batch_shape, _check_tensor, _column_scale, _common, _finite_rows, _flat, _Problem, _result, _status
from ._qpth import _solve_qpth

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


# ----------------------------------------------------------------------------------------------
# box QPs  l <= z <= u  (equilibrated data: unit diagonal wherever the diagonal is non-zero)


@dataclass
class _Box:
    """Equilibrated box-QP batch (b, n): Q~ = D Q D, p~ = D p, bounds / d, with z = d z~ and
    lam = lam~ / d in original units.

    ``fl``/``fu`` mark finite lower/upper bounds of variables that are not ``fixed`` (l == u);
    ``has_l``/``has_u`` the bounds that exist (fixed variables have both), ``bounded`` either.
    ``lo``/``up`` hold the bounds where they exist (both the fixed value at fixed variables) and
    0 elsewhere; ``lb``/``ub`` the same with -inf/+inf for clamping; ``bscale`` = max |bound|,
    ``pscale`` = max |p~|.
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
    has_l: Tensor
    has_u: Tensor
    bounded: Tensor
    bscale: Tensor
    pscale: Tensor

    @staticmethod
    def make(Q: Tensor, p: Tensor, lo: Tensor, up: Tensor, fl: Tensor, fu: Tensor, fixed: Tensor) -> _Box:
        has_l, has_u = fl | fixed, fu | fixed
        lo, up = torch.where(has_l, lo, 0.0), torch.where(has_u, torch.where(fixed, lo, up), 0.0)
        return _Box(Q, p, lo, up, torch.where(has_l, lo, -torch.inf), torch.where(has_u, up, torch.inf),
                    fl, fu, fixed, has_l, has_u, has_l | has_u, torch.maximum(_amax(lo), _amax(up)), _amax(p))

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
    GTl = lam_u - lam_l
    stat = _amax(Qz + S.p + GTl) / (1 + torch.maximum(_amax(torch.cat([Qz, GTl], -1)), S.pscale))
    ineq_scale = 1 + torch.maximum(_amax(torch.where(S.bounded, z, 0.0)), S.bscale)
    slack_l, slack_u = torch.where(S.has_l, z - S.lo, 0.0), torch.where(S.has_u, S.up - z, 0.0)
    violation = _amax(torch.minimum(slack_l, slack_u).clamp(max=0.0)) / ineq_scale
    lam_max = _amax(torch.cat([lam_l, lam_u], -1))
    comp = _amax(torch.cat([lam_l * slack_l, lam_u * slack_u], -1)) / (1 + lam_max * ineq_scale)
    res = torch.maximum(torch.maximum(stat, violation), comp)
    if signs:
        sign = _amax(torch.cat([torch.where(S.has_l, lam_l.clamp(max=0.0), lam_l),
                                torch.where(S.has_u, lam_u.clamp(max=0.0), lam_u)], -1))
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


def _one_variable(Q: Tensor, p: Tensor, lo: Tensor, up: Tensor, tol: float) -> tuple[Tensor, ...] | None:
    """The box QP in one variable (flat batch (b, 1)) in closed form: the minimiser of the parabola ½ q z² + p z
    over the interval, z = clamp(−p/q, l, u), with the multiplier of the bound it stops at (the gradient
    g = q z + p there). Its residual is the module's on the equilibrated problem (q~ = 1, z~ = √q z, p~ = p / √q,
    λ~ = λ / √q), which for a clamped z and these multipliers is stationarity alone:
    |g − λ_l + λ_u| / (√q + max(q |z|, |λ_u − λ_l|, |p|)). Returns (z, λ_l, λ_u, residual), or None unless every
    element has q > 0 and l <= u and its answer passes ``tol`` (NaN or infinite data, or a bound at ±inf where
    z stops, make the residual NaN)."""
    q = Q[..., 0]
    z_raw = -p / q
    z = torch.minimum(torch.maximum(z_raw, lo), up)
    g = q * z + p
    lam_l = torch.where(z_raw <= lo, g.clamp(min=0.0), 0.0)
    lam_u = torch.where(z_raw >= up, (-g).clamp(min=0.0), 0.0)
    scale = q.sqrt() + torch.maximum(torch.maximum((q * z).abs(), (lam_u - lam_l).abs()), p.abs())
    res = ((g - lam_l + lam_u).abs() / scale)[:, 0]
    if not bool(((q > 0) & (lo <= up))[:, 0].logical_and(res <= tol).all()):
        return None
    return z, lam_l, lam_u, res


def _put_rows(full: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``full`` with ``rows`` in the rows ``idx``."""
    out = full.clone()
    out[idx] = rows
    return out


def _box_pdas(S: _Box, z: Tensor, at_l: Tensor, at_u: Tensor, tol: float, max_iter: int):
    """Primal-dual active-set iterations (semismooth Newton on the complementarity conditions: with
    y = lam_u - lam_l the next upper set is {y + z - u > 0}, the lower set {y + z - l < 0}) from the
    given active set and point. An element stops when solved, when its active set repeats (1- and
    2-cycles, which singular Q can cause) or when the reduced solve is not finite. Once at most half of a
    batch above ``_SMALL_BATCH`` is running, only the running elements are solved.

    Returns the best z, lam_l, lam_u, residual and the iterations."""
    def key(at_l, at_u):
        return torch.where(at_u, 2, at_l.to(torch.int8)).to(torch.int8)

    history = [key(at_l, at_u)]
    z = torch.minimum(torch.maximum(z, S.lb), S.ub)
    B = left = z.shape[0]
    for it in range(max_iter):
        if B > _SMALL_BATCH and left <= B // 2:
            # the finished elements' values are not used again: solve for the running ones only
            idx = running.nonzero().squeeze(-1)
            part = _reduced_solve(S.index(idx), z[idx], at_l[idx], at_u[idx], _PDAS_REFINE_STEPS)
            z, g, lam_l, lam_u, res, z_raw = (_put_rows(full, idx, rows)
                                              for full, rows in zip((z, g, lam_l, lam_u, res, z_raw), part))
        else:
            z, g, lam_l, lam_u, res, z_raw = _reduced_solve(S, z, at_l, at_u, _PDAS_REFINE_STEPS)
        if it == 0:
            # (the first point is the best so far wherever its residual is finite; elsewhere best_res = inf
            # and the point is never used)
            best_z, best_l, best_u, best_res = z, lam_l, lam_u, res
            iterations = torch.ones_like(res, dtype=torch.int64)
            running = (best_res > tol) & g.sum(-1).isfinite()
        else:
            iterations += running.to(torch.int64)
            better = running & (res < best_res)
            best_z, best_l, best_u = (_where_b(better, a, c)
                                      for a, c in ((z, best_z), (lam_l, best_l), (lam_u, best_u)))
            best_res = torch.where(better, res, best_res)
            running &= (best_res > tol) & g.sum(-1).isfinite()
        y = torch.where(at_l | at_u, -g, 0.0)
        at_u = S.fu & (y + z_raw - S.up > 0)
        at_l = S.fl & (y + z_raw - S.lo < 0) & ~at_u
        new = key(at_l, at_u)
        for old in history:
            running &= (new != old).any(-1)
        history = (history + [new])[-2:]
        left = int(running.sum())
        if not left:
            break
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
# public API


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
    closed = _one_variable(Qf, pf, lo, up, tol) if n == 1 else None
    if closed is not None:
        z, lam_l, lam_u, res = closed
        return _result(batch, dtype, z, torch.full_like(res, int(QPStatus.SOLVED), dtype=torch.int64),
                       torch.cat([lam_l, lam_u], -1), Qf.new_zeros(B, 0), torch.zeros_like(res, dtype=torch.int64), res)
    # NaN/inf data make an element NUMERICAL, an empty box INFEASIBLE. One cheap screen first: it is exactly 0
    # when the sums of Q and p are finite and lo - up <= 0 everywhere (NaN for NaN bounds, for -inf..-inf and
    # +inf..+inf); the exact tests run only where it fires.
    screen = (Qf.sum() + pf.sum()) * 0 + (lo - up).clamp(min=0).sum()
    if bool(screen == 0):
        bad = infeasible = skip = torch.zeros(B, dtype=torch.bool, device=device)
    else:
        bad = ~(Qf.sum((-2, -1)) + pf.sum(-1)).isfinite()
        if bool(bad.any()):
            bad = ~(_finite_rows(Qf) & _finite_rows(pf))
        bad = bad | lo.isnan().any(-1) | up.isnan().any(-1)
        infeasible = ~bad & ((lo > up) | (lo == torch.inf) | (up == -torch.inf)).any(-1)
        skip = bad | infeasible
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
    if warm_start is not None and max_iter > 0:
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
