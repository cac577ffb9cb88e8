"""Optional backend: qpth's batched primal-dual interior point method (``backend="qpth"``)."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import Tensor

from ._linalg import _amax, _nan_to_zero
from ._problem import QPResult, _kkt_residual, _Problem, _result, _status


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
    ``max_iter``. Where qpth's answer is not solved to ``tol`` (it cannot factorise a singular Q), the
    solve is retried with Q shifted by ``1e-11 (1 + max diag Q) I`` and the better answer is kept. Status comes from this module's KKT residual of qpth's
    answer to the unshifted problem.
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

    def run(Q: Tensor):
        try:
            Q_LU, S_LU, R = pdipm.pre_factor_kkt(Q, G, A)
            z, nu, lam = pdipm.forward(Q, P.p, G, h, A, b, Q_LU, S_LU, R, tol, -1, 3, max_iter)[:3]
            if z is not None and lam is not None:
                return z, nu, lam
        except RuntimeError:  # qpth factorises the whole batch at once; a singular one fails it all
            pass
        return torch.full_like(P.p, torch.nan), None, P.p.new_full((B, G.shape[1]), torch.nan)

    def evaluate(z: Tensor, nu: Tensor | None, lam_kept: Tensor):
        lam = P.p.new_zeros(B, m)
        if not vacuous:
            lam[:, keep] = torch.where(P.rows[:, keep], lam_kept, 0.0)
        nu = nu.reshape(B, P.b.shape[-1]) if nu is not None and nu.numel() > 0 else P.p.new_zeros(B, P.b.shape[-1])
        res = _kkt_residual(P, _nan_to_zero(z), _nan_to_zero(lam), _nan_to_zero(nu))
        bad = ~(z.isfinite().all(-1) & lam.isfinite().all(-1))
        return z, lam, nu, torch.where(bad, torch.inf, res), bad

    z, lam, nu, res, bad = evaluate(*run(P.Q))
    if not bool((res <= tol).all()):
        # qpth fails or stalls on a singular Q (J H Jᵀ with dependent rows, say): retry with the smallest
        # shift that makes its factorisation possible and keep, per element, the answer whose KKT
        # residual for the *original* problem is smaller
        shift = _QPTH_SHIFT * (1 + P.Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1))
        z2, lam2, nu2, res2, bad2 = evaluate(*run(P.Q + shift[:, None, None] * torch.eye(n, dtype=P.Q.dtype,
                                                                                        device=P.Q.device)))
        better = res2 < res
        z, lam, nu = (torch.where(better[:, None], new, old) for new, old in ((z2, z), (lam2, lam), (nu2, nu)))
        res, bad = torch.where(better, res2, res), torch.where(better, bad2, bad)
    iterations = torch.full((B,), max_iter, dtype=torch.int64, device=P.p.device)
    status = _status(res, tol, bad, torch.zeros_like(bad))
    return _result(batch, dtype, z, status, lam, nu, iterations, res)
