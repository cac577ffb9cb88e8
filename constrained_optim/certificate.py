"""What an optimizer can say about its current point: the KKT certificate and the termination status."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import Tensor


class Status(enum.IntEnum):
    """Why a run stopped (or that it has not).

    ``CONVERGED`` is the only status that claims an answer: stationarity, complementarity and
    feasibility all hold within their tolerances.
    """

    IN_PROGRESS = -1
    CONVERGED = 0
    MAX_ITER = 1
    STALLED_FEASIBLE = 2
    STALLED_INFEASIBLE = 3
    INFEASIBLE = 4
    UNBOUNDED = 5
    CALLBACK = 6
    TIME_LIMIT = 7

    @property
    def terminal(self) -> bool:
        """Statuses after which further steps cannot make progress."""
        return self not in (Status.IN_PROGRESS, Status.MAX_ITER, Status.CALLBACK, Status.TIME_LIMIT)


MESSAGES = {
    Status.IN_PROGRESS: "in progress: the KKT conditions do not hold yet",
    Status.CONVERGED: "converged: stationarity, complementarity and feasibility hold within tolerance",
    Status.MAX_ITER: "stopped: iteration limit reached before the KKT conditions held",
    Status.STALLED_FEASIBLE: ("stopped: no further progress at a feasible point that is not certified "
                              "stationary (limit of working precision, or a nonsmooth point)"),
    Status.STALLED_INFEASIBLE: "stopped: no further progress at an infeasible point",
    Status.INFEASIBLE: ("stopped: the problem looks locally infeasible (the constraint violation is "
                        "stationary here); opt.most_feasible holds the least violating iterate"),
    Status.UNBOUNDED: "stopped: the objective decreases without bound on the feasible set",
    Status.CALLBACK: "stopped by the user's callback",
    Status.TIME_LIMIT: "stopped: time limit reached",
}


@dataclass
class Certificate:
    """The KKT certificate of the current iterate.

    All measures are invariant to the penalty parameter, to the Hessian approximation and to a positive
    rescaling of the objective:

    * ``stationarity`` = ‖∇f + J_Iᵀλ_I + J_Eᵀλ_E‖∞ / s, with ``s = max(‖∇f(x)‖∞, ‖∇f(x₀)‖∞)`` and
      multipliers ``λ`` (λ_I >= 0) fitted to the gradients (sampled gradients for nonsmooth problems),
    * ``complementarity`` = max_i λ_i ‖∇c_i‖∞ κ_i / s over inequalities, where κ_i ∈ [0, 1) measures
      how clearly c_i is inactive (κ_i = σ_i / (σ_i + tol_ineq), σ_i = max(0, −c_i/min(1, ‖∇c_i‖₂) − tol_ineq):
      constraints whose value and first-order distance to their bound are within tol_ineq count as active),
    * ``ineq_violation`` = max_i max(c_I,i, 0) and ``eq_violation`` = max_j |c_E,j| (absolute);
      ``violations`` the same maximum per named constraint.
    """

    stationarity: float = float("inf")
    complementarity: float = float("inf")
    ineq_violation: float = float("inf")
    eq_violation: float = float("inf")
    objective: float = float("nan")
    penalty: float = 1.0
    multipliers: dict[str, Tensor] = field(default_factory=dict)
    violations: dict[str, float] = field(default_factory=dict)
    status: Status = Status.IN_PROGRESS
    iteration: int = 0
    samples: int = 1
    tol_opt: float = 0.0
    tol_ineq: float = 0.0
    tol_eq: float = 0.0

    @property
    def violation(self) -> float:
        """max(ineq_violation, eq_violation)."""
        return max(self.ineq_violation, self.eq_violation)

    @property
    def feasible(self) -> bool:
        return self.ineq_violation <= self.tol_ineq and self.eq_violation <= self.tol_eq

    @property
    def kkt(self) -> bool:
        """Whether every KKT measure is within its tolerance at the current point."""
        return (self.feasible and self.stationarity <= self.tol_opt
                and self.complementarity <= self.tol_opt)

    @property
    def converged(self) -> bool:
        return self.status == Status.CONVERGED

    @property
    def message(self) -> str:
        return MESSAGES[self.status]

    def __str__(self) -> str:
        sampled = f" ({self.samples} sampled gradients)" if self.samples > 1 else ""
        return (f"Certificate(status={self.status.name}, iteration={self.iteration}, f={self.objective:.10g}, "
                f"stationarity={self.stationarity:.3e}{sampled}, complementarity={self.complementarity:.3e}, "
                f"ineq_violation={self.ineq_violation:.3e}, eq_violation={self.eq_violation:.3e}, "
                f"penalty={self.penalty:.3e})\n  {self.message}")


def violations_by_name(c: Tensor, p: int, slices: dict[str, slice]) -> dict[str, float]:
    """Max violation of each named constraint: max(c, 0) for inequalities (rows < p), |c| for equalities."""
    v = c.clone()
    v[:p] = v[:p].clamp(min=0)
    v[p:] = v[p:].abs()
    return {name: float(v[sl].max()) if sl.stop > sl.start else 0.0 for name, sl in slices.items()}


class OptimizeResult(dict):
    """The outcome of :func:`~constrained_optim.minimize`; a dict with attribute access.

    Names follow ``scipy.optimize.OptimizeResult`` where they mean the same thing:

    * ``x``: list of the parameter tensors' values at the returned point (the parameters hold it too),
    * ``fun``, ``nit`` (iterations), ``nfev`` (closure calls), ``status`` (a :class:`Status`),
      ``message``, ``success`` (True only when the KKT certificate holds),
    * ``violation`` (max absolute violation), ``stationarity``, ``multipliers`` (name -> tensor),
    * ``certificate`` (the :class:`Certificate` of the returned point), ``returned``
      (``"last"`` or ``"best_feasible"``), ``history`` (one dict per iteration).
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __repr__(self) -> str:
        keys = ("status", "success", "message", "fun", "violation", "stationarity", "nit", "nfev", "returned")
        return "\n".join(f"{k:>12}: {self[k]!r}" for k in keys if k in self)
