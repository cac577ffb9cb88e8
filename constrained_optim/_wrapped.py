"""What the first-order constrained optimizers share: an inner torch optimizer, the closure protocol and
the KKT certificate on demand.

:class:`AugmentedLagrangian` and :class:`Penalty` hand an inner optimizer (Adam, SGD, LBFGS, ...) the
gradient of a merit function ``M(x) = f(x) + P(c(x))``,

    ∇M(x) = ∇f(x) + J(x)ᵀ w,    w = P'(c(x)),

where ``w`` depends on the constraint values only, so ``Jᵀw`` costs one vector-Jacobian product (never a
Jacobian). :class:`ProjectedGradient` shares the closure protocol and the certificate.

Closure protocol (the ordinary torch.optim one): ``step(closure)`` calls the closure, which zeroes the
grads, computes the loss and usually calls ``loss.backward()``. If it does *not* call backward, the
optimizer zeroes the grads and calls backward once on ``f + wᵀc`` (one backward for the loss and the constraints together: the
cheapest path when the constraints reuse the loss's forward pass). ``step()`` without a closure uses the
grads of a ``loss.backward()`` the user already ran, as with Adam.

The per-step certificate reports objective, violation, multipliers and penalty of the point the step
evaluated; it never claims convergence, because certifying stationarity needs the constraint Jacobian.
:meth:`certify` measures the full KKT certificate at the current parameters (one closure call and one
batched Jacobian) and is the only way these optimizers report ``CONVERGED``.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import stationarity
from ._flat import FlatParams
from .certificate import Certificate, Status, violations_by_name
from .constraints import canonical, evaluate
from .distributed import DataParallel, check_option

_WORK = torch.float64


def default_tolerance(dtype: torch.dtype) -> float:
    """First-order methods: ``max(1e-6, 100 eps)`` (1e-6 for float64, 1.2e-5 for float32)."""
    return max(1e-6, 100 * torch.finfo(dtype).eps)


class Shared:
    """An attribute stored in ``obj._aux``, a dict that Lightning's ``LightningOptimizer`` wrapper shares (it
    copies the optimizer's ``__dict__`` shallowly): state a method sets through the wrapper (``certify``) is
    then seen by the optimizer itself."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj._aux.get(self.name)

    def __set__(self, obj, value) -> None:
        obj._aux[self.name] = value


class PointRecord:
    """What every constrained optimizer keeps about its points (in ``self._state``): closure calls and the
    best feasible point; ``load_point`` writes a flat point back into the parameters."""

    @property
    def best_feasible(self) -> dict | None:
        """``{"x": flat tensor, "f": float, "iteration": int}`` of the lowest objective among feasible
        certified points."""
        return self._state.get("best_feasible")

    @property
    def nfev(self) -> int:
        """Closure calls so far."""
        return self._state.get("nfev", 0)

    def load_point(self, x: Tensor) -> None:
        """Write a flat point (e.g. ``best_feasible["x"]``) into the parameters; the next step or
        ``certify`` evaluates it."""
        self._flat.set(x.to(self._flat.dtype))


class ConstrainedOptimizer(DataParallel, PointRecord, torch.optim.Optimizer):
    """Base of the first-order constrained optimizers: parameters, constraints, tolerances, certificate,
    data-parallel reductions (``process_group``, see :mod:`constrained_optim.distributed`)."""

    _cert, _last, _p, _m, _slices, _fit, _g_scale = (Shared() for _ in range(7))

    def __init__(self, params: Iterable, constraints: Sequence | None, defaults: dict,
                 tol_opt: float | None, tol_ineq: float | None, tol_eq: float | None, process_group=None):
        for name, value in (("tol_opt", tol_opt), ("tol_ineq", tol_ineq), ("tol_eq", tol_eq)):
            if value is not None:
                check_positive(name, value)
        check_option(process_group)
        self._process_group = process_group
        self._aux = {}
        super().__init__(params, defaults)
        self._flat = FlatParams([p for group in self.param_groups for p in group["params"]])
        self._constraints = canonical(constraints)
        tol = default_tolerance(self._flat.dtype)
        self._tol_opt = tol_opt if tol_opt is not None else tol
        self._tol_ineq = tol_ineq if tol_ineq is not None else tol
        self._tol_eq = tol_eq if tol_eq is not None else tol
        self._cert: Certificate | None = None
        self._last: dict | None = None
        self._slices: dict[str, slice] = {}
        self._p = self._m = None
        self._fit = None
        self._g_scale = None

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (the inner optimizer's defaults fill its missing options)."""
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):
            group = self.param_groups[-1]
            inner = getattr(self, "_inner", None)
            for key, value in ({} if inner is None else inner.defaults).items():
                group.setdefault(key, value)
            self._flat = FlatParams([p for g in self.param_groups for p in g["params"]])
            self._m = None      # the constraints are checked again against the new parameters

    # ----------------------------------------------------------------------------------------- state
    # Algorithm state that a checkpoint must carry lives in ``self.state[first parameter]`` (so that
    # ``state_dict()`` holds it); what is rebuilt by the next evaluation lives in attributes.
    @property
    def _state(self) -> dict:
        return self.state[self._flat.params[0]]

    @property
    def certificate(self) -> Certificate:
        """The certificate of the last evaluated point: after :meth:`step`, the point that step evaluated
        (status IN_PROGRESS, stationarity not measured); after :meth:`certify`, the full KKT certificate
        of the current parameters."""
        if self._cert is None and self._last is not None:
            self._cert = self._running_certificate(**self._last)
        if self._cert is None:
            return Certificate(tol_opt=self._tol_opt, tol_ineq=self._tol_ineq, tol_eq=self._tol_eq)
        return self._cert

    def _record_step(self, loss: Tensor | None, c: Tensor, multipliers: Tensor | None, penalty) -> None:
        """Keep the step's tensors; the certificate is built from them only when read (no device sync)."""
        st = self._state
        st["steps"] = st.get("steps", 0) + 1
        self._cert = None
        self._last = dict(loss=None if loss is None else loss.detach(), c=c, multipliers=multipliers,
                          penalty=penalty, iteration=st["steps"])

    def _running_certificate(self, loss, c, multipliers, penalty, iteration) -> Certificate:
        ineq, eq = linf_violation(c.to(_WORK), self._p)
        lam = {} if multipliers is None else {name: multipliers[sl] for name, sl in self._slices.items()}
        return Certificate(stationarity=math.nan, complementarity=math.nan, ineq_violation=ineq, eq_violation=eq,
                           objective=math.nan if loss is None else float(loss), penalty=float(penalty),
                           multipliers=lam, violations=violations_by_name(c, self._p, self._slices),
                           iteration=iteration, tol_opt=self._tol_opt, tol_ineq=self._tol_ineq,
                           tol_eq=self._tol_eq)

    # ------------------------------------------------------------------------------------ evaluation
    def _call(self, closure: Callable[[], Tensor]) -> tuple[Tensor | None, bool]:
        """Run the closure; return the loss (None if the closure returned None after running backward) and
        whether it ran backward.

        The grads are not zeroed here: as with any torch optimizer that is the closure's job, and leaving
        them lets gradient accumulation (Lightning's ``accumulate_grad_batches``) add up. When the closure
        does not run backward, the optimizer owns the backward and zeroes the grads before it."""
        ran = [False]
        handles = [p.register_post_accumulate_grad_hook(lambda _: ran.__setitem__(0, True))
                   for p in self._flat.params]
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for handle in handles:
                handle.remove()
        st = self._state
        st["nfev"] = st.get("nfev", 0) + 1
        if loss is None and (ran[0] or any(p.grad is not None for p in self._flat.params)):
            # a closure that only runs backward, or none at all (Lightning's manual optimization passes a
            # do-nothing closure after the user's own backward): step on the grads as they are
            return None, True
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure returned a {type(loss).__name__}; it must return the loss tensor")
        if loss.numel() != 1:
            raise ValueError(f"the closure returned a loss of shape {tuple(loss.shape)}; expected a scalar")
        if not ran[0] and not loss.requires_grad:
            raise ValueError("the closure's loss does not depend on the parameters and no backward ran; "
                             "return a loss computed from the parameters")
        return loss, ran[0]

    def _constraint_values(self):
        values = evaluate(self._constraints, self._flat, check_dependence=self._m is None)
        if self._m is not None and values.m != self._m:
            raise ValueError(f"the constraints now have {values.m} scalar rows, but had {self._m}: the number "
                             "of constraint rows must stay fixed (fold per-batch constraints with fold='l2')")
        self._p, self._m, self._slices = values.p, values.m, values.slices
        return values

    def _mean_loss(self, loss: Tensor) -> Tensor:
        """Data-parallel: the loss averaged over the ranks (one all-reduce); else the loss itself."""
        reducer = self._reducer()
        return loss if reducer is None else reducer.mean(loss.detach())

    def _require_grads(self) -> None:
        if all(p.grad is None for p in self._flat.params):
            raise ValueError(f"{type(self).__name__}.step() without a closure needs the gradients of a "
                             "loss.backward() run before it; or pass a closure")

    # ----------------------------------------------------------------------------------- certificate
    @torch.no_grad()
    def certify(self, closure: Callable[[], Tensor]) -> Certificate:
        """Measure the full KKT certificate at the current parameters and return it.

        Calls the closure once (it should compute the full, deterministic objective) and builds the
        constraint Jacobian by one batched vector-Jacobian product; the multipliers are fitted exactly as
        in :class:`ConstrainedSQP` (see :mod:`constrained_optim.stationarity`). The status is CONVERGED
        when stationarity, complementarity and feasibility hold within tolerance, else IN_PROGRESS.
        The parameters are not changed. Data-parallel: every rank calls it with the closure of its shard
        (through the DDP wrapper or not: the loss gradient, values and Jacobian are averaged here) and gets
        the same certificate.
        """
        if closure is None:
            raise ValueError("certify needs a closure that computes the loss")
        self.zero_grad(set_to_none=True)
        loss, ran = self._call(closure)
        if loss is None:
            raise ValueError("certify needs a closure that returns the loss")
        if not ran:
            with torch.enable_grad():
                loss.backward(retain_graph=True)   # constraints may reuse the loss's forward pass
        st = self._state
        g = self._mean_gradient(self._flat).to(_WORK)
        with torch.enable_grad():
            values = self._constraint_values()
        loss = self._synchronize(values, loss)
        c, J = values.c.to(_WORK), values.structured_jacobian()
        f = float(loss.detach())
        ineq, eq = linf_violation(c, values.p)
        finite = math.isfinite(f) and bool(torch.isfinite(g).all()) and J.finite
        meas = None
        if finite:
            st.setdefault("g_ref", float(g.abs().max()) if g.numel() else 0.0)
            scale = max(float(g.abs().max()) if g.numel() else 0.0, st["g_ref"], torch.finfo(_WORK).tiny)
            self._g_scale = scale
            meas = stationarity.measure(g[None], [J], c, values.p, scale, self._tol_ineq, self._fit)
            self._fit = meas.qp
        solved = meas is not None and meas.solved
        lam = meas.multipliers if meas is not None else torch.full_like(c, math.nan)
        cert = Certificate(
            stationarity=meas.stationarity if solved else math.inf,
            complementarity=meas.complementarity if solved else math.inf,
            ineq_violation=ineq, eq_violation=eq, objective=f, penalty=self._certificate_penalty(),
            multipliers={name: lam[sl].to(self._flat.dtype) for name, sl in values.slices.items()},
            violations=violations_by_name(c, values.p, values.slices),
            iteration=st.get("steps", 0), tol_opt=self._tol_opt, tol_ineq=self._tol_ineq, tol_eq=self._tol_eq)
        cert.status = Status.CONVERGED if cert.kkt else Status.IN_PROGRESS
        self._cert = cert
        if cert.feasible and math.isfinite(f) and (st.get("best_feasible") is None or f < st["best_feasible"]["f"]):
            st["best_feasible"] = {"x": self._flat.get(), "f": f, "iteration": cert.iteration}
        return cert

    def _certificate_penalty(self) -> float:
        return 1.0


class PenalizedOptimizer(ConstrainedOptimizer):
    """An inner optimizer stepping on ∇M = ∇f + Jᵀw (see the module doc). Subclasses define

    * ``_observe(c) -> bool``: bookkeeping on the constraint values of each step's point (multiplier and
      penalty updates), called once per step before the weights; True when an inner LBFGS must forget
      its history,
    * ``_observe_gradient()``: called once per step with ∇M of the step's point in the grads,
    * ``_weights(c)``: w = P'(c),   ``_merit(c)``: P(c),   ``_multipliers(w)`` (the estimates to
      report), ``_penalty()`` (ρ as a tensor).
    """

    def __init__(self, params, constraints, optimizer, optimizer_options: dict, defaults: dict,
                 tol_opt, tol_ineq, tol_eq, process_group=None):
        super().__init__(params, constraints, defaults, tol_opt, tol_ineq, tol_eq, process_group)
        if not self._constraints:
            raise ValueError(f"{type(self).__name__} got no constraints: pass constraints=[co.ineq(fn), ...]; "
                             "for an unconstrained problem use the inner optimizer directly")
        self._inner = build_inner(optimizer, self.param_groups, optimizer_options)

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The inner torch optimizer (it shares this optimizer's ``param_groups``)."""
        return self._inner

    def state_dict(self) -> dict:
        return state_dict_with_inner(self, self._inner)

    def load_state_dict(self, state_dict: dict) -> None:
        load_state_dict_with_inner(self, self._inner, state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step of the inner optimizer on ∇f + Jᵀw. Returns the loss of the closure's first call."""
        if closure is None and isinstance(self._inner, torch.optim.LBFGS):
            raise ValueError("the inner optimizer LBFGS evaluates several points per step: call step(closure)")
        params = self._flat.params
        x_good = self._flat.get()
        calls = [0]

        def inner_closure():
            calls[0] += 1
            return merit if calls[0] == 1 else self._merit_gradient(closure, first=False)[1]

        try:
            loss, merit = self._merit_gradient(closure, first=True)
            if merit is None:
                return loss
            self._inner.step(inner_closure if closure is not None else None)
        except BaseException:
            self._flat.set(x_good)      # a closure that raised mid-step: keep the last good point
            raise
        if not all_finite(params):
            self._flat.set(x_good)
            warn_skipped(type(self).__name__, "the inner optimizer's new point")
        return loss

    def _merit_gradient(self, closure, first: bool) -> tuple[Tensor | None, Tensor | None]:
        """Leave ∇f + Jᵀw in the grads; return (loss, merit M). On the step's first call a non-finite loss,
        constraint or gradient skips the step: (loss, None)."""
        if closure is None:
            self._require_grads()
            loss, ran = None, True
        else:
            loss, ran = self._call(closure)
        with torch.enable_grad():
            values = self._constraint_values()
        local_loss, loss = loss, self._synchronize(values, loss)
        c = values.c
        if first and not all_finite([c, loss]):
            warn_skipped(type(self).__name__, "the loss or a constraint value")
            return loss, None
        if first:
            # the update tensors are replaced, never modified in place: a shallow copy restores them
            before = dict(self._state)
            if self._observe(c) and isinstance(self._inner, torch.optim.LBFGS):
                # new multipliers move the gradient of the merit function everywhere: LBFGS's stored
                # gradient difference would mix two functions (measured: its scale collapsed to 2e-7 and
                # every later step spent its full evaluation budget)
                self._inner.state.clear()
        w = self._weights(c)
        if ran:
            add_to_grads(self._flat.params, values.vjp_per_param(w, retain_graph=False))
        else:
            self.zero_grad(set_to_none=True)
            values.backward(w, local_loss)
        if first:
            self._check_replicas(self._flat)
        if first and not all_finite(p.grad for p in self._flat.params):
            self._state.clear()
            self._state.update(before)
            warn_skipped(type(self).__name__, "the gradient")
            return loss, None
        if first:
            self._observe_gradient()
        merit = self._merit(c) if loss is None else loss.detach().reshape(()) + self._merit(c)
        if first:
            self._record_step(loss, c, self._multipliers(w), self._penalty())
        return loss, merit

    def _observe_gradient(self) -> None:
        """Hook: ∇M at the step's point is in the grads."""

    def _certificate_penalty(self) -> float:
        rho = self._state.get("rho")
        return float(self._options["penalty"]) if rho is None else float(rho)


def build_inner(optimizer, param_groups: list[dict], options: dict) -> torch.optim.Optimizer:
    """An inner torch optimizer built on the outer optimizer's parameter groups (the same group dicts and
    list, so ``lr``, LR schedulers and added groups set on the outer optimizer reach the inner one)."""
    if isinstance(optimizer, type):
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer class or a factory, got {optimizer!r}")
        inner = optimizer(param_groups, **options)
    elif callable(optimizer):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be forwarded to a factory; set them inside it")
        inner = optimizer(param_groups)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned a {type(inner).__name__}, not a torch.optim.Optimizer")
    else:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer class or a factory params -> optimizer, "
                        f"got {type(optimizer).__name__}")
    if any(g is not h for g, h in zip(inner.param_groups, param_groups)) or \
            len(inner.param_groups) != len(param_groups):
        raise ValueError("the inner optimizer must be built on the parameter groups it is given")
    inner.param_groups = param_groups      # one list: groups added later reach both optimizers
    return inner


def state_dict_with_inner(outer: torch.optim.Optimizer, inner: torch.optim.Optimizer | None) -> dict:
    state = torch.optim.Optimizer.state_dict(outer)
    if inner is not None:
        state["inner"] = inner.state_dict()
    return state


def load_state_dict_with_inner(outer: torch.optim.Optimizer, inner: torch.optim.Optimizer | None,
                               state_dict: dict) -> None:
    """Load outer and inner state; on any mismatch raise ValueError and leave both as they were."""
    def bad(why: str):
        return ValueError(f"state_dict does not match this {type(outer).__name__}: {why}")
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise bad("expected a dict with keys 'state' and 'param_groups' (from its state_dict())")
    state_dict = dict(state_dict)
    inner_state = state_dict.pop("inner", None)
    if (inner is None) != (inner_state is None):
        raise bad("the inner optimizer's state is " + ("missing" if inner_state is None else "unexpected"))
    backup = copy.deepcopy(torch.optim.Optimizer.state_dict(outer))
    inner_backup = None if inner is None else copy.deepcopy(inner.state_dict())
    try:
        torch.optim.Optimizer.load_state_dict(outer, state_dict)
        if inner is not None:
            inner.load_state_dict(inner_state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        torch.optim.Optimizer.load_state_dict(outer, backup)
        if inner is not None:
            inner.load_state_dict(inner_backup)
            inner.param_groups = outer.param_groups
        raise bad(str(err)) from err
    if inner is not None:
        inner.param_groups = outer.param_groups       # share the group dicts again


def window_mean(st: dict, c: Tensor, options: dict, force: bool = False) -> Tensor | None:
    """Add c to the update window; when ``update_every`` values are in (or ``force``), return their
    mean c̄ and empty the window, else None."""
    if "window_n" not in st:
        st["window_sum"], st["window_n"], st["updates"] = torch.zeros_like(c), 0, 0
        st["rho"] = torch.tensor(float(options["penalty"]), dtype=c.dtype, device=c.device)
        st["v_prev"] = torch.tensor(math.inf, dtype=c.dtype, device=c.device)
    st["window_sum"] = st["window_sum"] + c
    st["window_n"] += 1
    if st["window_n"] < options["update_every"] and not force:
        return None
    c_bar = st["window_sum"] / st["window_n"]
    st["window_sum"], st["window_n"] = torch.zeros_like(c), 0
    st["updates"] += 1
    return c_bar


def grow_penalty(st: dict, c_bar: Tensor, p: int, options: dict, tol: float) -> None:
    """ρ ← min(γρ, ρ_max) when v(c̄) > tol and v(c̄) > β v(c̄ of the previous update); on the device."""
    v = torch.cat([c_bar[:p].clamp(min=0), c_bar[p:].abs()]).max()
    rho = st["rho"]
    stalled = (v > tol) & (v > options["violation_decrease"] * st["v_prev"])
    st["rho"] = torch.where(stalled, (rho * options["penalty_growth"]).clamp(max=options["max_penalty"]), rho)
    st["v_prev"] = v


def check_penalty_options(penalty, penalty_growth, max_penalty, violation_decrease, update_every) -> None:
    check_positive("penalty", penalty)
    check_positive("max_penalty", max_penalty)
    if max_penalty < penalty:
        raise ValueError(f"max_penalty must be >= penalty, got max_penalty={max_penalty!r} < penalty={penalty!r}")
    if isinstance(penalty_growth, bool) or not isinstance(penalty_growth, (int, float)) or \
            not 1.0 <= penalty_growth < math.inf:
        raise ValueError(f"penalty_growth must be a finite number >= 1, got {penalty_growth!r}")
    if isinstance(violation_decrease, bool) or not isinstance(violation_decrease, (int, float)) or \
            not 0.0 < violation_decrease <= 1.0:
        raise ValueError(f"violation_decrease must lie in (0, 1], got {violation_decrease!r}")
    check_positive_int("update_every", update_every)


def linf_violation(c: Tensor, p: int) -> tuple[float, float]:
    """(max_i max(c_I,i, 0), max_j |c_E,j|)."""
    ineq = float(c[:p].clamp(min=0).max()) if p else 0.0
    eq = float(c[p:].abs().max()) if c.numel() > p else 0.0
    return ineq, eq


def add_to_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def warn_skipped(name: str, what: str) -> None:
    warnings.warn(f"{name}: {what} is not finite; the step was skipped and the parameters keep their last "
                  "good values", RuntimeWarning, stacklevel=3)


def check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
