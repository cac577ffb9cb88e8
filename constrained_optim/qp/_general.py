"""General QPs: infeasible-start interior point method, active-set polish, phase-1 infeasibility
test, and ``solve_qp``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import _DELTA, _F64, _REFINE_STEPS, _amax, _mtv, _mv, _nan_to_zero, _where_b
from ._problem import (
    QPResult,
    _batch_shape,
    _check_tensor,
    _column_scale,
    _common,
    _finite_rows,
    _flat,
    _kkt_residual,
    _Problem,
    _result,
    _row_scale,
    _status,
)
from ._qpth import _solve_qpth

# The polished active-set KKT system is often degenerate (dependent active rows, singular Q):
# more refinement steps drive its regularisation bias below rounding.
_POLISH_REFINE_STEPS = 8
# Polishing is tried once the interior point residual is below this.
_POLISH_FROM = 1e-4
# Phase-1 violation (relative) above which a problem is declared infeasible.
_INFEASIBLE_VIOLATION = 1e-7


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
