"""``minimize``: run a constrained optimizer to its certificate, for scripts."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .augmented_lagrangian import AugmentedLagrangian
from .certificate import Certificate, OptimizeResult, Status
from .constraints import Constraint
from .penalty import Penalty
from .projected_gradient import ProjectedGradient
from .sqp import ConstrainedSQP

_METHODS = ("sqp", "alm", "penalty", "pgd")


def _lbfgs(param_groups):
    """The inner solver of "alm" and "penalty" in scripts: deterministic problems, solved accurately."""
    return torch.optim.LBFGS(param_groups, lr=1.0, max_iter=100, history_size=20, tolerance_grad=1e-12,
                             tolerance_change=1e-15, line_search_fn="strong_wolfe")


def _build(method: str, params: list, constraints, options: dict) -> torch.optim.Optimizer:
    if method == "sqp":
        return ConstrainedSQP(params, constraints, **options)
    if method == "pgd":
        options.setdefault("step", "spg")
        return ProjectedGradient(params, constraints=constraints, **options)
    if "optimizer" not in options:
        # each step solves the inner problem (LBFGS), so the classical outer loop applies: update the
        # multipliers after every inner solve and grow the penalty when the violation stalls
        options["optimizer"] = _lbfgs
        options.setdefault("update_every", 1)
        if method == "alm":
            options.setdefault("penalty_growth", 10.0)
        else:
            options.setdefault("max_penalty", 1e8)
    cls = AugmentedLagrangian if method == "alm" else Penalty
    return cls(params, constraints, **options)


def minimize(objective: Callable[[], Tensor], params: Iterable[Tensor],
             constraints: Sequence[Constraint] | None = None, method: str = "sqp", tol: float | None = None,
             max_iter: int = 1000, callback: Callable[[Certificate], bool | None] | None = None,
             progress: bool = False, time_limit: float | None = None, **options) -> OptimizeResult:
    """Minimize ``objective()`` subject to ``constraints`` over ``params``.

    Args:
        objective: zero-argument callable returning the scalar loss tensor (no ``backward`` needed).
        params: the tensors to optimize (``requires_grad=True``); they hold the returned point at the end.
        constraints: :func:`ineq` / :func:`eq` constraints.
        method: ``"sqp"`` (:class:`ConstrainedSQP`, the default), ``"alm"`` (:class:`AugmentedLagrangian`),
            ``"penalty"`` (:class:`Penalty`) or ``"pgd"`` (:class:`ProjectedGradient`, sets only). For
            "alm" and "penalty" the inner solver defaults to ``torch.optim.LBFGS`` (strong Wolfe, up to
            100 iterations per step) with multipliers updated after every step, the ALM penalty grows
            10× when the violation does not fall 4×, the quadratic penalty up to 1e8; "pgd" defaults to ``step="spg"``. These three are
            certified by :meth:`certify` after every step (one extra closure call and Jacobian).
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
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    params = list(params)
    if tol is not None:
        options["tol_opt"] = tol
    opt = _build(method, params, constraints, options)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective()
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss.backward()
        return loss

    bar = _progress_bar(max_iter) if progress else None
    history = []
    start = time.perf_counter()
    if method == "sqp":
        opt.step(closure)   # evaluates and certifies the starting point
    else:
        opt.certify(closure)
    status = _record(opt, history, start, bar)
    while not opt.certificate.status.terminal and opt.certificate.status is not Status.CONVERGED:
        if len(history) > max_iter:
            status = Status.MAX_ITER
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            status = Status.TIME_LIMIT
            break
        opt.step(closure)
        if method != "sqp":
            stop = opt.certificate.status          # a stall reported by the step itself
            if not opt.certify(closure).converged and stop.terminal:
                opt.certificate.status = stop
        status = _record(opt, history, start, bar)
        if callback is not None and callback(opt.certificate):
            status = Status.CALLBACK
            break
    if bar is not None:
        bar.close()
    return _result(opt, params, closure, status, history, method)


def _record(opt, history: list, start: float, bar) -> Status:
    cert = opt.certificate
    history.append({"iteration": cert.iteration, "fun": cert.objective, "violation": cert.violation,
                    "stationarity": cert.stationarity, "penalty": cert.penalty, "nfev": opt.nfev,
                    "time": time.perf_counter() - start})
    if bar is not None:
        bar.n = cert.iteration
        bar.set_postfix(f=f"{cert.objective:.6g}", viol=f"{cert.violation:.1e}", stat=f"{cert.stationarity:.1e}")
    return cert.status


def _result(opt, params: list, closure, status: Status, history: list, method: str) -> OptimizeResult:
    cert = opt.certificate
    nit = cert.iteration
    returned, note = "last", ""
    best = opt.best_feasible
    if not cert.feasible and best is not None:
        # re-evaluate and certify the returned point itself, so that every number describes it
        opt.load_point(best["x"])
        if method == "sqp":
            opt.step(closure)
        else:
            opt.certify(closure)
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
