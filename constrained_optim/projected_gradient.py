"""ProjectedGradient: a gradient step, then the exact projection onto each parameter's set.

    step="fixed":  x ← P_S(x − α ∇f(x))                     (α = the group's ``lr``), or, with an inner
                   optimizer, x ← P_S(inner update of x)
    step="spg":    spectral projected gradient (Birgin, Martínez & Raydan 2000): the Barzilai–Borwein step
                   α = sᵀs / sᵀy (s, y: the last changes of x and ∇f), then α ← α/2 until
                   f(x₊) <= f(x) − c₁ ‖x₊ − x‖² / α holds, x₊ = P_S(x − α∇f(x)) (a sufficient decrease
                   test that is also valid for the nonconvex sets)
    step="apgd":   the APGD rule of Croce & Hein (2020) for a budget of N steps: z = P_S(x_k − η∇f(x_k)),
                   x_{k+1} = P_S(x_k + a(z − x_k) + (1 − a)(x_k − x_{k−1})) with momentum a = 0.75; at the
                   checkpoints w_j = ⌈p_j N⌉ (p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06))
                   η is halved and the iterate reset to the best point when fewer than 75 % of the steps
                   since the last checkpoint decreased f, or when neither η nor the best f changed

P_S projects every parameter that carries a set onto it (parameters without a set are free). The sets
are :mod:`constrained_optim.sets`; a function constraint cannot be projected onto and is refused.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ._wrapped import (_WORK, ConstrainedOptimizer, Shared, build_inner, all_finite, check_positive,
                       check_positive_int, load_state_dict_with_inner, state_dict_with_inner, warn_skipped)
from .certificate import Certificate, Status
from .constraints import Constraint, evaluate
from .sets import Set

_STEPS = ("fixed", "spg", "apgd")
_MOMENTUM = 0.75
_SUCCESS_FRACTION = 0.75
_MAX_BACKTRACKS = 40
_C1 = 1e-4


class ProjectedGradient(ConstrainedOptimizer):
    r"""Minimize ``f`` over simple sets by projected gradient steps.

    Args:
        params: parameters or parameter groups (``lr`` per group).
        sets: :mod:`constrained_optim.sets` objects (``co.Box``, ``co.Ball``, ...), at most one per parameter.
        constraints: accepted as an alias of ``sets`` (so the four optimizers share a signature); function
            constraints (``co.ineq``/``co.eq``) are refused with an error.
        optimizer: ``None`` (plain gradient step) or an inner torch optimizer class / factory whose update is
            followed by the projection (``step="fixed"`` only).
        lr: step length α (fixed), initial step (spg) or η₀ (apgd); default 1e-3.
        step: ``"fixed"`` (default), ``"spg"`` or ``"apgd"`` (see the module doc; both need a closure).
        apgd_steps: the budget N of the APGD checkpoints (required with ``step="apgd"``).
        tol_opt, tol_ineq, tol_eq: certificate tolerances (:meth:`certify`); default ``max(1e-6, 100 eps)``.
        process_group: data-parallel runs: ``None`` (default) reduces constraint values, the optimizer's own
            gradient products, loss values and certificates over the default process group when
            ``torch.distributed`` is initialized (see :mod:`constrained_optim.distributed`); a ProcessGroup
            to use another group; ``False`` never communicates.
        **optimizer_options: forwarded to the inner optimizer class.
    """

    _cache = Shared()   # (x, loss, grad) of the last accepted trial point (spg): saves one closure call

    def __init__(self, params: Iterable, sets: Sequence[Set] | None = None, constraints: Sequence | None = None,
                 optimizer=None, *, lr: float = 1e-3, step: str = "fixed", apgd_steps: int | None = None,
                 tol_opt: float | None = None, tol_ineq: float | None = None, tol_eq: float | None = None,
                 process_group=None, **optimizer_options):
        check_positive("lr", lr)
        if step not in _STEPS:
            raise ValueError(f"step must be one of {_STEPS}, got {step!r}")
        if step == "apgd":
            if apgd_steps is None:
                raise ValueError("step='apgd' needs apgd_steps, the step budget that places its checkpoints")
            check_positive_int("apgd_steps", apgd_steps)
        if optimizer is not None and step != "fixed":
            raise ValueError(f"an inner optimizer is used with step='fixed' only, got step={step!r}")
        if optimizer is None and optimizer_options:
            raise TypeError(f"unexpected options {sorted(optimizer_options)} (no inner optimizer given)")
        all_sets = _collect_sets(sets, constraints)
        defaults = dict(lr=lr, step=step, apgd_steps=apgd_steps)
        super().__init__(params, all_sets, defaults, tol_opt, tol_ineq, tol_eq, process_group)
        self._sets = all_sets
        _check_sets_on_params(all_sets, self._flat.params)
        self._inner = (build_inner(optimizer, self.param_groups, optimizer_options)
                       if optimizer is not None else None)
        self._cache = None

    @property
    def sets(self) -> list[Set]:
        return list(self._sets)

    def state_dict(self) -> dict:
        return state_dict_with_inner(self, self._inner)

    def load_state_dict(self, state_dict: dict) -> None:
        load_state_dict_with_inner(self, self._inner, state_dict)
        self._cache = None

    @torch.no_grad()
    def certify(self, closure: Callable[[], Tensor]) -> Certificate:
        """The KKT certificate of the current point (see :meth:`ConstrainedOptimizer.certify`).

        When every set is convex, stationarity and complementarity are also measured without multipliers,
        by the projected gradient: x is stationary on a convex set S iff x = P_S(x − t∇f(x)) for t > 0, and

            r = ‖x − P_S(x − t∇f(x))‖∞ / (t s),   t = tol_ineq / ‖∇f(x)‖∞,

        says that y = P_S(x − t∇f), within t‖∇f‖∞ r s <= tol_ineq of x, satisfies ∇f(x) + v = (x − y)/t with v
        in the normal cone of S at y. The certificate keeps the smaller of the two measures: the multiplier
        fit cannot certify kinks of a set's constraint function (the ℓ1 ball where coordinates vanish).
        Computed in float64.
        """
        cert = super().certify(closure)
        if cert.converged or not cert.feasible or self._g_scale is None or not all(s.convex for s in self._sets):
            return cert
        x, g = self._flat.get().to(_WORK), self._flat.grad().to(_WORK)
        t = self._tol_ineq / max(float(g.abs().max()), torch.finfo(_WORK).tiny)
        r = float((x - self._project_vector(x - t * g)).abs().max()) / (t * self._g_scale)
        cert.stationarity = min(cert.stationarity, r)
        cert.complementarity = min(cert.complementarity, r)
        if cert.kkt:
            cert.status = Status.CONVERGED
        return cert

    def _project_vector(self, x: Tensor) -> Tensor:
        """P_S applied to a flat vector (any dtype) without touching the parameters."""
        chunks = list(x.split(self._flat.numels))
        for s in self._sets:
            i = next(k for k, p in enumerate(self._flat.params) if p is s.param)
            chunks[i] = s.project(chunks[i].view(s.param.shape)).reshape(-1)
        return torch.cat(chunks)

    # --------------------------------------------------------------------------------- projection
    @torch.no_grad()
    def project(self) -> None:
        """Project every parameter that carries a set onto it, in place."""
        for s in self._sets:
            s.project_()

    def _project_flat(self, x: Tensor) -> Tensor:
        self._flat.set(x)
        self.project()
        return self._flat.get()

    # --------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One projected step. Returns the loss at the point the step started from."""
        rule = self.defaults["step"]
        if rule != "fixed" and closure is None:
            raise ValueError(f"step={rule!r} evaluates f at trial points: call step(closure)")
        if "steps" not in self._state:
            self.project()      # start from a point of the sets
        x = self._flat.get()
        c = self._set_values()
        try:
            loss, g = self._loss_and_grad(closure, x)
            if not all_finite([loss, g]):
                warn_skipped("ProjectedGradient", "the loss or its gradient")
                return loss
            status = Status.IN_PROGRESS
            if rule == "fixed":
                self._fixed(g)
            elif rule == "spg":
                status = self._spg(closure, x, loss, g)
            else:
                self._apgd(x, loss, g)
        except BaseException:
            self._flat.set(x)           # a closure that raised mid-step: keep the last good point
            raise
        if not all_finite(self._flat.params):
            self._flat.set(x)
            warn_skipped("ProjectedGradient", "the new point")
        self._record_step(loss, c, None, 1.0)
        self._last["status"] = status
        return loss

    def _loss_and_grad(self, closure, x: Tensor) -> tuple[Tensor | None, Tensor]:
        if self._cache is not None and torch.equal(self._cache[0], x):
            _, loss, g = self._cache
            self._flat.set_grad(g)
            return loss, g
        if closure is None:
            if all(p.grad is None for p in self._flat.params):
                raise ValueError("ProjectedGradient.step() without a closure needs the gradients of a "
                                 "loss.backward() run before it; or pass a closure")
            self._check_replicas(self._flat)
            return None, self._flat.grad()
        loss, ran = self._call(closure)
        if loss is None:
            if self.defaults["step"] != "fixed":
                raise ValueError(f"step={self.defaults['step']!r} needs a closure that returns the loss")
            return None, self._flat.grad()
        if not ran:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss.backward()
        self._check_replicas(self._flat)
        return self._mean_loss(loss.detach()), self._flat.grad()

    def _fixed(self, g: Tensor) -> None:
        if self._inner is not None:
            self._inner.step()
        else:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        self.project()

    def _spg(self, closure, x: Tensor, loss: Tensor, g: Tensor) -> Status:
        st = self._state
        alpha = st.get("alpha", self.defaults["lr"])
        if "x_prev" in st:
            s, y = x - st["x_prev"], g - st["g_prev"]
            sy = float(s.dot(y))
            alpha = float(s.dot(s)) / sy if sy > 0 else alpha * 10
            alpha = min(max(alpha, 1e-12), 1e12)
        f0 = float(loss)
        for _ in range(_MAX_BACKTRACKS):
            trial = self._project_flat(x - alpha * g)
            moved = float((trial - x).square().sum())
            if moved == 0.0:
                self._flat.set(x)
                return Status.STALLED_FEASIBLE      # P_S(x − α∇f) = x: no projected descent left
            f_trial, ran = self._call(closure)
            if not ran:
                self.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    f_trial.backward()
            f_trial = self._mean_loss(f_trial.detach())
            # sufficient decrease f(x₊) <= f(x) − c₁‖x₊ − x‖²/α: valid for nonconvex sets too
            if math.isfinite(float(f_trial)) and float(f_trial) <= f0 - _C1 * moved / alpha:
                g_trial = self._flat.grad()
                st["x_prev"], st["g_prev"], st["alpha"] = x, g, alpha
                self._cache = (trial, f_trial, g_trial)
                return Status.IN_PROGRESS
            alpha *= 0.5
        self._flat.set(x)
        return Status.STALLED_FEASIBLE

    def _apgd(self, x: Tensor, loss: Tensor, g: Tensor) -> None:
        st, budget = self._state, self.defaults["apgd_steps"]
        f = float(loss)
        if "eta" not in st:
            st.update(eta=self.defaults["lr"], k=0, successes=0, f_prev=math.inf, x_prev=x, best_f=f, best_x=x,
                      checkpoint=0, last_checkpoint=0, eta_at_checkpoint=math.nan, best_at_checkpoint=math.nan)
        k = st["k"]
        st["successes"] += int(f < st["f_prev"])
        if f < st["best_f"]:
            st["best_f"], st["best_x"] = f, x
        if k > 0 and k >= _checkpoint(st["checkpoint"] + 1, budget):
            span = k - st["last_checkpoint"]
            few_successes = st["successes"] < _SUCCESS_FRACTION * span
            no_change = st["eta_at_checkpoint"] == st["eta"] and st["best_at_checkpoint"] == st["best_f"]
            st["eta_at_checkpoint"], st["best_at_checkpoint"] = st["eta"], st["best_f"]
            st["checkpoint"] += 1
            st["last_checkpoint"], st["successes"] = k, 0
            if few_successes or no_change:
                st["eta"] *= 0.5
                st.update(k=k + 1, x_prev=st["best_x"], f_prev=math.inf)
                self._flat.set(st["best_x"])
                return
        z = self._project_flat(x - st["eta"] * g)
        a = 1.0 if k == 0 else _MOMENTUM
        new = self._project_flat(x + a * (z - x) + (1 - a) * (x - st["x_prev"]))
        st.update(k=k + 1, x_prev=x, f_prev=f)
        self._flat.set(new)

    def _set_values(self) -> Tensor:
        """Constraint values of the sets at the current point (for the per-step certificate)."""
        values = evaluate(self._constraints, self._flat)
        self._p, self._slices = values.p, values.slices
        return values.c

    def _running_certificate(self, status=Status.IN_PROGRESS, **last):
        cert = super()._running_certificate(**last)
        cert.status = status
        return cert


def _checkpoint(j: int, budget: int) -> int:
    """w_j = ⌈p_j N⌉ of APGD."""
    p_prev, p = 0.0, 0.22
    if j == 0:
        return 0
    for _ in range(j - 1):
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return math.ceil(p * budget)


def _collect_sets(sets, constraints) -> list[Set]:
    collected = []
    for source, items in (("sets", sets), ("constraints", constraints)):
        if items is None:
            continue
        if isinstance(items, (Set, Constraint)):
            items = [items]
        for i, item in enumerate(items):
            if isinstance(item, Constraint):
                raise ValueError(
                    f"ProjectedGradient projects onto sets only; {source}[{i}] is the function constraint "
                    f"{item!r}, which has no projection. Use co.ConstrainedSQP, co.AugmentedLagrangian or "
                    "co.Penalty for function constraints, or state it as a set (co.Box, co.Ball, ...)")
            if not isinstance(item, Set):
                raise TypeError(f"{source}[{i}] is a {type(item).__name__}; expected a set such as co.Box(param, ...)")
            collected.append(item)
    if not collected:
        raise ValueError("ProjectedGradient got no sets: pass sets=[co.Box(param, ...), ...]")
    return collected


def _check_sets_on_params(sets: list[Set], params: list[Tensor]) -> None:
    seen = {}
    for s in sets:
        if not any(s.param is p for p in params):
            raise ValueError(f"{s!r} is attached to a tensor that is not one of this optimizer's parameters")
        if id(s.param) in seen:
            raise ValueError(f"{seen[id(s.param)]!r} and {s!r} constrain the same parameter; the projection onto "
                             "an intersection of sets is not available (use ConstrainedSQP or AugmentedLagrangian)")
        seen[id(s.param)] = s
