"""ConstrainedSQP: BFGS-SQP with penalty steering and a KKT certificate.

One ``step(closure)`` is one outer iteration of (Curtis, Mitchell & Overton 2017)::

    d, μ  ← steered penalty-QP direction at x                      (steering.py, qp/)
    t     ← weak Wolfe line search on φ(·; μ) = μ f + v along d     (linesearch.py)
    x₊    = x + t d
    H     ← damped BFGS update with s = x₊ − x and the change of the gradient of the
            Lagrangian μ f + ŷᵀc of the penalty QP (ŷ: its dual solution),
            y = μ(∇f₊ − ∇f) + (J₊ − J)ᵀŷ                           (hessian.py)
    certificate at x₊                                              (stationarity.py)

Internally every vector is float64 (``x``, gradients, H, the m-sized QPs), whatever the parameters' dtype;
parameters keep their own dtype and device. The constraint Jacobian stays in the parameters' dtype and is
used as an operator (:class:`~constrained_optim.jacobian.Jacobian`: products accumulate in float64, bound rows
of boxes are never formed).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import stationarity
from ._flat import FlatParams, max_abs, within
from ._wrapped import PointRecord, check_positive, linf_violation
from .certificate import Certificate, Status, violations_by_name
from .constraints import Constraint, ConstraintValues, canonical, evaluate
from .distributed import DataParallel, check_option
from .hessian import LBFGS, DenseBFGS, GradientChange, Sandwich
from .jacobian import Jacobian
from .linesearch import LineSearchResult, Outcome, step_resolution, weak_wolfe
from .qp import QPResult
from .steering import Steering, at_rounding, phi_noise, violation, violation_weights

_WORK = torch.float64
_EPS = torch.finfo(_WORK).eps
_CORRECTIONS = 3             # second-order corrections tried at the full step (J kept fixed)
_RESCUES = 3                 # random perturbations off a kink allowed per run
_DENSE_LIMIT = 4096          # memory=None: dense BFGS up to this many variables, L-BFGS beyond
_AUTO_MEMORY = 20
_SAMPLE_QP_LIMIT = 1000      # largest gradient-sampling QP (k (1 + m − s) + s variables, stationarity.py)
_SAMPLE_BUDGET = 1 << 24     # numbers held by the gradient samples, samples × (m + 2) n (128 MiB in float64)
_MANY_ROWS = 1000            # more scalar constraint rows than this: warn (m×m dual QP, m×n Jacobian)


@dataclass
class _Point:
    """f, ∇f, c and (once needed) J at one point x."""

    x: Tensor
    f: float
    g: Tensor
    c: Tensor
    values: ConstraintValues
    loss: Tensor
    J: Jacobian | None = None
    previous: Jacobian | None = None    # the current point's J, for rows that did not change (trial points)
    _sandwich: tuple | None = None

    def jacobian(self) -> Jacobian:
        if self.J is None:
            self.J = self.values.structured_jacobian()
            if self.previous is not None:
                self.J.share_unchanged(self.previous)
                self.previous = None
        return self.J

    def sandwich(self, H) -> Sandwich:
        """``J H Jᵀ``, ``J H ∇f`` (and the step of a dual solution) of the penalty QP, computed once per point and
        ``H.version``."""
        if self._sandwich is None or self._sandwich[0] is not H or self._sandwich[1] != H.version:
            sandwich = H.sandwich(self.jacobian(), self.g)      # (which may settle a deferred update: H.version after)
            self._sandwich = (H, H.version, sandwich)
        return self._sandwich[2]

    @property
    def known_Jg(self) -> Tensor | None:
        """``J ∇f`` if the sandwich computed it, else None."""
        return None if self._sandwich is None else self._sandwich[2].Jg

    @cached_property
    def x_inf(self) -> float:
        """``‖x‖∞``, computed once."""
        return max_abs(self.x)

    @cached_property
    def g_inf(self) -> float:
        """``‖∇f‖∞``, computed once (NaN or inf where ∇f holds one)."""
        return max_abs(self.g)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and math.isfinite(self.g_inf) and _all_finite(self.c)

    @property
    def jacobian_finite(self) -> bool:
        return self.jacobian().finite


class ConstrainedSQP(DataParallel, PointRecord, torch.optim.Optimizer):
    r"""Minimize ``f(x)`` subject to ``c_I(x) <= 0`` and ``c_E(x) = 0`` by BFGS-SQP with steering.

    ``step(closure)`` performs one outer iteration; the closure is the ordinary torch.optim closure
    (zero the grads, compute the loss, ``loss.backward()``, return the loss) and is called as many
    times as the line search needs. After each step, :attr:`certificate` tells whether the KKT
    conditions hold (``certificate.converged``) and why the run stopped if it did.

    Args:
        params: parameters to optimize (one dtype and device).
        constraints: list of :func:`~constrained_optim.ineq` / :func:`~constrained_optim.eq` constraints
            (at least one: an empty list is an error).
        mu0: initial penalty parameter μ on the objective (default 1.0). μ only decreases.
        memory: ``None`` (default): dense BFGS when the number of variables n <= 4096, otherwise
            L-BFGS with 20 pairs; an int k > 0: L-BFGS with k pairs (O(k n) memory).
        tol_opt: stationarity and complementarity tolerance (relative, see :class:`Certificate`).
            Default ``max(1e-8, 100 eps)`` of the parameters' dtype (1e-8 for float64, 1.2e-5 for float32).
        tol_ineq, tol_eq: absolute feasibility tolerances (max violation). Default
            ``max(1e-8, 100 eps)`` (1e-8 for float64, 1.2e-5 for float32).
        c_v, c_mu, max_steering: steering constants (0.1, 0.9, 10).
        c1, c2: sufficient-decrease and curvature constants of the weak Wolfe search (1e-4, 0.5).
        max_ls_evals: closure calls allowed per line search (50).
        ngrad: gradients kept for the nonsmooth (gradient-sampling) stationarity test.
            Default ``min(100, 2n, n + 10)``, capped so that the samples (x, ∇f and J at each) hold at most
            2²⁴ numbers, ``samples · (m + 2) · n <= 2²⁴`` (128 MiB in float64): at n = 10⁶ only the current point
            is sampled, whatever m. A fit uses the newest k nearby samples whose QP has at most 1000 variables,
            ``k (1 + m − s) + s <= 1000`` for s rows equal at all of them (constraints linear in x).
        sample_radius: only iterates within ``sample_radius · max(1, ‖x‖∞)`` of x are sampled. A
            sampled certificate says that x is within that distance of a point where the gradients
            nearly cancel (Clarke ε-stationarity), so the default is small: ``max(1e-8, 10 eps)``.
        damping: BFGS damping θ (0.2, Powell's value: H is fed Lagrangian differences, whose curvature
            may be negative, and θ bounds how much one damped update can stretch H).
        max_stall: stop with a STALLED status after this many consecutive iterations whose step
            changed x by less than 10 eps relative (5).
        qp_solver: solver of the direction QP: ``"builtin"`` (default) or ``"qpth"`` (optional package,
            ``pip install --no-deps qpth``). The certificate's multiplier fit always uses the builtin
            solver, so that the certificate does not depend on an optional backend's accuracy.
        seed: seed of the generator used for the rare random perturbation off a kink (0).
        process_group: data-parallel runs (full batch per rank, the objective is the mean of the ranks'
            losses): ``None`` (default) reduces the loss value, the constraint values and the Jacobian over the
            default process group when ``torch.distributed`` is initialized — one all-gather and, when the
            Jacobian is needed, one all-reduce per evaluation — so that every rank takes the same steps and
            reports the same certificate (see :mod:`constrained_optim.distributed`); a ProcessGroup to use
            another group; ``False`` never communicates.
    """

    def __init__(self, params: Iterable[Tensor], constraints: Sequence[Constraint] | None = None, *,
                 mu0: float = 1.0, memory: int | None = None, tol_opt: float | None = None,
                 tol_ineq: float | None = None, tol_eq: float | None = None, c_v: float = 0.1,
                 c_mu: float = 0.9, max_steering: int = 10, c1: float = 1e-4, c2: float = 0.5,
                 max_ls_evals: int = 50, max_stall: int = 5, ngrad: int | None = None, sample_radius: float | None = None,
                 damping: float = 0.2, qp_solver: str = "builtin", seed: int = 0, process_group=None):
        check_option(process_group)
        self._process_group = process_group
        defaults = dict(mu0=mu0, memory=memory, tol_opt=tol_opt, tol_ineq=tol_ineq, tol_eq=tol_eq, c_v=c_v,
                        c_mu=c_mu, max_steering=max_steering, c1=c1, c2=c2, max_ls_evals=max_ls_evals, max_stall=max_stall,
                        ngrad=ngrad, sample_radius=sample_radius, damping=damping, qp_solver=qp_solver,
                        seed=seed)
        check_options(**{k: v for k, v in defaults.items() if k != "seed"})
        super().__init__(params, defaults)
        self._flat = FlatParams([p for group in self.param_groups for p in group["params"]])
        self._constraints = canonical(constraints)
        if not self._constraints:
            raise ValueError("ConstrainedSQP got no constraints: pass constraints=[co.ineq(fn), co.eq(fn), ...]; "
                             "for an unconstrained problem use torch.optim.LBFGS")
        self._tol_opt, self._tol_ineq, self._tol_eq, self._radius, self._steering = tolerances_and_steering(
            self._flat.dtype, self.defaults)
        n = self._flat.n
        if memory is None and n > _DENSE_LIMIT:
            memory = _AUTO_MEMORY
        self._memory = memory
        self._ngrad = ngrad if ngrad is not None else min(100, 2 * n, n + 10)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._evaluated: Tensor | None = None      # x of the last evaluation: what the parameters hold

    # ----------------------------------------------------------------------------------------- state
    @property
    def _state(self) -> dict:
        return self.state[self._flat.params[0]]

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters. All groups are optimized jointly and the options are global: a group may not
        override them. Adding a group after the first step restarts the method on the enlarged problem."""
        overrides = sorted(k for k in param_group if k != "params" and k in self.defaults
                           and param_group[k] != self.defaults[k])
        if overrides:
            raise ValueError(f"ConstrainedSQP options are global (all parameters form one problem); a parameter "
                             f"group cannot override {overrides}")
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):
            self._flat = FlatParams([p for group in self.param_groups for p in group["params"]])
            self.state.clear()
            self._steering.reset()

    def state_dict(self) -> dict:
        """Everything a resumed run needs to repeat the uninterrupted one exactly: the iterate, μ, the
        BFGS/L-BFGS memory, the sampled gradients, counters, best points, the QP warm starts, the RNG of
        the kink perturbation and the certificate. Plain tensors and Python values only (loads with
        ``torch.load(weights_only=True)``)."""
        st = self._state
        saved = {k: st[k] for k in _SCALARS if k in st}
        if "x" in st:
            H = st["hessian"]
            saved.update(
                x=st["x"], hessian=dict(H.state_dict(), kind="dense" if isinstance(H, DenseBFGS) else "lbfgs"),
                samples=[[x, g, J.to_dense()] for x, g, J, _ in st["samples"]],
                samples_maxlen=st["samples"].maxlen,
                certificate=_certificate_to_dict(st["certificate"]))
            for key in ("best_feasible", "most_feasible"):
                if st.get(key) is not None:
                    saved[key] = dict(st[key])
            if st.get("fit") is not None:
                saved["fit"] = dataclasses.asdict(st["fit"])
            if self._steering.warm is not None:
                saved["steering_warm"] = dataclasses.asdict(self._steering.warm)
        saved["generator"] = self._generator.get_state()
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])}
                  for g in self.param_groups]
        return {"state": saved, "param_groups": groups, "n": self._flat.n}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`. The parameters themselves are not part of it (restore them with the
        model's own ``load_state_dict``); the next ``step`` re-evaluates the saved point (one closure call)
        and continues exactly where the saved run was. A state_dict that does not match this optimizer
        raises ``ValueError`` and leaves the optimizer unchanged."""
        saved, groups = _check_state_dict(state_dict, self._flat.n, [len(g["params"]) for g in self.param_groups],
                                          self._memory)
        restored = {k: saved[k] for k in _SCALARS if k in saved}
        if "x" in saved:
            n = self._flat.n
            H = (DenseBFGS(n, _WORK, self._flat.device, self.defaults["damping"]) if self._memory is None
                 else LBFGS(n, _WORK, self._flat.device, self._memory, self.defaults["damping"]))
            H.load_state_dict(saved["hessian"])
            work = dict(dtype=_WORK, device=self._flat.device)
            restored.update(
                x=saved["x"].to(**work), hessian=H,
                samples=deque(((x.to(**work), g.to(**work), Jacobian.from_dense(J.to(self._flat.device)),
                                max_abs(x)) for x, g, J in saved["samples"]),
                              maxlen=saved["samples_maxlen"]),
                certificate=_certificate_from_dict(saved["certificate"]))
            for key in ("best_feasible", "most_feasible"):
                if key in saved:
                    restored[key] = dict(saved[key], x=saved[key]["x"].to(**work))
            if "fit" in saved:
                restored["fit"] = QPResult(**{k: v.to(self._flat.device) for k, v in saved["fit"].items()})
        warm = saved.get("steering_warm")
        self._steering.warm = None if warm is None else QPResult(**{k: v.to(self._flat.device) for k, v in warm.items()})
        self._generator.set_state(saved["generator"])
        for group, options in zip(self.param_groups, groups):
            group.update({k: v for k, v in options.items() if k != "params"})
        self.state.clear()
        self.state[self._flat.params[0]] = restored

    @property
    def certificate(self) -> Certificate:
        """The KKT certificate at the current iterate (status IN_PROGRESS before the first step)."""
        return self._state.get("certificate", Certificate(tol_opt=self._tol_opt, tol_ineq=self._tol_ineq,
                                                          tol_eq=self._tol_eq))

    @property
    def most_feasible(self) -> dict | None:
        """``{"x": flat tensor, "violation": float, "iteration": int}`` of the least violating iterate."""
        return self._state.get("most_feasible")

    # ------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, closure: Callable[[], Tensor], x: Tensor, previous: Jacobian | None = None) -> _Point:
        """f, ∇f and c at x (J when first needed; ``previous``: the Jacobian at a nearby point, whose unchanged rows
        it takes over)."""
        flat = self._flat
        xp = x.to(flat.dtype)
        flat.set(xp)
        x = self._evaluated = xp.to(_WORK)  # the point actually evaluated, after rounding to the parameters' dtype
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        st = self._state
        st["nfev"] = st.get("nfev", 0) + 1
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure returned a {type(loss).__name__}; it must return the loss tensor")
        if loss.numel() != 1:
            raise ValueError(f"the closure returned a loss of shape {tuple(loss.shape)}; expected a scalar")
        if all(p.grad is None for p in flat.params):
            raise ValueError("after the closure no parameter has a .grad: the closure must call loss.backward() "
                             "(and the loss must depend on the parameters)")
        values = evaluate(self._constraints, flat, check_dependence="x" not in st)
        loss = self._synchronize(values, loss.detach())
        self._check_replicas(flat)
        g = flat.grad().to(_WORK)
        return _Point(x=x, f=float(loss), g=g, c=values.c.to(_WORK), values=values, loss=loss, previous=previous)

    def _grad_phi(self, point: _Point, mu: float) -> Tensor:
        """∇φ(x; μ) = μ∇f + Jᵀw, with w the violation subgradient weights."""
        return point.jacobian().rmatmul(violation_weights(point.c, self._state["p"]), base=mu * point.g)

    def _slope(self, point: _Point, mu: float, d: Tensor, floor: Tensor | None = None) -> float:
        """∇φ(x; μ)ᵀd = μ ∇fᵀd + wᵀ(J d), without forming ∇φ (at large n every n-vector is a pass over memory); with a
        rounding ``floor`` δ, without the rows within δ of their bound (whose sign is rounding)."""
        w = violation_weights(point.c, self._state["p"])
        if floor is not None:
            w = torch.where(at_rounding(point.c, floor, self._state["p"]), 0.0, w)
        return float(mu * point.g.dot(d) + point.jacobian().bilinear(w, d))

    def _phi(self, point: _Point, mu: float) -> float:
        return mu * point.f + self._violation(point)

    def _violation(self, point: _Point) -> float:
        return float(violation(point.c, self._state["p"]))

    def _rounding(self, point: _Point) -> Tensor:
        """``δ_i = 10 eps τ_i`` with ``τ_i = ‖∇c_i‖₂ max(1, ‖x‖∞)``, the scale of the terms that make up c_i: below δ_i
        a value of c_i is rounding (eps of the parameters' dtype, in which the closure computes c)."""
        return 10 * self._flat.eps * max(1.0, point.x_inf) * point.jacobian().row_norms()

    # -------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One outer SQP iteration. Returns the loss at the (new) current point.

        After a terminal status the closure is still called once (frameworks such as Lightning require it)
        and nothing changes."""
        if closure is None:
            raise ValueError("ConstrainedSQP.step needs a closure that computes the loss and calls backward(): "
                             "it evaluates several points per step. fp16 AMP (torch.amp.GradScaler, Lightning's "
                             "precision='16-mixed') calls step() without a closure and is not supported: use "
                             "float32/float64 or bf16, or a first-order optimizer such as co.AugmentedLagrangian")
        st = self._state
        moved = "x" not in st or not self._flat.holds(st["x"])     # by the user: a restart there
        if not moved and st["certificate"].status.terminal:
            with torch.enable_grad():
                return closure()
        try:
            if moved:
                self._start(closure, self._flat.get().to(_WORK))
            else:
                if "point" not in st:      # resumed from a state_dict: rebuild f, ∇f, c at the saved point
                    st["point"] = self._evaluate(closure, st["x"])
                self._iterate(closure)
        finally:
            # whatever happened (a closure that raised included), parameters hold the last good point: written
            # back unless it is the point evaluated last (a start that failed leaves them at the user's values)
            if "x" in st and st["x"] is not self._evaluated:
                self._flat.set(st["x"].to(self._flat.dtype))
        return st["point"].loss if "point" in st else None

    def _start(self, closure: Callable[[], Tensor], x: Tensor) -> None:
        """(Re)start at x: evaluate, build H if needed, certify."""
        st = self._state
        point = self._evaluate(closure, x)
        if not point.finite:
            raise ValueError(f"the objective, its gradient or a constraint is not finite at the starting point "
                             f"(f={point.f}); start from a point where everything is finite")
        if not point.jacobian_finite:
            raise ValueError("a constraint gradient is not finite at the starting point")
        if "x" not in st:
            _warn_if_many_rows(point.values)
            st["mu"] = float(self.defaults["mu0"])
            st["iteration"] = 0
            n = self._flat.n
            st["hessian"] = (DenseBFGS(n, _WORK, x.device, self.defaults["damping"]) if self._memory is None
                             else LBFGS(n, _WORK, x.device, self._memory, self.defaults["damping"]))
            st["g_ref"] = point.g_inf
        st["p"] = point.values.p
        st["rescues"] = st["expansions"] = st["stalls"] = 0
        st["t0"] = 1.0
        st["samples"] = deque(maxlen=self._sample_count(point.c.numel()))
        self._accept_bookkeeping(point, Status.IN_PROGRESS)

    def _sample_count(self, m: int) -> int:
        n = self._flat.n
        return max(1, min(self._ngrad, _SAMPLE_BUDGET // ((m + 2) * n)))

    def _iterate(self, closure: Callable[[], Tensor]) -> None:
        st = self._state
        point, H, p = st["point"], st["hessian"], st["p"]
        mu_reductions = 0
        while True:
            direction = self._steering.direction(point.c, p, point.sandwich(H), st["mu"])
            if not direction.qp_ok and H.updates > 0:
                H.reset()
                continue
            mu = direction.mu
            d = direction.d if direction.qp_ok else -self._grad_phi(point, mu)
            g0 = self._slope(point, mu, d)
            phi0 = self._phi(point, mu)
            result = None
            if g0 < 0 and math.isfinite(g0):
                result = self._search(closure, point, d, mu, phi0, g0, st["t0"])
            if result is None or result.outcome is Outcome.FAILED:
                if H.updates > 0:
                    H.reset()
                    continue
                self._stalled(closure, point)
                return
            trial = result.trial
            infeasible_after = not self._feasible(trial.c)
            if result.outcome is Outcome.EXPANSION_LIMIT and infeasible_after and mu_reductions < 8:
                st["mu"] = 0.1 * mu       # φ may be unbounded below along d for this μ
                mu_reductions += 1
                continue
            st["mu"] = mu
            # curvature of the Lagrangian μf + yᵀc of the penalty QP (y: its duals), as in SQP
            y_dual = direction.y if direction.qp_ok else violation_weights(point.c, p)
            s, y = H.pair_rows()           # (computed where H keeps them: no copies of n-vectors)
            torch.sub(trial.x, point.x, out=s)
            trial.jacobian().rmatmul_change(point.jacobian(), y_dual, out=y, gradients=(mu, trial.g, point.g))
            H.defer(s, y, GradientChange(mu, point.g, point.jacobian(), trial.g, trial.jacobian(), y_dual))
            st["iteration"] += 1
            step, size = max_abs(s), max(1.0, point.x_inf)
            # evidence of unboundedness: φ still decreasing after every expansion, at feasible points,
            # with steps at least as long as x itself
            diverging = result.outcome is Outcome.EXPANSION_LIMIT and step >= size
            st["expansions"] = st["expansions"] + 1 if diverging else 0
            # after a search that never bracketed, the next one starts where it stopped, so that a
            # divergent run diverges geometrically (and is recognised) rather than linearly
            st["t0"] = result.t if result.outcome is Outcome.EXPANSION_LIMIT else 1.0
            tiny = step <= 10 * _EPS * size
            st["stalls"] = st["stalls"] + 1 if tiny else 0
            status = Status.IN_PROGRESS
            if st["expansions"] >= 3 and not infeasible_after:
                status = Status.UNBOUNDED
            elif st["stalls"] >= self.defaults["max_stall"]:
                status = self._stop_status(trial)
            self._accept_bookkeeping(trial, status)
            return

    def _search(self, closure, point: _Point, d: Tensor, mu: float, phi0: float, g0: float,
                t0: float) -> LineSearchResult:
        """Weak Wolfe search along d from t0 (tolerating the rounding of φ, see :func:`.steering.phi_noise`); when
        the full step (t0 = 1) fails sufficient decrease, first try it with second-order corrections (which remove
        the Maratos effect of curved constraints)."""
        c1 = self.defaults["c1"]
        floor = self._rounding(point)
        evaluate_at = self._trial_evaluator(closure, point, d, mu, floor)
        search = dict(c1=c1, c2=self.defaults["c2"], max_evaluations=self.defaults["max_ls_evals"],
                      noise=float(phi_noise(point.f, point.c, mu, floor, self._state["p"], self._flat.eps)),
                      resolution=lambda: float(step_resolution(point.x, d, self._flat.eps)))
        if t0 != 1.0:
            return weak_wolfe(evaluate_at, phi0, g0, t0=t0, **search)
        full = evaluate_at(1.0)
        linear = None
        if point.c.numel() and not full[0] <= phi0 + c1 * g0 and full[2].finite:
            linear = point.c + point.jacobian() @ d             # the QP's linear model of c at x + d
        # a correction brings c back to that model and leaves f nearly as it is: it can only help where the step
        # failed for its violation, μ f(x + d) + v(c + J d) <= target (not where f itself rose, at a kink of f)
        if linear is not None and mu * full[2].f + float(violation(linear, self._state["p"])) <= phi0 + c1 * g0:
            if full[0] <= phi0 + c1 * g0 + search["noise"]:
                full[2].jacobian()     # (its slope may be asked for after the corrections have moved the parameters)
            corrected = full[2]
            for k in range(_CORRECTIONS):
                previous = corrected
                corrected = self._second_order_correction(closure, point, linear, corrected)
                # a correction is there to lower the violation: one that does not has failed, whatever φ says
                # (φ may fall by a far larger step in f, where f is unbounded off the feasible set)
                if corrected is None or not self._violation(corrected) < self._violation(previous):
                    break
                if self._phi(corrected, mu) <= phi0 + c1 * g0:
                    if not corrected.jacobian_finite:      # J only where the point is accepted
                        break
                    return LineSearchResult(Outcome.DECREASE_ONLY, 1.0, corrected, k + 2)

        def evaluate(t: float):
            return full if t == 1.0 else evaluate_at(t)
        return weak_wolfe(evaluate, phi0, g0, **search)

    def _second_order_correction(self, closure, point: _Point, linear: Tensor, trial: _Point) -> _Point | None:
        """Evaluate x̃ + d_c, where x̃ is the trial point (x + d, or an earlier corrected point) and
        d_c = −J_aᵀ (J_a J_aᵀ)⁻¹ r is the least-norm step that brings the rows a the violation depends on
        (equalities, violated inequalities) back to the QP's linear model at x, ``linear`` = c + J d:
        r = c_a(x̃) − target, target = c + J d (equalities), max(c + J d, 0) (inequalities)."""
        p = self._state["p"]
        J = point.jacobian()
        target = torch.cat([linear[:p].clamp(min=0), linear[p:]])
        rows = torch.cat([trial.c[:p] > 0, torch.ones_like(trial.c[p:], dtype=torch.bool)])
        if not bool(rows.any()):
            return None
        r = (trial.c - target)[rows]
        gram = J.gram()[rows][:, rows]                      # J_a J_aᵀ
        gram = gram + 1e-12 * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=_WORK, device=r.device)
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            return None
        w = torch.zeros_like(trial.c)
        w[rows] = torch.cholesky_solve(r[:, None], L)[:, 0]
        corrected = self._evaluate(closure, trial.x - J.T @ w, previous=J)
        return corrected if corrected.finite else None

    def _trial_evaluator(self, closure, point: _Point, d: Tensor, mu: float, floor: Tensor):
        def evaluate_at(t: float):
            trial = self._evaluate(closure, torch.add(point.x, d, alpha=t), previous=point.jacobian())
            if not trial.finite:
                return math.inf, lambda within_noise=False: math.nan, trial

            def slope(within_noise: bool = False) -> float:
                if not trial.jacobian_finite:
                    return math.nan
                return self._slope(trial, mu, d, floor if within_noise else None)
            return self._phi(trial, mu), slope, trial
        return evaluate_at

    def _stalled(self, closure, point: _Point) -> None:
        """No decrease along any direction tried: perturb off a possible kink (at most ``_RESCUES`` times in a
        run, since torch's subgradient at a kink, e.g. 0 for |·| at 0, can fake a descent direction), else stop."""
        st = self._state
        if st["rescues"] < _RESCUES:
            st["rescues"] += 1
            radius = self._radius * max(1.0, point.x_inf)
            u = torch.randn(point.x.shape, generator=self._generator, dtype=_WORK).to(point.x.device)
            trial = self._evaluate(closure, point.x + radius * u / u.norm())
            if trial.finite and trial.jacobian_finite:
                st["hessian"].reset()
                st["iteration"] += 1
                self._accept_bookkeeping(trial, Status.IN_PROGRESS)
                return
        st["certificate"].status = self._stop_status(point)

    def _stop_status(self, point: _Point) -> Status:
        """Why a run that cannot progress stops: stalled (feasible or not) or locally infeasible."""
        if self._feasible(point.c):
            return Status.STALLED_FEASIBLE
        if stationarity.infeasibility(point.jacobian(), point.c, self._state["p"], self._tol_ineq,
                                      self._tol_eq) <= self._tol_opt:
            return Status.INFEASIBLE
        return Status.STALLED_INFEASIBLE

    # ------------------------------------------------------------------------- certificate, bookkeeping

    def _feasible(self, c: Tensor) -> bool:
        ineq, eq = linf_violation(c, self._state["p"])
        return ineq <= self._tol_ineq and eq <= self._tol_eq

    def _accept_bookkeeping(self, point: _Point, status: Status) -> None:
        st = self._state
        st["x"], st["point"] = point.x, point
        st["samples"].append((point.x, point.g, point.jacobian(), point.x_inf))
        if status is Status.IN_PROGRESS:
            point.sandwich(st["hessian"])      # the next direction's J H Jᵀ, in one pass with the certificate's J Jᵀ
        cert = self._certify(point)
        if status is Status.IN_PROGRESS and cert.kkt:
            status = Status.CONVERGED
        cert.status = status
        st["certificate"] = cert
        violation_inf = cert.violation
        if cert.feasible and (st.get("best_feasible") is None or point.f < st["best_feasible"]["f"]):
            st["best_feasible"] = {"x": point.x.clone(), "f": point.f, "iteration": cert.iteration}
        if st.get("most_feasible") is None or violation_inf < st["most_feasible"]["violation"]:
            st["most_feasible"] = {"x": point.x.clone(), "violation": violation_inf, "f": point.f,
                                   "iteration": cert.iteration}

    def _certify(self, point: _Point) -> Certificate:
        st = self._state
        p = st["p"]
        ineq, eq = linf_violation(point.c, p)
        g_scale = max(point.g_inf, st["g_ref"], torch.finfo(_WORK).tiny)
        meas = stationarity.measure(point.g[None], [point.jacobian()], point.c, p, g_scale, self._tol_ineq,
                                    st.get("fit"), Jg=point.known_Jg)
        st["fit"] = meas.qp
        samples = 1
        if not self._measure_ok(meas) and len(st["samples"]) > 1:
            radius = self._radius * max(1.0, point.x_inf)
            # |‖x_j‖∞ − ‖x‖∞| <= ‖x_j − x‖∞ rules most samples out without a pass over x_j
            near = [(g, Js) for x, g, Js, x_inf in st["samples"]
                    if x is point.x or (abs(x_inf - point.x_inf) <= radius and within(x, point.x, radius))]
            if len(near) > 1:
                # current point first, then the other nearby iterates
                grads = torch.stack([g for g, _ in near[::-1]])
                sampled = stationarity.measure(grads, [Js for _, Js in near[::-1]], point.c, p, g_scale,
                                               self._tol_ineq, max_size=_SAMPLE_QP_LIMIT)
                if sampled.solved and (sampled.stationarity < meas.stationarity or not meas.solved):
                    meas, samples = sampled, sampled.points
        lam = meas.multipliers
        return Certificate(
            stationarity=meas.stationarity if meas.solved else math.inf,
            complementarity=meas.complementarity if meas.solved else math.inf,
            ineq_violation=ineq, eq_violation=eq, objective=point.f, penalty=st["mu"],
            multipliers={name: lam[sl].to(self._flat.dtype) for name, sl in point.values.slices.items()},
            violations=violations_by_name(point.c, p, point.values.slices),
            iteration=st["iteration"], samples=samples, tol_opt=self._tol_opt, tol_ineq=self._tol_ineq,
            tol_eq=self._tol_eq)

    def _measure_ok(self, meas) -> bool:
        return meas.solved and meas.stationarity <= self._tol_opt and meas.complementarity <= self._tol_opt


def _all_finite(t: Tensor) -> bool:
    """Every entry is finite: a finite sum says so in one cheap reduction (a NaN or ±inf entry makes the sum
    NaN or ±inf); only when the sum is not finite (or overflows) are the entries checked."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _warn_if_many_rows(values: ConstraintValues) -> None:
    """Warn when m > ``_MANY_ROWS``, naming the largest constraints and what to do about them."""
    if values.m <= _MANY_ROWS:
        return
    bounds = {rows.start for rows, _, _ in values.bounds}
    largest = sorted(values.slices.items(), key=lambda item: item[1].start - item[1].stop)[:3]
    names = ", ".join(f"{name!r} ({rows.stop - rows.start} rows{', bounds' if rows.start in bounds else ''})"
                      for name, rows in largest)
    warnings.warn(
        f"ConstrainedSQP got {values.m} scalar constraint rows (more than {_MANY_ROWS}); largest: {names}. Every "
        f"iteration solves a dense {values.m}×{values.m} dual QP (O(m²) memory, O(m³) time) and uses the m×n "
        "Jacobian (O(m·n) memory; bounds of co.Box/co.NonNegative are never formed, but still enter the QP). "
        "Fold a large constraint tensor into one row with fold='l2' or fold='max' (co.ineq(fn, fold='l2')); for a "
        "box on a large parameter use co.ProjectedGradient or co.AugmentedLagrangian.", UserWarning,
        stacklevel=6)   # the caller of step(): through Optimizer's wrapper, no_grad, step and _start


def tolerances_and_steering(dtype: torch.dtype, options: dict) -> tuple[float, float, float, float, Steering]:
    """``tol_opt``, ``tol_ineq``, ``tol_eq`` (default ``max(1e-8, 100 eps)``), the sampling radius (default
    ``max(1e-8, 10 eps)``) and the :class:`Steering` of the options shared by ConstrainedSQP and BatchedSQP."""
    eps = torch.finfo(dtype).eps
    tol_opt, tol_ineq, tol_eq = (options[k] if options[k] is not None else max(1e-8, 100 * eps)
                                 for k in ("tol_opt", "tol_ineq", "tol_eq"))
    radius = options["sample_radius"] if options["sample_radius"] is not None else max(1e-8, 10 * eps)
    steering = Steering(options["c_v"], options["c_mu"], options["max_steering"], slack=0.1 * min(tol_ineq, tol_eq),
                        backend=options["qp_solver"])
    return tol_opt, tol_ineq, tol_eq, radius, steering


def check_options(*, mu0, memory, tol_opt, tol_ineq, tol_eq, c_v, c_mu, max_steering, c1, c2, max_ls_evals, max_stall,
                  ngrad, sample_radius, damping, qp_solver) -> None:
    """Validate the options that ConstrainedSQP and BatchedSQP share (ValueError naming the bad value)."""
    check_positive("mu0", mu0)
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 1):
        raise ValueError(f"memory must be None (automatic) or a positive int, got {memory!r}")
    for name, value in (("tol_opt", tol_opt), ("tol_ineq", tol_ineq), ("tol_eq", tol_eq)):
        if value is not None:
            check_positive(name, value)
    _check_open_interval("c_v", c_v, 0.0, 1.0)
    _check_open_interval("c_mu", c_mu, 0.0, 1.0)
    _check_open_interval("c1", c1, 0.0, 1.0)
    _check_open_interval("c2", c2, c1, 1.0)
    _check_open_interval("damping", damping, 0.0, 1.0)
    if sample_radius is not None:
        check_positive("sample_radius", sample_radius)
    for name, value in (("max_steering", max_steering), ("max_ls_evals", max_ls_evals),
                        ("max_stall", max_stall)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if ngrad is not None and (isinstance(ngrad, bool) or not isinstance(ngrad, int) or ngrad < 1):
        raise ValueError(f"ngrad must be None or a positive int, got {ngrad!r}")
    if qp_solver not in ("builtin", "qpth"):
        raise ValueError(f"qp_solver must be 'builtin' or 'qpth', got {qp_solver!r}")


def _check_open_interval(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{name} must lie in ({low}, {high}), got {value!r}")


_SCALARS = ("mu", "iteration", "g_ref", "rescues", "expansions", "stalls", "t0", "nfev", "p")
_CERTIFICATE_FLOATS = ("stationarity", "complementarity", "ineq_violation", "eq_violation", "objective", "penalty",
                       "tol_opt", "tol_ineq", "tol_eq")


def _certificate_to_dict(cert: Certificate) -> dict:
    out = {k: getattr(cert, k) for k in _CERTIFICATE_FLOATS}
    out.update(multipliers=dict(cert.multipliers), violations=dict(cert.violations), status=int(cert.status),
               iteration=cert.iteration, samples=cert.samples)
    return out


def _certificate_from_dict(d: dict) -> Certificate:
    return Certificate(**{k: d[k] for k in _CERTIFICATE_FLOATS}, multipliers=dict(d["multipliers"]),
                       violations=dict(d["violations"]), status=Status(d["status"]), iteration=d["iteration"],
                       samples=d["samples"])


def _check_state_dict(state_dict, n: int, group_sizes: list[int], memory: int | None) -> tuple[dict, list]:
    """Validate a ConstrainedSQP state_dict against this optimizer before anything is changed."""
    def bad(why: str):
        return ValueError(f"state_dict does not match this ConstrainedSQP: {why}")
    if not isinstance(state_dict, dict) or not {"state", "param_groups", "n"} <= set(state_dict):
        raise bad("expected a dict with keys 'state', 'param_groups' and 'n' (from ConstrainedSQP.state_dict())")
    saved, groups = state_dict["state"], state_dict["param_groups"]
    if state_dict["n"] != n:
        raise bad(f"it was saved for {state_dict['n']} variables, this optimizer has {n}")
    if not isinstance(groups, list) or [g.get("params") for g in groups] != group_sizes:
        raise bad(f"parameter groups of sizes {[g.get('params') for g in groups] if isinstance(groups, list) else groups}"
                  f", this optimizer has {group_sizes}")
    if not isinstance(saved, dict) or not isinstance(saved.get("generator"), Tensor):
        raise bad("the 'state' entry is not a ConstrainedSQP state")
    if "x" not in saved:
        return saved, groups
    required = set(_SCALARS) | {"x", "hessian", "samples", "samples_maxlen", "certificate"}
    if not required <= set(saved):
        raise bad(f"missing entries {sorted(required - set(saved))}")
    if not isinstance(saved["x"], Tensor) or saved["x"].shape != (n,) or not bool(torch.isfinite(saved["x"]).all()):
        raise bad("the saved point is not a finite vector of the right length")
    kind = "dense" if memory is None else "lbfgs"
    H = saved["hessian"]
    if not isinstance(H, dict) or H.get("kind") != kind:
        raise bad(f"the saved Hessian approximation is not the {kind} one this optimizer uses (memory={memory})")
    if kind == "dense" and (not isinstance(H.get("H"), Tensor) or H["H"].shape != (n, n)):
        raise bad("the saved dense BFGS matrix has the wrong shape")
    if kind == "lbfgs" and not _lbfgs_state_ok(H, n, memory):
        raise bad("the saved L-BFGS pairs have the wrong shape")
    for sample in saved["samples"]:
        if len(sample) != 3 or sample[0].shape != (n,) or sample[1].shape != (n,) or sample[2].shape[-1] != n:
            raise bad("a saved gradient sample has the wrong shape")
    return saved, groups


def _lbfgs_state_ok(H: dict, n: int, memory: int) -> bool:
    """The saved L-BFGS state has k <= memory pairs of length n, their slots (of memory + 1) and k × k ``SᵀY``,
    ``YᵀY``."""
    S, Y, slots = H.get("S", []), H.get("Y", []), H.get("slots")
    k = len(S)
    return (len(Y) == k <= memory and all(isinstance(v, Tensor) and v.shape == (n,) for v in S + Y)
            and isinstance(slots, Tensor) and slots.shape == (k,) and bool(((slots >= 0) & (slots <= memory)).all())
            and all(isinstance(H.get(key), Tensor) and H[key].shape == (k, k) for key in ("SY", "YY")))
