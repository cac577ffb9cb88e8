"""``minimize``: run a constrained optimizer to its certificate, for scripts."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .certificate import Certificate, OptimizeResult, Status
from .constraints import Constraint
from .sqp import ConstrainedSQP

_METHODS = {"sqp": ConstrainedSQP}


def minimize(objective: Callable[[], Tensor], params: Iterable[Tensor],
             constraints: Sequence[Constraint] | None = None, method: str = "sqp", tol: float | None = None,
             max_iter: int = 1000, callback: Callable[[Certificate], bool | None] | None = None,
             progress: bool = False, time_limit: float | None = None, **options) -> OptimizeResult:
    """Minimize ``objective()`` subject to ``constraints`` over ``params``.

    Args:
        objective: zero-argument callable returning the scalar loss tensor (no ``backward`` needed).
        params: the tensors to optimize (``requires_grad=True``); they hold the returned point at the end.
        constraints: :func:`ineq` / :func:`eq` constraints.
        method: ``"sqp"`` (:class:`ConstrainedSQP`).
        tol: stationarity tolerance (``tol_opt`` of the optimizer); feasibility tolerances are options.
        max_iter: iteration limit.
        callback: called with the certificate after every iteration; returning True stops the run.
        progress: show a tqdm progress bar (needs ``tqdm``).
        time_limit: seconds of wall time after which the run stops.
        **options: passed to the optimizer (e.g. ``memory=10``).

    Returns:
        :class:`OptimizeResult`. When the last iterate is infeasible but a feasible one was found, the
        best feasible iterate is returned (``returned="best_feasible"``) and the message says so.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    params = list(params)
    if tol is not None:
        options["tol_opt"] = tol
    opt = _METHODS[method](params, constraints, **options)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective()
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss.backward()
        return loss

    bar = _progress_bar(max_iter) if progress else None
    history = []
    start = time.perf_counter()
    opt.step(closure)   # evaluates and certifies the starting point
    status = _record(opt, history, start, bar)
    while not opt.certificate.status.terminal and opt.certificate.status is not Status.CONVERGED:
        if opt.certificate.iteration >= max_iter:
            status = Status.MAX_ITER
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            status = Status.TIME_LIMIT
            break
        opt.step(closure)
        status = _record(opt, history, start, bar)
        if callback is not None and callback(opt.certificate):
            status = Status.CALLBACK
            break
    if bar is not None:
        bar.close()
    return _result(opt, params, closure, status, history)


def _record(opt, history: list, start: float, bar) -> Status:
    cert = opt.certificate
    history.append({"iteration": cert.iteration, "fun": cert.objective, "violation": cert.violation,
                    "stationarity": cert.stationarity, "penalty": cert.penalty, "nfev": opt.nfev,
                    "time": time.perf_counter() - start})
    if bar is not None:
        bar.n = cert.iteration
        bar.set_postfix(f=f"{cert.objective:.6g}", viol=f"{cert.violation:.1e}", stat=f"{cert.stationarity:.1e}")
    return cert.status


def _result(opt, params: list, closure, status: Status, history: list) -> OptimizeResult:
    cert = opt.certificate
    nit = cert.iteration
    returned, note = "last", ""
    best = opt.best_feasible
    if not cert.feasible and best is not None:
        # re-evaluate and certify the returned point itself, so that every number describes it
        opt.load_point(best["x"])
        opt.step(closure)
        cert = opt.certificate
        returned = "best_feasible"
        note = f"; the last iterate is infeasible, returning the best feasible iterate (iteration {best['iteration']})"
    if cert.status is not Status.CONVERGED:
        cert.status = status
    with torch.no_grad():
        x = [p.detach().clone() for p in params]
    return OptimizeResult(
        x=x, fun=cert.objective, nit=nit, nfev=opt.nfev, status=cert.status, message=cert.message + note,
        success=cert.status is Status.CONVERGED, violation=cert.violation, stationarity=cert.stationarity,
        multipliers=cert.multipliers, certificate=cert, returned=returned, history=history)


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from err
    return tqdm(total=total, desc="minimize", unit="it")
