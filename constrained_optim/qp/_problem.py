"""The QP batch: status and result types, the flattened ``_Problem``, its KKT residual and
equilibration, input checking and broadcasting, and building the result."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import _F64, _amax, _mtv, _mv, _nan_to_zero


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
    """D = diag(Q)^{-1/2}, so that DQD has unit diagonal; 1 where the diagonal is zero, or rounding next to the
    largest one (≤ eps max_j Q_jj, e.g. a row of J that vanishes at x in Q = J H Jᵀ: scaling it by 1/√Q_ii would
    blow its linear term up to the size that every residual is measured against)."""
    diag = Q.diagonal(dim1=-2, dim2=-1)
    floor = (torch.finfo(Q.dtype).eps * _amax(diag)).clamp(min=1e-300)
    return torch.where(diag > floor.unsqueeze(-1), diag.clamp(min=1e-300).rsqrt(), 1.0)


def _row_scale(M: Tensor) -> Tensor:
    norm = _amax(M)
    return torch.where(norm > 1e-300, 1.0 / norm.clamp(min=1e-300), 1.0)


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
    """The batch shapes broadcast together (``torch.broadcast_shapes``, whose general path costs more than a small
    QP's arithmetic, only where a shape is neither empty nor the longest one)."""
    longest = max(shapes.values(), key=len)
    if all(len(shape) == 0 or shape == longest for shape in shapes.values()):
        return torch.Size(longest)
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
