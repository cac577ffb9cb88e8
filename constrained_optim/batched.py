"""BatchedSQP: B independent constrained problems solved together by BFGS-SQP with steering.

Problem b (b = 0, ..., B − 1) is

    minimize f_b(x_b)   subject to   c_I,b(x_b) <= 0,   c_E,b(x_b) = 0,

where x_b is slice [b] of every parameter (all parameters have leading dimension B), the closure returns
f = (f_0, ..., f_{B−1}) of shape (B,) and every constraint function returns a tensor of shape (B, ...)
whose slice [b] holds problem b's rows. One ``step(closure)`` is one iteration of ConstrainedSQP (sqp.py)
for every unfinished problem, each with its own penalty μ_b, inverse-Hessian approximation H_b, step t_b,
status and certificate:

    d_b, μ_b ← steered penalty-QP direction           (steering.py)   one box-QP batch per stage, all problems
    t_b      ← weak Wolfe search on φ_b = μ_b f_b + v_b (linesearch.py) one closure call per round, all problems;
               a full step that fails sufficient decrease is first retried with second-order corrections
    x_b      ← x_b + t_b d_b (or the corrected full step)
    H_b      ← damped BFGS update with s_b = x_b,new − x_b and the change of the gradient of the Lagrangian
               μ_b f_b + ŷ_bᵀc_b of the penalty QP                    (hessian.py)
    certificate_b                                     (stationarity.py) one multiplier-fit batch

Derivatives: the problems are independent, so ∂(Σ_b f_b)/∂x_b = ∇f_b — one backward pass of ``f.sum()``
gives every gradient — and m batched vector-Jacobian products give all B constraint Jacobians (B, m, n)
(constraints.py). A line-search round needs only ∇φ_b = μ_b ∇f_b + J_bᵀw_b, one backward pass of
Σ_b μ_b f_b + w_bᵀc_b; ∇f and J are computed once per step, at the accepted points (one more closure call).
The first evaluation checks the independence with one random weighted product.

Differences from ConstrainedSQP: a problem whose line search fails with a learned H_b resets it (or, when
φ_b looks unbounded below at an infeasible point, lowers μ_b) and tries again at the next step without
moving, where ConstrainedSQP retries within the same step (the same iterates, counted differently); the
random perturbation off a kink is seeded by the problem's own point, not by a generator shared by the
batch.
Internally every vector is float64, whatever the parameters' dtype; parameters keep their dtype and device.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import stationarity
from ._flat import BatchedFlatParams
from .certificate import Certificate, Status
from .constraints import Constraint, canonical, evaluate
from .hessian import BatchedDenseBFGS, BatchedLBFGS
from .jacobian import Jacobian
from .linesearch import BatchedLineSearchResult, BatchedOutcome, step_resolution, weak_wolfe_batched
from .qp import QPResult
from .sets import Set
from .sqp import (_AUTO_MEMORY, _CORRECTIONS, _DENSE_LIMIT, _RESCUES, _SAMPLE_QP_LIMIT, check_options,
                  tolerances_and_steering)
from .steering import BatchedDirection, at_rounding, phi_noise, violation, violation_weights

_WORK = torch.float64
_EPS = torch.finfo(_WORK).eps
_DENSE_ENTRIES = 2 ** 25     # memory=None: dense BFGS only while B·n² stays below this (256 MiB in float64)
_MU_CUTS = 8                 # μ ← μ/10 retries allowed while φ looks unbounded below at infeasible points
_IN_PROGRESS = int(Status.IN_PROGRESS)


class _Rows:
    """Row selection for dataclasses of tensors with one row per problem."""

    def rows(self, idx: Tensor):
        return type(self)(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def where(self, mask: Tensor, other):
        """Rows of self where ``mask``, of ``other`` elsewhere."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), a, b)
        return type(self)(*(pick(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)))

    def put(self, idx: Tensor, rows) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name)[idx] = getattr(rows, f.name)


@dataclass
class _Points(_Rows):
    """f, ∇f, c and J of B (or A) problems, one row each, in the working dtype."""

    x: Tensor       # (B, n)
    f: Tensor       # (B,)
    g: Tensor       # (B, n)
    c: Tensor       # (B, m)
    J: Tensor       # (B, m, n)
    loss: Tensor    # (B,) the closure's values, in the parameters' dtype

    @property
    def finite(self) -> Tensor:
        return (self.f.isfinite() & self.g.isfinite().all(-1) & self.c.isfinite().all(-1)
                & self.J.isfinite().flatten(1).all(-1))


@dataclass
class _Trial(_Rows):
    """A line-search trial: f, c and ∇φ(·; μ) of every problem (no Jacobian: ∇φ = μ∇f + Jᵀw is one
    backward pass)."""

    x: Tensor           # (B, n)
    f: Tensor           # (B,)
    c: Tensor           # (B, m)
    grad_phi: Tensor    # (B, n)

    @property
    def finite(self) -> Tensor:
        return self.f.isfinite() & self.c.isfinite().all(-1) & self.grad_phi.isfinite().all(-1)


def _take(res: QPResult, idx: Tensor) -> QPResult:
    return QPResult(*(getattr(res, f.name)[idx] for f in dataclasses.fields(res)))


def _put(res: QPResult, idx: Tensor, rows: QPResult) -> None:
    for f in dataclasses.fields(res):
        getattr(res, f.name)[idx] = getattr(rows, f.name)


def _linf(c: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Per row: (max_i max(c_I,i, 0), max_j |c_E,j|)."""
    zero = c.new_zeros(c.shape[:-1])
    ineq = c[..., :p].clamp(min=0).amax(-1) if p else zero
    eq = c[..., p:].abs().amax(-1) if c.shape[-1] > p else zero
    return ineq, eq


class BatchedSQP(torch.optim.Optimizer):
    r"""Solve B independent problems ``min f_b(x_b) s.t. c_I,b(x_b) <= 0, c_E,b(x_b) = 0`` together (see the module doc).

    Every parameter has leading dimension B and problem b owns slice ``[b]`` of each. The closure returns
    ``f`` of shape (B,) and must **not** call ``backward()``: the optimizer differentiates ``f.sum()`` itself
    (a closure that runs backward raises ``ValueError``). Each constraint function returns a tensor of shape
    (B, ...); its slice [b] holds problem b's rows (``fold`` folds them per problem). The rows and the
    objective of problem b must depend on x_b only (no batch norm in training mode, no sum over the batch).

    ``step(closure)`` performs one outer iteration for every unfinished problem and returns f (B,) at the
    current points. A problem whose status is final (:attr:`finished`) stops changing: its slice of the
    parameters stays exactly as it is, and it still rides along in the closure's evaluations. Writing new
    values into a problem's slice restarts that problem (as ConstrainedSQP does).

    All QPs of one stage of the steering rule, for all problems, go to the batched box-QP solver in one
    call; the line search evaluates all trial points in one closure call per round.

    Args:
        params: parameters (one dtype and device), each of shape (B, ...).
        constraints: :func:`~constrained_optim.ineq` / :func:`~constrained_optim.eq` constraints returning
            (B, ...) tensors (at least one). Sets (``co.Box``, ...) are not accepted: state them as constraints
            with the batch dimension first, e.g. ``co.ineq(lambda: torch.stack([-x, x - 1], -1))``.
        mu0, tol_opt, tol_ineq, tol_eq, c_v, c_mu, max_steering, c1, c2, max_ls_evals, max_stall, ngrad,
            sample_radius, damping, qp_solver: as in :class:`~constrained_optim.ConstrainedSQP`, per problem.
        seed: added to a hash of a problem's point to seed its rare random perturbation off a kink (0).
        memory: ``None`` (default): dense BFGS, one (n, n) matrix per problem, when n <= 4096 and
            B·n² <= 2²⁵, otherwise L-BFGS with 20 pairs; an int k > 0: L-BFGS with k pairs per problem.

    The gradient-sampling certificate keeps the last ``min(ngrad, 1000 // (1 + m))`` gradients and Jacobians of
    each problem (B·k·m·n numbers; ``ngrad=1`` turns it off) and fits the sampled multipliers problem by
    problem, only for problems whose iterates have nearly stopped moving without a certificate.

    Not in this version (ConstrainedSQP has them): ``add_param_group`` after construction, best/most feasible
    point bookkeeping, ``co.minimize`` support.
    """

    def __init__(self, params: Iterable[Tensor], constraints: Sequence[Constraint] | None = None, *,
                 mu0: float = 1.0, memory: int | None = None, tol_opt: float | None = None,
                 tol_ineq: float | None = None, tol_eq: float | None = None, c_v: float = 0.1,
                 c_mu: float = 0.9, max_steering: int = 10, c1: float = 1e-4, c2: float = 0.5,
                 max_ls_evals: int = 50, max_stall: int = 5, ngrad: int | None = None,
                 sample_radius: float | None = None, damping: float = 0.2, qp_solver: str = "builtin", seed: int = 0):
        defaults = dict(mu0=mu0, memory=memory, tol_opt=tol_opt, tol_ineq=tol_ineq, tol_eq=tol_eq, c_v=c_v,
                        c_mu=c_mu, max_steering=max_steering, c1=c1, c2=c2, max_ls_evals=max_ls_evals,
                        max_stall=max_stall, ngrad=ngrad, sample_radius=sample_radius, damping=damping,
                        qp_solver=qp_solver, seed=seed)
        check_options(**{k: v for k, v in defaults.items() if k != "seed"})
        super().__init__(params, defaults)
        self._flat = BatchedFlatParams([p for group in self.param_groups for p in group["params"]])
        sets = [type(c).__name__ for c in (constraints or []) if isinstance(c, Set)]
        if sets:
            raise TypeError(f"BatchedSQP does not take sets ({', '.join(sets)}): state them as constraints with the "
                            "batch dimension first, e.g. co.ineq(lambda: torch.stack([lower - x, x - upper], -1))")
        self._constraints = canonical(constraints)
        if not self._constraints:
            raise ValueError("BatchedSQP got no constraints: pass constraints=[co.ineq(fn), co.eq(fn), ...]")
        self._tol_opt, self._tol_ineq, self._tol_eq, self._radius, self._steering = tolerances_and_steering(
            self._flat.dtype, self.defaults)
        B, n = self._flat.batch, self._flat.n
        if memory is None and (n > _DENSE_LIMIT or B * n * n > _DENSE_ENTRIES):
            memory = _AUTO_MEMORY
        self._memory = memory
        self._ngrad = ngrad if ngrad is not None else min(100, 2 * n, n + 10)

    def add_param_group(self, param_group: dict) -> None:
        """Parameter groups are accepted at construction only (all form the batch); options are global."""
        if hasattr(self, "_flat"):
            raise ValueError("BatchedSQP cannot add parameters after construction: build a new optimizer")
        overrides = sorted(k for k in param_group if k != "params" and k in self.defaults
                           and param_group[k] != self.defaults[k])
        if overrides:
            raise ValueError(f"BatchedSQP options are global; a parameter group cannot override {overrides}")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------- state
    @property
    def _state(self) -> dict:
        return self.state[self._flat.params[0]]

    @property
    def nfev(self) -> int:
        """Closure calls so far (each evaluates all B problems)."""
        return self._state.get("nfev", 0)

    @property
    def status(self) -> list[Status]:
        """The status of every problem (IN_PROGRESS before the first step)."""
        st = self._state
        if "status" not in st:
            return [Status.IN_PROGRESS] * self._flat.batch
        return [Status(s) for s in st["status"].tolist()]

    @property
    def converged(self) -> Tensor:
        """(B,) bool: the KKT certificate of problem b holds (status CONVERGED)."""
        st = self._state
        if "status" not in st:
            return torch.zeros(self._flat.batch, dtype=torch.bool, device=self._flat.device)
        return st["status"] == int(Status.CONVERGED)

    @property
    def finished(self) -> Tensor:
        """(B,) bool: problem b has a final status and no longer changes."""
        st = self._state
        if "status" not in st:
            return torch.zeros(self._flat.batch, dtype=torch.bool, device=self._flat.device)
        return st["status"] != _IN_PROGRESS

    @property
    def iterations(self) -> Tensor:
        """(B,) int: accepted steps of each problem."""
        st = self._state
        if "iteration" not in st:
            return torch.zeros(self._flat.batch, dtype=torch.int64, device=self._flat.device)
        return st["iteration"].clone()

    @property
    def certificates(self) -> list[Certificate]:
        """The KKT certificate of every problem at its current point (one host transfer for all)."""
        st = self._state
        B = self._flat.batch
        tolerances = dict(tol_opt=self._tol_opt, tol_ineq=self._tol_ineq, tol_eq=self._tol_eq)
        if "x" not in st:
            return [Certificate(**tolerances) for _ in range(B)]
        cert, p = st["cert"], st["p"]
        lam = cert["multipliers"].to(self._flat.dtype)
        v = cert["c"].clone()
        v[:, :p] = v[:, :p].clamp(min=0)
        v[:, p:] = v[:, p:].abs()
        by_name = {name: (v[:, sl].amax(-1) if sl.stop > sl.start else v.new_zeros(B)).tolist()
                   for name, sl in st["slices"].items()}
        columns = {key: cert[key].tolist() for key in ("stationarity", "complementarity", "ineq_violation",
                                                       "eq_violation", "objective", "samples")}
        mu, iteration, status = st["mu"].tolist(), st["iteration"].tolist(), st["status"].tolist()
        return [Certificate(stationarity=columns["stationarity"][b], complementarity=columns["complementarity"][b],
                            ineq_violation=columns["ineq_violation"][b], eq_violation=columns["eq_violation"][b],
                            objective=columns["objective"][b], penalty=mu[b],
                            multipliers={name: lam[b, sl] for name, sl in st["slices"].items()},
                            violations={name: values[b] for name, values in by_name.items()},
                            status=Status(status[b]), iteration=iteration[b], samples=columns["samples"][b],
                            **tolerances)
                for b in range(B)]

    # ------------------------------------------------------------------------------------ evaluation
    def _forward(self, closure: Callable[[], Tensor], x: Tensor):
        """Write X (B, n) into the parameters and run the closure and the constraints (one closure call).
        Returns X as evaluated (rounded to the parameters' dtype), f and the constraint values with their graph."""
        flat = self._flat
        xp = x.to(flat.dtype)
        flat.set(xp)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        st = self._state
        st["nfev"] = st.get("nfev", 0) + 1
        self._check_loss(loss)
        with torch.enable_grad():
            values = evaluate(self._constraints, flat, check_dependence="x" not in st, batch=flat.batch)
        if "p" in st and (values.p, values.m) != (st["p"], st["m"]):
            raise ValueError(f"the constraints now have {values.m} rows per problem ({values.p} inequalities), but "
                             f"had {st['m']} ({st['p']}): the number of constraint rows must stay fixed")
        st["p"], st["m"], st["slices"] = values.p, values.m, values.slices
        return xp.to(_WORK), loss, values

    def _evaluate(self, closure: Callable[[], Tensor], x: Tensor) -> _Points:
        """f, ∇f, c, J of every problem at X (B, n): one closure call, one backward of f.sum() and one batched
        vector-Jacobian product for the constraints."""
        flat = self._flat
        first = "x" not in self._state
        x, loss, values = self._forward(closure, x)
        with torch.enable_grad():
            # retain: the constraints may share the loss's forward pass
            grads = torch.autograd.grad(loss.sum(), flat.params, retain_graph=True, allow_unused=True)
            g = flat.flatten(grads)
            J = values.jacobian()
            if first and flat.batch > 1:
                _check_independent(flat, loss, values, g, J)
        return _Points(x=x, f=loss.detach().to(_WORK), g=g.to(_WORK), c=values.c.to(_WORK), J=J.to(_WORK),
                       loss=loss.detach())

    def _evaluate_trial(self, closure: Callable[[], Tensor], x: Tensor, mu: Tensor) -> _Trial:
        """f, c and ∇φ_b = μ_b ∇f_b + J_bᵀ w_b (w_b: violation weights at the trial) of every problem at X (B, n):
        one closure call and one backward pass of Σ_b μ_b f_b + w_bᵀ c_b."""
        x, loss, values = self._forward(closure, x)
        c = values.c.to(_WORK)
        with torch.enable_grad():
            values.backward(violation_weights(c, values.p), (mu.to(loss.dtype) * loss).sum())
        grad_phi = self._flat.grad().to(_WORK)
        self.zero_grad(set_to_none=True)
        return _Trial(x=x, f=loss.detach().to(_WORK), c=c, grad_phi=grad_phi)

    def _check_loss(self, loss) -> None:
        flat, B = self._flat, self._flat.batch
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure returned a {type(loss).__name__}; it must return f, a tensor of shape ({B},)")
        if any(p.grad is not None for p in flat.params):
            raise ValueError("the closure called backward(); BatchedSQP differentiates f.sum() itself, so the closure "
                             f"must only compute and return f of shape ({B},)")
        if tuple(loss.shape) != (B,):
            raise ValueError(f"the closure returned f of shape {tuple(loss.shape)}; BatchedSQP needs one objective "
                             f"value per problem, shape ({B},)")
        if loss.dtype != flat.dtype or loss.device != flat.device:
            raise TypeError(f"the closure returned a {loss.dtype} tensor on {loss.device}, but the parameters are "
                            f"{flat.dtype} on {flat.device}; compute f in the parameters' dtype and device")
        if not loss.requires_grad:
            raise ValueError("the closure's f does not depend on the parameters; return f computed from them")

    def _grad_phi(self, P: _Points, mu: Tensor) -> Tensor:
        """∇φ_b(x; μ_b) = μ_b ∇f_b + J_bᵀ w_b, w_b the violation subgradient weights (rows of P)."""
        w = violation_weights(P.c, self._state["p"])
        return mu[:, None] * P.g + (P.J.mT @ w[:, :, None])[:, :, 0]

    def _phi(self, P: _Points | _Trial, mu: Tensor) -> Tensor:
        return mu * P.f + violation(P.c, self._state["p"])

    def _rounding(self, P: _Points) -> Tensor:
        """(A, m): ``δ_i = 10 eps ‖∇c_i‖₂ max(1, ‖x_b‖∞)``, below which a value of c_i is rounding (as in
        ConstrainedSQP: eps of the parameters' dtype)."""
        size = P.x.abs().amax(-1, keepdim=True).clamp(min=1.0) if P.x.shape[-1] else torch.ones_like(P.f)[:, None]
        return 10 * self._flat.eps * size * torch.linalg.vector_norm(P.J, dim=-1)

    def _feasible(self, c: Tensor) -> Tensor:
        ineq, eq = _linf(c, self._state["p"])
        return (ineq <= self._tol_ineq) & (eq <= self._tol_eq)

    # -------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One outer SQP iteration of every unfinished problem. Returns f (B,) at the (new) current points.

        When every problem is finished the closure is still called once and nothing changes."""
        if closure is None:
            raise ValueError("BatchedSQP.step needs a closure that returns f of shape (B,): it evaluates several "
                             "points per step")
        st = self._state
        x_now = self._flat.get().to(_WORK)
        try:
            if "x" not in st:
                self._start(closure, x_now, torch.ones(self._flat.batch, dtype=torch.bool, device=x_now.device))
                return st["point"].loss
            moved = (x_now != st["x"]).any(-1)
            if bool(moved.any()):
                self._start(closure, x_now, moved)
                return st["point"].loss
            active = (st["status"] == _IN_PROGRESS).nonzero().squeeze(-1)
            if active.numel() == 0:
                with torch.enable_grad():
                    return closure()
            if "point" not in st:      # resumed from a state_dict: rebuild f, ∇f, c, J at the saved points
                st["point"] = self._evaluate(closure, st["x"])
            self._iterate(closure, active)
        finally:
            # whatever happened (a closure that raised included), parameters hold the last good points
            self._flat.set(st.get("x", x_now).to(self._flat.dtype))
        return st["point"].loss

    def _start(self, closure: Callable[[], Tensor], x: Tensor, mask: Tensor) -> None:
        """(Re)start the problems in ``mask`` at their rows of x: evaluate, reset their counters, certify."""
        st = self._state
        point = self._evaluate(closure, x)
        bad = (mask & ~point.finite).nonzero().squeeze(-1)
        if bad.numel():
            raise ValueError(f"the objective, a constraint or a derivative is not finite at the starting point of "
                             f"problem(s) {bad[:10].tolist()}; start from points where everything is finite")
        if "x" not in st:
            self._allocate(point)
        idx = mask.nonzero().squeeze(-1)
        st["t0"][idx] = 1.0
        st["expansions"][idx] = st["stalls"][idx] = st["mu_cuts"][idx] = st["rescues"][idx] = 0
        if "samples" in st:
            st["samples"]["stamp"][idx] = -1
        st["x"], st["point"] = point.x, point
        self._accept(idx, torch.full_like(idx, _IN_PROGRESS))

    def _allocate(self, point: _Points) -> None:
        """Per-problem state, at the first evaluation (when m is known)."""
        st = self._state
        (B, n), m = point.x.shape, point.c.shape[-1]
        work = dict(dtype=_WORK, device=point.x.device)
        count = dict(dtype=torch.int64, device=point.x.device)
        damping = self.defaults["damping"]
        st["hessian"] = (BatchedDenseBFGS(B, n, _WORK, point.x.device, damping) if self._memory is None
                         else BatchedLBFGS(B, n, _WORK, point.x.device, self._memory, damping))
        st["mu"] = torch.full((B,), float(self.defaults["mu0"]), **work)
        st["g_ref"] = point.g.abs().amax(-1) if n else torch.zeros(B, **work)
        st["t0"] = torch.ones(B, **work)
        for key in ("iteration", "expansions", "stalls", "mu_cuts", "rescues"):
            st[key] = torch.zeros(B, **count)
        st["status"] = torch.full((B,), _IN_PROGRESS, **count)
        st["cert"] = {key: torch.full((B,), float("inf"), **work) for key in
                      ("stationarity", "complementarity", "ineq_violation", "eq_violation")}
        st["cert"].update(objective=torch.full((B,), float("nan"), **work), c=torch.zeros(B, m, **work),
                          multipliers=torch.zeros(B, m, **work), samples=torch.ones(B, **count))
        k = max(1, min(self._ngrad, _SAMPLE_QP_LIMIT // (1 + m)))
        if k > 1:
            st["samples"] = {"x": torch.zeros(B, k, n, **work), "g": torch.zeros(B, k, n, **work),
                             "J": torch.zeros(B, k, m, n, **work), "stamp": torch.full((B, k), -1, **count)}

    def _iterate(self, closure: Callable[[], Tensor], idx: Tensor) -> None:
        """One iteration of the problems ``idx`` (A of them); the others are evaluated where they are."""
        st = self._state
        p = st["p"]
        P = st["point"].rows(idx)
        direction = self._direction(P, idx, st["mu"][idx])
        mu = direction.mu
        gphi = self._grad_phi(P, mu)
        d = torch.where(direction.qp_ok[:, None], direction.d, -gphi)
        g0 = (gphi * d).sum(-1)
        result = self._search(closure, idx, P, d, mu, g0)
        outcome = result.outcome
        failed = outcome == BatchedOutcome.FAILED
        rescue = self._no_step(idx, P, failed, rescue=True)
        x = st["x"].clone()
        x[idx[rescue]] = self._perturb(P.x[rescue])
        ok, trial = torch.zeros_like(failed), result.trial
        if trial is not None:
            infeasible_after = ~self._feasible(trial.c)
            # φ may be unbounded below along d for this μ: retry next step with μ/10
            cut = ~failed & (outcome == BatchedOutcome.EXPANSION_LIMIT) & infeasible_after & \
                (st["mu_cuts"][idx] < _MU_CUTS)
            st["mu"][idx[cut]] = 0.1 * mu[cut]
            st["mu_cuts"][idx[cut]] += 1
            ok = ~failed & ~cut
            x[idx[ok]] = trial.x[ok]
        if not bool((ok | rescue).any()):
            return
        # the new points, with ∇f and J for the next QP and the certificate (one more closure call)
        new = self._evaluate(closure, x).rows(idx)
        unusable = (ok | rescue) & ~new.finite          # ∇φ was finite there, but not all of ∇f and J
        self._no_step(idx, P, unusable, rescue=False)
        rescued = (rescue & ~unusable).nonzero().squeeze(-1)
        if rescued.numel():
            self._restart_near(idx[rescued], new.rows(rescued))
        ok = (ok & ~unusable).nonzero().squeeze(-1)
        if ok.numel():
            # curvature of the Lagrangian μf + yᵀc of the penalty QP (y: its duals), as in SQP
            y_dual = torch.where(direction.qp_ok[:, None], direction.y, violation_weights(P.c, p))
            self._advance(idx[ok], P.rows(ok), new.rows(ok), mu[ok], y_dual[ok], outcome[ok], result.t[ok],
                          infeasible_after[ok])

    def _no_step(self, idx: Tensor, P: _Points, rows: Tensor, rescue: bool) -> Tensor:
        """The problems ``idx[rows]`` found no acceptable step: with a learned H they retry next step from
        H = I; with H = I, and ``rescue``, at most ``_RESCUES`` times per run they move to a random point
        nearby (torch's subgradient at a kink, 0 for |·| at 0, can fake a descent direction; rounding can make
        a descent direction look ascending); otherwise they stop (stalled or infeasible). Returns the rows to
        move at random."""
        st = self._state
        H = st["hessian"]
        retry = rows & (H.updates[idx] > 0)
        H.reset(idx[retry])
        stuck = rows & ~retry
        moved = stuck & (st["rescues"][idx] < _RESCUES) if rescue else torch.zeros_like(stuck)
        st["rescues"][idx[moved]] += 1
        stop = (stuck & ~moved).nonzero().squeeze(-1)
        if stop.numel():
            st["status"][idx[stop]] = self._stop_status(P.rows(stop))
        return moved

    def _perturb(self, x: Tensor) -> Tensor:
        """x + r u / ‖u‖ per row, r = sample_radius · max(1, ‖x‖∞), u standard normal from a generator seeded by
        ``seed`` and the row's own bits (so that a problem's path does not depend on the rest of the batch)."""
        if not x.shape[0]:
            return x
        radius = self._radius * x.abs().amax(-1).clamp(min=1.0)
        u = torch.stack([torch.randn(x.shape[-1], dtype=_WORK, generator=torch.Generator().manual_seed(
            self.defaults["seed"] + zlib.crc32(row.cpu().numpy().tobytes()))) for row in x]).to(x.device)
        return x + radius[:, None] * u / u.norm(dim=-1, keepdim=True)

    def _restart_near(self, idx: Tensor, new: _Points) -> None:
        """Accept the random points of the problems ``idx`` (H = I, as in ConstrainedSQP)."""
        st = self._state
        st["iteration"][idx] += 1
        st["x"][idx] = new.x
        st["point"].put(idx, new)
        self._accept(idx, torch.full_like(idx, _IN_PROGRESS))

    def _direction(self, P: _Points, idx: Tensor, mu: Tensor) -> BatchedDirection:
        """Steered directions of the problems ``idx``; where a QP fails with a learned H, H is reset and the QP
        solved again with H = I."""
        st = self._state
        H, p = st["hessian"], st["p"]
        warm = _take(st["steer_warm"], idx) if "steer_warm" in st else None
        direction = self._steering.batch_direction(P.g, P.c, P.J, p, lambda V: H.apply(V, idx), mu, warm)
        self._keep_warm("steer_warm", idx, direction.qp)
        redo = (~direction.qp_ok & (H.updates[idx] > 0)).nonzero().squeeze(-1)
        if redo.numel():
            H.reset(idx[redo])
            again = self._steering.batch_direction(P.g[redo], P.c[redo], P.J[redo], p,
                                                   lambda V: H.apply(V, idx[redo]), mu[redo])
            for name in ("d", "mu", "y", "qp_ok"):
                getattr(direction, name)[redo] = getattr(again, name)
            _put(st["steer_warm"], idx[redo], again.qp)
        return direction

    def _keep_warm(self, key: str, idx: Tensor, res: QPResult) -> None:
        """Store the rows ``idx`` of a QP batch as the next warm start of those problems."""
        st = self._state
        if key not in st:
            B = self._flat.batch
            st[key] = QPResult(*(t.new_zeros((B, *t.shape[1:])) for t in
                                 (getattr(res, f.name) for f in dataclasses.fields(res))))
        _put(st[key], idx, res)

    def _search(self, closure, idx: Tensor, P: _Points, d: Tensor, mu: Tensor, g0: Tensor) -> BatchedLineSearchResult:
        """Weak Wolfe searches of the problems ``idx`` along d from their t0 (those with g0 < 0); where the full
        step (t0 = 1) fails sufficient decrease, first try it with second-order corrections."""
        st = self._state
        c1, t0 = self.defaults["c1"], st["t0"][idx]
        searching = (g0 < 0) & g0.isfinite()
        phi0 = self._phi(P, mu)
        trial_at = self._trial_evaluator(closure, idx, P.x, mu)

        def evaluate_at(t: Tensor, active: Tensor):
            trial = trial_at(P.x + torch.where(active, t, 0.0)[:, None] * d)
            return self._phi(trial, mu), (trial.grad_phi * d).sum(-1), trial
        first = evaluate_at(t0, searching)
        bar = phi0 + c1 * g0
        correct = searching & (t0 == 1.0) & ~(first[0] <= bar) & first[2].finite
        corrected, done = None, torch.zeros_like(searching)
        if P.c.shape[-1] and bool(correct.any()):
            corrected, done = self._second_order_corrections(trial_at, P, d, mu, bar, first[2], correct)
        floor = self._rounding(P)
        Jd = (P.J @ d[:, :, None])[:, :, 0]

        def slope_within_noise(trial: _Trial, slope: Tensor) -> Tensor:
            # without the rows within δ of their bound (whose sign is rounding); J d at x for J d at the trial,
            # which the trial's single backward pass does not give (the rows are nearly active: the two agree
            # to the curvature of c times ‖t d‖)
            p = self._state["p"]
            return slope - torch.where(at_rounding(trial.c, floor, p), violation_weights(trial.c, p) * Jd, 0.0).sum(-1)
        result = weak_wolfe_batched(evaluate_at, phi0, g0, t0, searching & ~done, c1, self.defaults["c2"],
                                    self.defaults["max_ls_evals"], first=first, slope_within_noise=slope_within_noise,
                                    noise=phi_noise(P.f, P.c, mu, floor, self._state["p"], self._flat.eps),
                                    resolution=step_resolution(P.x, d, self._flat.eps))
        if corrected is not None:
            result.outcome = torch.where(done, int(BatchedOutcome.DECREASE_ONLY), result.outcome)
            result.t = torch.where(done, 1.0, result.t)
            result.trial = corrected if result.trial is None else corrected.where(done, result.trial)
        return result

    def _second_order_corrections(self, trial_at, P: _Points, d: Tensor, mu: Tensor, bar: Tensor, trial: _Trial,
                                  rows: Tensor) -> tuple[_Trial, Tensor]:
        """Up to ``_CORRECTIONS`` corrections of the full step of the problems ``rows``, as in ConstrainedSQP:
        x̃ ← x̃ + d_c with d_c = −J_aᵀ (J_a J_aᵀ)⁻¹ r, the least-norm step that brings the rows a the violation
        depends on (equalities, violated inequalities at x̃) back to the QP's linear model at x,
        r = c_a(x̃) − target, target = c + J d (equalities), max(c + J d, 0) (inequalities); J stays J(x).
        A problem accepts the first corrected point with φ ≤ ``bar``, and stops at a correction that does not lower
        the violation. Returns the corrected trials and which problems accepted one."""
        p = self._state["p"]
        linear = P.c + (P.J @ d[:, :, None])[:, :, 0]
        target = torch.cat([linear[:, :p].clamp(min=0), linear[:, p:]], dim=-1)
        accepted, running = torch.zeros_like(rows), rows.clone()
        out = trial
        for _ in range(_CORRECTIONS):
            idx = running.nonzero().squeeze(-1)       # (the others' corrections are not used: not computed)
            part, solvable = _least_norm_correction(P.J[idx], trial.c[idx], (trial.c - target)[idx], p)
            running[idx] = solvable
            if not bool(solvable.any()):
                break
            step = torch.zeros_like(P.x)
            step[idx] = part
            new = trial_at(torch.where(running[:, None], trial.x + step, P.x))
            running &= new.finite & (violation(new.c, p) < violation(trial.c, p))     # it must lower the violation
            passed = running & (self._phi(new, mu) <= bar)
            out, accepted = new.where(passed, out), accepted | passed
            running &= ~passed
            trial = new.where(running, trial)
        return out, accepted

    def _trial_evaluator(self, closure, idx: Tensor, x0: Tensor, mu: Tensor) -> Callable[[Tensor], _Trial]:
        """``trial_at(x)``: f, c, ∇φ of the problems ``idx`` at their rows x (A, n); the other problems are
        evaluated where they are, with μ = 0."""
        mu_all = torch.zeros_like(self._state["mu"])
        mu_all[idx] = mu

        def trial_at(x: Tensor) -> _Trial:
            x_all = self._state["x"].clone()
            x_all[idx] = x
            return self._evaluate_trial(closure, x_all, mu_all).rows(idx)
        return trial_at

    def _advance(self, idx: Tensor, P: _Points, trial: _Points, mu: Tensor, y_dual: Tensor, outcome: Tensor,
                 t: Tensor, infeasible_after: Tensor) -> None:
        """Accept the trial points of the problems ``idx``: H (fed the change of the gradient of μf + y_dualᵀc),
        counters, statuses, certificates."""
        st = self._state
        st["mu"][idx] = mu
        st["mu_cuts"][idx] = 0
        change = mu[:, None] * (trial.g - P.g) + ((trial.J - P.J).mT @ y_dual[:, :, None])[:, :, 0]
        st["hessian"].update(trial.x - P.x, change, idx)
        st["iteration"][idx] += 1
        step = (trial.x - P.x).abs().amax(-1)
        size = P.x.abs().amax(-1).clamp(min=1.0)
        expanded = outcome == BatchedOutcome.EXPANSION_LIMIT
        # evidence of unboundedness: φ still decreasing after every expansion, with steps as long as x itself
        st["expansions"][idx] = torch.where(expanded & (step >= size), st["expansions"][idx] + 1, 0)
        # after a search that never bracketed, the next starts where it stopped (geometric divergence)
        st["t0"][idx] = torch.where(expanded, t, 1.0)
        st["stalls"][idx] = torch.where(step <= 10 * _EPS * size, st["stalls"][idx] + 1, 0)
        status = torch.full_like(idx, _IN_PROGRESS)
        status = torch.where((st["expansions"][idx] >= 3) & ~infeasible_after, int(Status.UNBOUNDED), status)
        stalled = (status == _IN_PROGRESS) & (st["stalls"][idx] >= self.defaults["max_stall"])
        if bool(stalled.any()):
            rows = stalled.nonzero().squeeze(-1)
            status[rows] = self._stop_status(trial.rows(rows))
        st["x"][idx] = trial.x
        st["point"].put(idx, trial)
        self._accept(idx, status)

    def _stop_status(self, P: _Points) -> Tensor:
        """Why problems that cannot progress stop: stalled (feasible or not) or locally infeasible."""
        p = self._state["p"]
        infeasible = stationarity.infeasibility_batched(P.J, P.c, p, self._tol_ineq, self._tol_eq) <= self._tol_opt
        return torch.where(self._feasible(P.c), int(Status.STALLED_FEASIBLE),
                           torch.where(infeasible, int(Status.INFEASIBLE), int(Status.STALLED_INFEASIBLE)))

    # ------------------------------------------------------------------------- certificate, bookkeeping
    def _accept(self, idx: Tensor, status: Tensor) -> None:
        """Record the current points of the problems ``idx`` (gradient samples) and certify them; a problem
        still IN_PROGRESS whose KKT conditions hold becomes CONVERGED."""
        st = self._state
        P = st["point"].rows(idx)
        if "samples" in st:
            self._record_sample(idx, P)
        kkt = self._certify(idx, P)
        st["status"][idx] = torch.where((status == _IN_PROGRESS) & kkt, int(Status.CONVERGED), status)

    def _record_sample(self, idx: Tensor, P: _Points) -> None:
        """Overwrite each problem's oldest (or empty) sample slot with its current point."""
        samples = self._state["samples"]
        slot = samples["stamp"][idx].argmin(-1)
        for key, value in (("x", P.x), ("g", P.g), ("J", P.J)):
            samples[key][idx, slot] = value
        samples["stamp"][idx, slot] = self._state["iteration"][idx]

    def _certify(self, idx: Tensor, P: _Points) -> Tensor:
        """Measure the KKT certificate of the problems ``idx`` at P (see stationarity.py); returns whether it holds."""
        st = self._state
        p, cert = st["p"], st["cert"]
        ineq, eq = _linf(P.c, p)
        g_scale = torch.maximum(P.g.abs().amax(-1) if P.g.shape[-1] else torch.zeros_like(P.f), st["g_ref"][idx])
        g_scale = g_scale.clamp(min=torch.finfo(_WORK).tiny)
        warm = _take(st["fit_warm"], idx) if "fit_warm" in st else None
        meas = stationarity.measure_batched(P.g, P.J, P.c, p, g_scale, self._tol_ineq, warm)
        self._keep_warm("fit_warm", idx, meas.qp)
        inf = torch.full_like(meas.stationarity, float("inf"))
        stat = torch.where(meas.solved, meas.stationarity, inf)
        comp = torch.where(meas.solved, meas.complementarity, inf)
        lam, samples = meas.multipliers, torch.ones_like(idx)
        if "samples" in st:
            unsure = ~((stat <= self._tol_opt) & (comp <= self._tol_opt))
            self._sampled_certificates(idx, P, g_scale, unsure, stat, comp, lam, samples)
        for key, value in (("stationarity", stat), ("complementarity", comp), ("ineq_violation", ineq),
                           ("eq_violation", eq), ("objective", P.f), ("c", P.c), ("multipliers", lam),
                           ("samples", samples)):
            cert[key][idx] = value
        return (ineq <= self._tol_ineq) & (eq <= self._tol_eq) & (stat <= self._tol_opt) & (comp <= self._tol_opt)

    def _sampled_certificates(self, idx, P: _Points, g_scale, unsure, stat, comp, lam, samples) -> None:
        """Gradient sampling (nonsmooth problems) for the uncertified problems with more than one recorded
        iterate within ``sample_radius · max(1, ‖x‖∞)``: fit multipliers to those gradients (stationarity.py),
        problem by problem, and keep the sampled measure where it is smaller. Updates the rows in place."""
        st = self._state
        S = st["samples"]
        radius = self._radius * P.x.abs().amax(-1).clamp(min=1.0)
        near = (S["stamp"][idx] >= 0) & ((S["x"][idx] - P.x[:, None]).abs().amax(-1) <= radius[:, None])
        candidates = (unsure & (near.sum(-1) > 1)).nonzero().squeeze(-1)
        for a in candidates.tolist():
            b = int(idx[a])
            order = torch.where(near[a], S["stamp"][b], -1).argsort(descending=True)[: int(near[a].sum())]
            jacobians = [Jacobian.from_dense(J) for J in S["J"][b, order]]
            sampled = stationarity.measure(S["g"][b, order], jacobians, P.c[a], st["p"], float(g_scale[a]),
                                           self._tol_ineq)
            if sampled.solved and sampled.stationarity < float(stat[a]):
                stat[a], comp[a], lam[a], samples[a] = (sampled.stationarity, sampled.complementarity,
                                                        sampled.multipliers, sampled.points)

    # ------------------------------------------------------------------------------ checkpoint/resume
    def state_dict(self) -> dict:
        """Everything a resumed run needs to repeat the uninterrupted one exactly: the iterates, μ, the
        BFGS/L-BFGS memories, the gradient samples, counters, statuses, certificates and QP warm starts, as
        plain tensors and Python values (loads with ``torch.load(weights_only=True)``)."""
        st = self._state
        saved = {"nfev": st.get("nfev", 0)}
        if "x" in st:
            saved.update({key: st[key].clone() for key in _TENSORS})
            H = st["hessian"]
            saved["hessian"] = dict(H.state_dict(), kind="dense" if isinstance(H, BatchedDenseBFGS) else "lbfgs")
            saved["cert"] = {key: value.clone() for key, value in st["cert"].items()}
            saved.update(p=st["p"], m=st["m"], slices={name: [sl.start, sl.stop] for name, sl in st["slices"].items()})
            if "samples" in st:
                saved["samples"] = {key: value.clone() for key, value in st["samples"].items()}
            for key in ("steer_warm", "fit_warm"):
                if key in st:
                    saved[key] = dataclasses.asdict(st[key])
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])}
                  for g in self.param_groups]
        return {"state": saved, "param_groups": groups, "shape": [self._flat.batch, self._flat.n]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`. The parameters are not part of it (restore them with the model's own
        ``load_state_dict``); the next ``step`` re-evaluates the saved points (one closure call) and continues
        exactly where the saved run was. A state_dict that does not match raises ``ValueError`` and leaves the
        optimizer unchanged."""
        saved = self._check_state_dict(state_dict)
        device = self._flat.device
        restored = {"nfev": saved["nfev"]}
        if "x" in saved:
            restored.update({key: saved[key].to(device).clone() for key in _TENSORS})
            B, n = self._flat.batch, self._flat.n
            damping = self.defaults["damping"]
            H = (BatchedDenseBFGS(B, n, _WORK, device, damping) if self._memory is None
                 else BatchedLBFGS(B, n, _WORK, device, self._memory, damping))
            H.load_state_dict(saved["hessian"])
            restored.update(hessian=H, p=saved["p"], m=saved["m"],
                            slices={name: slice(*bounds) for name, bounds in saved["slices"].items()},
                            cert={key: value.to(device).clone() for key, value in saved["cert"].items()})
            if "samples" in saved:
                restored["samples"] = {key: value.to(device).clone() for key, value in saved["samples"].items()}
            for key in ("steer_warm", "fit_warm"):
                if key in saved:
                    restored[key] = QPResult(**{k: v.to(device).clone() for k, v in saved[key].items()})
        self.state.clear()
        self.state[self._flat.params[0]] = restored

    def _check_state_dict(self, state_dict) -> dict:
        def bad(why: str):
            return ValueError(f"state_dict does not match this BatchedSQP: {why}")
        if not isinstance(state_dict, dict) or not {"state", "param_groups", "shape"} <= set(state_dict):
            raise bad("expected a dict with keys 'state', 'param_groups' and 'shape' (from BatchedSQP.state_dict())")
        B, n = self._flat.batch, self._flat.n
        if list(state_dict["shape"]) != [B, n]:
            raise bad(f"it was saved for {state_dict['shape'][0]} problems of {state_dict['shape'][1]} variables, "
                      f"this optimizer has {B} of {n}")
        saved = state_dict["state"]
        if not isinstance(saved, dict) or "nfev" not in saved:
            raise bad("the 'state' entry is not a BatchedSQP state")
        if "x" not in saved:
            return saved
        required = set(_TENSORS) | {"hessian", "cert", "p", "m", "slices"}
        if not required <= set(saved):
            raise bad(f"missing entries {sorted(required - set(saved))}")
        for key in _TENSORS:
            if not isinstance(saved[key], Tensor) or saved[key].shape[:1] != (B,):
                raise bad(f"entry {key!r} is not a tensor with one row per problem")
        if saved["x"].shape != (B, n) or not bool(saved["x"].isfinite().all()):
            raise bad("the saved points are not finite (B, n) rows")
        kind = "dense" if self._memory is None else "lbfgs"
        if saved["hessian"].get("kind") != kind:
            raise bad(f"the saved Hessian approximation is not the {kind} one this optimizer uses (memory={self._memory})")
        return saved


_TENSORS = ("x", "mu", "g_ref", "t0", "iteration", "expansions", "stalls", "mu_cuts", "rescues", "status")


def _least_norm_correction(J: Tensor, c: Tensor, r: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Per problem: d_c = −J_aᵀ (J_a J_aᵀ + δI)⁻¹ r_a over the rows a = equalities and inequalities with c > 0
    (δ = 1e-12 × the mean diagonal of J_a J_aᵀ, as in ConstrainedSQP), and whether it exists (some row a and a
    successful Cholesky factorization). The other rows get an identity block, so one batched factorization
    serves all problems."""
    active = torch.cat([c[:, :p] > 0, torch.ones_like(c[:, p:], dtype=torch.bool)], dim=-1)
    Ja = J * active[:, :, None]
    gram = Ja @ Ja.mT
    count = active.sum(-1)
    shift = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / count.clamp(min=1)
    gram = gram + torch.diag_embed(torch.where(active, shift[:, None], torch.ones_like(c)))
    L, info = torch.linalg.cholesky_ex(gram)
    solvable = (info == 0) & (count > 0)
    L = torch.where(solvable[:, None, None], L, torch.eye(c.shape[-1], dtype=c.dtype, device=c.device))
    z = torch.cholesky_solve((r * active)[:, :, None], L)
    return torch.where(solvable[:, None], -(Ja.mT @ z)[:, :, 0], 0.0), solvable


def _check_independent(flat: BatchedFlatParams, loss: Tensor, values, g: Tensor, J: Tensor) -> None:
    """Check, with one random weighted backward pass, that f_b and the rows c_b depend on x_b only: then
    ∂(Σ_b w_b f_b + Σ_b W_bᵀ c_b)/∂x_b = w_b ∇f_b + J_bᵀ W_b, which fails for generic weights otherwise
    (batch norm in training mode, a mean over the batch, ...)."""
    B, m = values.c.shape
    generator = torch.Generator().manual_seed(0)
    w = (1 + torch.rand(B, 1 + m, generator=generator, dtype=_WORK)).to(device=loss.device)
    grads = torch.autograd.grad((w[:, 0].to(loss.dtype) * loss).sum(), flat.params, retain_graph=True,
                                allow_unused=True)
    got = flat.flatten(grads).to(_WORK) + values.vjp(w[:, 1:]).to(_WORK)
    expected = w[:, :1] * g.to(_WORK) + (J.to(_WORK).mT @ w[:, 1:, None])[:, :, 0]
    scale = (w[:, :1] * g.to(_WORK).abs() + (J.to(_WORK).abs().mT @ w[:, 1:, None])[:, :, 0]).amax()
    tol = torch.finfo(flat.dtype).eps ** 0.5 * (1 + scale)
    if not bool(((got - expected).abs() <= tol).all()):
        raise ValueError("problem b's objective or constraint rows depend on other problems' parameters (the "
                         "derivative of a weighted sum over the batch does not separate by problem); BatchedSQP "
                         "needs independent problems: no batch statistics or sums over the batch dimension")
