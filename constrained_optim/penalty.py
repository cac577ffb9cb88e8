"""Penalty: minimize f plus a penalty on the violation, with an increasing penalty parameter.

    quadratic:  M(x) = f(x) + ρ/2 (‖max(0, c_I)‖² + ‖c_E‖²),   w = ρ [max(0, c_I); c_E]
    l1 (exact): M(x) = f(x) + ρ (Σ max(0, c_I) + Σ |c_E|),      w = ρ [1(c_I > 0); sign(c_E)]

and ∇M = ∇f + Jᵀw (one vector-Jacobian product per step). The inner optimizer steps on ∇M.

What each kind can reach (the reason the comparison tables exist): the quadratic penalty's minimizer is
infeasible for every finite ρ, by about |λ*|/ρ (λ* the KKT multipliers), so feasibility to ``tol`` needs
ρ ≈ |λ*|/tol; the ℓ1 penalty is *exact* (its minimizer is the constrained one) once ρ > ‖λ*‖∞, but it is
nonsmooth on the constraint boundary, which gradient methods approach only slowly.

ρ follows ``schedule(step) -> ρ`` when given; otherwise it starts at ``penalty`` and grows by
``penalty_growth`` (up to ``max_penalty``) every ``update_every`` steps in which the mean violation did not
fall by the factor ``violation_decrease``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ._wrapped import PenalizedOptimizer, check_penalty_options, check_positive, grow_penalty, window_mean

_KINDS = ("quadratic", "l1")


class Penalty(PenalizedOptimizer):
    r"""Minimize ``f`` subject to ``c_I <= 0``, ``c_E = 0`` by a quadratic or exact ℓ1 penalty.

    Args:
        params: parameters or parameter groups (groups carry the inner optimizer's options).
        constraints: :func:`~constrained_optim.ineq` / :func:`~constrained_optim.eq` constraints and sets.
        kind: ``"quadratic"`` (default) or ``"l1"``.
        optimizer: inner ``torch.optim.Optimizer`` class (default Adam) or factory ``param_groups -> optimizer``.
        lr: the inner optimizer's learning rate (default: its own).
        penalty: initial ρ (1.0).
        schedule: ``callable(step) -> ρ`` (step counts from 1); replaces the adaptive rule below.
        penalty_growth, max_penalty, violation_decrease, update_every: the adaptive rule (10, 1e4, 0.25, 100:
            with a stochastic inner optimizer the window must be long enough to average the noise). The cap
            is low because Adam normalizes the gradient: with a large ρ its steps follow the constraint
            term and f hardly moves (measured on a 3-variable QP: 0.27 from the optimum after 5000 Adam
            steps with ρ_max = 1e8, 1e-4 with 1e4). ``minimize(method="penalty")``, whose inner LBFGS
            solves each subproblem, uses 1e8.
        tol_opt, tol_ineq, tol_eq: certificate tolerances; default ``max(1e-6, 100 eps)``.
        process_group: data-parallel runs: ``None`` (default) reduces constraint values, the optimizer's own
            gradient products, loss values and certificates over the default process group when
            ``torch.distributed`` is initialized (see :mod:`constrained_optim.distributed`); a ProcessGroup
            to use another group; ``False`` never communicates.
        **optimizer_options: forwarded to the inner optimizer class.

    The certificate's ``multipliers`` are the penalty's estimates ``w`` (for the quadratic penalty,
    ρ max(0, c) → λ* as ρ → ∞; for ℓ1, ρ on the violated rows).
    """

    def __init__(self, params: Iterable, constraints: Sequence, kind: str = "quadratic",
                 optimizer=torch.optim.Adam, *, lr: float | None = None, penalty: float = 1.0,
                 schedule: Callable[[int], float] | None = None, penalty_growth: float = 10.0,
                 max_penalty: float = 1e4, violation_decrease: float = 0.25, update_every: int = 100,
                 tol_opt: float | None = None, tol_ineq: float | None = None, tol_eq: float | None = None,
                 process_group=None, **optimizer_options):
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'quadratic' or 'l1', got {kind!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> penalty, got {type(schedule).__name__}")
        check_penalty_options(penalty, penalty_growth, max_penalty, violation_decrease, update_every)
        if lr is not None:
            check_positive("lr", lr)
            optimizer_options["lr"] = lr
        defaults = dict(kind=kind, penalty=penalty, penalty_growth=penalty_growth, max_penalty=max_penalty,
                        violation_decrease=violation_decrease, update_every=update_every)
        self._options = defaults
        self._schedule = schedule
        super().__init__(params, constraints, optimizer, optimizer_options, defaults, tol_opt, tol_ineq, tol_eq,
                         process_group)

    def _observe(self, c: Tensor) -> bool:
        st = self._state
        c_bar = window_mean(st, c, self._options)
        if self._schedule is not None:
            rho = self._schedule(st.get("steps", 0) + 1)
            check_positive("schedule(step)", rho)
            st["rho"] = torch.tensor(float(rho), dtype=c.dtype, device=c.device)
        elif c_bar is not None:
            grow_penalty(st, c_bar, self._p, self._options, min(self._tol_ineq, self._tol_eq))
        # a larger ρ changes only the curvature across the constraints: an inner LBFGS keeps its pairs,
        # whose tangential curvature is what the ill-conditioned subproblem needs (measured: resetting
        # them left hs035 at stationarity 4e-6 with ρ = 1e6 instead of certifying it)
        return False

    def _weights(self, c: Tensor) -> Tensor:
        rho, p = self._state["rho"], self._p
        if self._options["kind"] == "quadratic":
            return rho * torch.cat([c[:p].clamp(min=0), c[p:]])
        return rho * torch.cat([(c[:p] > 0).to(c.dtype), torch.sign(c[p:])])

    def _merit(self, c: Tensor) -> Tensor:
        rho, p = self._state["rho"], self._p
        r = torch.cat([c[:p].clamp(min=0), c[p:].abs()])
        if self._options["kind"] == "quadratic":
            return 0.5 * rho * r.square().sum()
        return rho * r.sum()

    def _multipliers(self, w: Tensor) -> Tensor:
        return w

    def _penalty(self) -> Tensor:
        return self._state["rho"]
