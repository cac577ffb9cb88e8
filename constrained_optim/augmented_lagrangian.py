"""AugmentedLagrangian: the method of multipliers around any torch optimizer.

For multipliers λ (λ_I >= 0) and a penalty ρ > 0 the augmented Lagrangian is

    L_ρ(x, λ) = f(x) + Σ_{j∈E} (λ_j c_j + ρ/2 c_j²) + Σ_{i∈I} (1/(2ρ)) (max(0, λ_i + ρ c_i)² − λ_i²),

    ∇_x L_ρ = ∇f + Jᵀw,    w_E = λ_E + ρ c_E,    w_I = max(0, λ_I + ρ c_I),

so each step costs one loss gradient and **one** vector-Jacobian product ``Jᵀw``. The inner optimizer
(Adam by default) steps on ∇_x L_ρ. Every ``update_every`` steps (or when the inner problem is solved,
see ``inner_tol``) the multipliers and the penalty are updated from the mean ``c̄`` of the constraint
values seen since the last update (a minibatch estimate of c when the constraints depend on the batch):

    λ_E ← λ_E + ρ c̄_E,    λ_I ← max(0, λ_I + ρ c̄_I),
    ρ   ← min(γ ρ, ρ_max)   if  v(c̄) > tol  and  v(c̄) > β · v(c̄_previous update),

with v the max violation (Bertsekas, *Constrained Optimization and Lagrange Multiplier Methods*, §2;
Nocedal & Wright §17.3). λ and ρ are kept on the parameters' device: no host synchronisation per step.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from ._wrapped import PenalizedOptimizer, check_penalty_options, check_positive, grow_penalty, window_mean


class AugmentedLagrangian(PenalizedOptimizer):
    r"""Minimize ``f`` subject to ``c_I <= 0``, ``c_E = 0`` by the augmented Lagrangian method.

    A drop-in replacement for the inner optimizer in a training loop: ``loss.backward(); opt.step()``
    or ``opt.step(closure)``; minibatches welcome (constraints may depend on the batch, their number of
    rows must stay fixed).

    Args:
        params: parameters or parameter groups (groups carry the inner optimizer's options, e.g. ``lr``).
        constraints: :func:`~constrained_optim.ineq` / :func:`~constrained_optim.eq` constraints and sets.
        optimizer: the inner optimizer: a ``torch.optim.Optimizer`` class (default ``torch.optim.Adam``)
            or a factory ``param_groups -> optimizer``.
        lr: the inner optimizer's learning rate (default: the inner optimizer's own default).
        penalty: initial ρ (1.0).
        penalty_growth: γ, the factor applied to ρ when the violation does not fall fast enough. Default
            1.0: ρ stays fixed. The method of multipliers converges for a fixed ρ, and with a stochastic or
            inexact inner optimizer (Adam at a fixed lr) the violation plateaus at the inner noise level,
            which a growth rule mistakes for a stall: ρ then climbs to ``max_penalty`` and the steps
            follow the constraints only (measured: 1.24 above the optimum of a 3-variable QP after
            3000 Adam steps with γ = 10, exact with γ = 1). Use γ = 10 with an inner solver that solves
            each subproblem (``minimize(method="alm")`` does, with LBFGS).
        max_penalty: ρ_max (1e6).
        violation_decrease: β, the required violation ratio between multiplier updates (0.25).
        update_every: steps between multiplier updates (10). The multiplier step ρ c̄ must not outrun the
            inner optimizer: with Adam at lr 1e-2 and ρ = 1, updating every step diverged on the test
            QP, every 10 steps converged to machine precision. For minibatch training about one epoch
            of steps gives less noisy multipliers.
        inner_tol: if given, also update as soon as ‖∇L_ρ‖∞ falls below ``inner_tol`` times its value at
            the first step after the previous update (inner problem approximately solved; one host sync
            per step).
        tol_opt, tol_ineq, tol_eq: certificate tolerances; default ``max(1e-6, 100 eps)``.
        process_group: data-parallel runs: ``None`` (default) reduces constraint values, the optimizer's own
            gradient products, loss values and certificates over the default process group when
            ``torch.distributed`` is initialized (see :mod:`constrained_optim.distributed`); a ProcessGroup
            to use another group; ``False`` never communicates.
        **optimizer_options: forwarded to the inner optimizer class (e.g. ``betas``, ``weight_decay``).

    State (``state_dict()``): multipliers λ, penalty ρ, the update window, the inner optimizer's state.
    """

    def __init__(self, params: Iterable, constraints: Sequence, optimizer=torch.optim.Adam, *,
                 lr: float | None = None, penalty: float = 1.0, penalty_growth: float = 1.0,
                 max_penalty: float = 1e6, violation_decrease: float = 0.25, update_every: int = 10,
                 inner_tol: float | None = None, tol_opt: float | None = None, tol_ineq: float | None = None,
                 tol_eq: float | None = None, process_group=None, **optimizer_options):
        check_penalty_options(penalty, penalty_growth, max_penalty, violation_decrease, update_every)
        if inner_tol is not None:
            check_positive("inner_tol", inner_tol)
        if lr is not None:
            check_positive("lr", lr)
            optimizer_options["lr"] = lr
        defaults = dict(penalty=penalty, penalty_growth=penalty_growth, max_penalty=max_penalty,
                        violation_decrease=violation_decrease, update_every=update_every, inner_tol=inner_tol)
        self._options = defaults
        super().__init__(params, constraints, optimizer, optimizer_options, defaults, tol_opt, tol_ineq, tol_eq,
                         process_group)

    @property
    def multipliers(self) -> dict[str, Tensor]:
        """The current multiplier estimates λ, by constraint name (empty before the first step)."""
        lam = self._state.get("lam")
        return {} if lam is None else {name: lam[sl] for name, sl in self._slices.items()}

    # ------------------------------------------------------------------------------- the hooks
    def _observe(self, c: Tensor) -> bool:
        st = self._state
        if "lam" not in st:
            st["lam"] = torch.zeros_like(c)
        c_bar = window_mean(st, c, self._options, force=self._inner_solved())
        if c_bar is not None:
            self._update(c_bar)
        return c_bar is not None

    def _inner_solved(self) -> bool:
        tol, st = self._options["inner_tol"], self._state
        if tol is None or "gnorm" not in st:
            return False
        return bool(st["gnorm"] <= tol * st["gnorm_start"])

    def _update(self, c_bar: Tensor) -> None:
        """λ ← [λ + ρ c̄]₊ (inequalities), λ + ρ c̄ (equalities); ρ grows if the violation stalls."""
        st, opts, p = self._state, self._options, self._p
        step = st["lam"] + st["rho"] * c_bar
        st["lam"] = torch.cat([step[:p].clamp(min=0), step[p:]])
        grow_penalty(st, c_bar, p, opts, min(self._tol_ineq, self._tol_eq))
        st.pop("gnorm", None)

    def _weights(self, c: Tensor) -> Tensor:
        lam, rho, p = self._state["lam"], self._state["rho"], self._p
        w = lam + rho * c
        return torch.cat([w[:p].clamp(min=0), w[p:]])

    def _merit(self, c: Tensor) -> Tensor:
        lam, rho, p = self._state["lam"], self._state["rho"], self._p
        ineq = ((lam[:p] + rho * c[:p]).clamp(min=0).square() - lam[:p].square()).sum() / (2 * rho)
        eq = (lam[p:] * c[p:]).sum() + 0.5 * rho * c[p:].square().sum()
        return ineq + eq

    def _multipliers(self, w: Tensor) -> Tensor:
        return self._state["lam"]

    def _penalty(self) -> Tensor:
        return self._state["rho"]

    def _observe_gradient(self) -> None:
        """Track ‖∇L_ρ‖∞ at each step's point for ``inner_tol`` (the first step after an update sets the
        reference)."""
        st = self._state
        if self._options["inner_tol"] is None:
            return
        grads = [p.grad.abs().max() for p in self._flat.params if p.grad is not None]
        gnorm = torch.stack(grads).max()
        if "gnorm" not in st:
            st["gnorm_start"] = gnorm
        st["gnorm"] = gnorm
