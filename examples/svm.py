"""Soft-margin linear SVM, primal, solved as a smooth constrained problem by ``co.ConstrainedSQP``.

With data (xᵢ, yᵢ), yᵢ ∈ {−1, +1}, i = 1..N, features standardized, the primal is

    minimize   ½‖w‖² + C Σᵢ ξᵢ          over w ∈ Rᵈ, b ∈ R, ξ ∈ Rᴺ   (n = d + 1 + N variables)
    subject to ξᵢ ≥ 0,   yᵢ(wᵀxᵢ + b) ≥ 1 − ξᵢ                        (2N inequality rows)

a convex QP whose objective and constraints are smooth. Eliminating ξ gives the familiar unconstrained
form ½‖w‖² + C Σᵢ max(0, 1 − yᵢ(wᵀxᵢ + b)), whose hinge is nonsmooth: that is *not* what is solved
here (at the optimum ξᵢ equals the hinge, so the two values agree, and the script prints both).

Oracle: scikit-learn's ``SVC(kernel="linear", C=C, tol=1e-10)`` (libsvm), which solves the dual

    maximize   Σᵢ αᵢ − ½ ‖Σᵢ αᵢ yᵢ xᵢ‖²   subject to   0 ≤ αᵢ ≤ C,   Σᵢ αᵢ yᵢ = 0

by SMO, followed by a float64 polish of its answer. The alternatives are less accurate or solve another
problem: libsvm caches the kernel in float32 (``typedef float Qfloat``), so on its own its primal and
dual values differ by about 1e-7 relative whatever ``tol`` says (measured: 1.2e-7 quick, 2.3e-7 full);
``LinearSVC`` regularizes the intercept (liblinear's ``intercept_scaling``), a different problem; SciPy's
``trust-constr`` on the dual reaches about 7e-11 relative but takes 5–10 s. The polish takes libsvm's
partition of the samples (αᵢ = 0, 0 < αᵢ < C, αᵢ = C) and solves the optimality conditions of that
partition, a linear system, in float64 (``svc_oracle``); the result is kept only if it is certified
independently of libsvm: α is dual feasible and the primal value at (w, b), an upper bound on the
optimum, and the dual value at α, a lower bound, agree to 1e-12 relative (measured: 1e-15). f_opt is that
primal value; the decision values wᵀxᵢ + b of the SQP solution are compared with the oracle's too.

Data: the first N samples and d features of scikit-learn's breast-cancer set (quick: N = 60, d = 10;
full: N = 200, d = 20, so n = 221 variables and 400 constraint rows), C = 1.

    python examples/svm.py [--quick]

These problems are small: with other work on the machine, one thread (``OMP_NUM_THREADS=1``) can be
several times faster than torch's default of one per core.

Exits with status 1 if the certificate does not converge, the objective is not within 1e-6 (relative)
of the oracle's, or the decision values differ from the oracle's by more than 1e-6 (relative to their
scale).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import constrained_optim as co  # noqa: E402
from _common import Problem, parse, report  # noqa: E402

C = 1.0
DECISION_TOL = 1e-6


def load_data(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y): the first N samples and d features of breast cancer, standardized, y ∈ {−1, +1}, float64."""
    from sklearn.datasets import load_breast_cancer

    N, d = (60, 10) if quick else (200, 20)
    data = load_breast_cancer()
    X = torch.tensor(data.data[:N, :d], dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target[:N], dtype=torch.float64) * 2.0 - 1.0
    return X, y


class SoftMarginSVM(torch.nn.Module):
    """The primal variables: ``linear`` (w, b) and ``slack`` (ξ)."""

    def __init__(self, d: int, N: int):
        super().__init__()
        self.linear = torch.nn.Linear(d, 1, dtype=torch.float64)
        self.slack = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))
        self.reset()

    def reset(self) -> None:
        """The start w = 0, b = 0, ξ = 0: infeasible (every margin row is violated by 1)."""
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            self.slack.zero_()

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.linear(X).reshape(-1)


def svc_oracle(X: torch.Tensor, y: torch.Tensor) -> dict:
    """Solve the dual with libsvm, then polish its answer in float64; return w, b and both bounds.

    libsvm keeps the kernel matrix in float32, so its α is optimal only to about 1e-7 relative whatever
    ``tol`` says. Its answer does identify the partition of the samples: αᵢ = 0 (outside the margin),
    0 < αᵢ < C (on the margin: yᵢ(wᵀxᵢ + b) = 1) and αᵢ = C (inside or misclassified). For that partition
    the optimality conditions are the linear system (Q = diag(y) X Xᵀ diag(y), F the free, U the bound set)

        Q_FF α_F + y_F b = 1 − C Q_FU 1,     y_Fᵀ α_F = −C y_Uᵀ 1,

    solved here in float64 (least squares: α_F is not unique when |F| > d + 1, w and b are). The polished
    point is accepted only if 0 ≤ α ≤ C and its primal and dual values agree to 1e-12 relative.
    """
    from sklearn.svm import SVC

    svc = SVC(kernel="linear", C=C, tol=1e-10).fit(X.numpy(), y.numpy())
    alpha = torch.zeros(len(y), dtype=torch.float64)        # libsvm stores αᵢyᵢ of the support vectors only
    alpha[torch.as_tensor(svc.support_)] = torch.as_tensor(svc.dual_coef_[0], dtype=torch.float64).abs()
    raw = _bounds(alpha, float(svc.intercept_[0]), X, y)

    free = (alpha > 1e-6 * C) & (alpha < (1.0 - 1e-6) * C)
    upper = alpha >= (1.0 - 1e-6) * C
    Q = (y[:, None] * X) @ (y[:, None] * X).T
    yF = y[free]
    system = torch.cat([torch.cat([Q[free][:, free], yF[:, None]], 1),
                        torch.cat([yF, yF.new_zeros(1)])[None, :]])
    rhs = torch.cat([1.0 - C * Q[free][:, upper].sum(1), -C * y[upper].sum().reshape(1)])
    solution = torch.linalg.lstsq(system, rhs[:, None], driver="gelsd").solution[:, 0]
    polished_alpha = torch.where(upper, C, 0.0).to(torch.float64)
    polished_alpha[free] = solution[:-1]
    polished = _bounds(polished_alpha, float(solution[-1]), X, y)
    valid = (bool((polished_alpha >= -1e-12).all() and (polished_alpha <= C + 1e-12).all())
             and polished["primal"] - polished["dual"] <= 1e-12 * max(1.0, abs(polished["primal"])))
    return {"raw": raw, "polished": polished if valid else None, **(polished if valid else raw)}


def _bounds(alpha: torch.Tensor, b: float, X: torch.Tensor, y: torch.Tensor) -> dict:
    """w = Σ αᵢyᵢxᵢ, the primal value at (w, b) (an upper bound on the optimum) and the dual value at α
    (a lower bound, valid when 0 ≤ α ≤ C and Σ αᵢyᵢ = 0, up to the rounding of that sum)."""
    w = X.T @ (alpha * y)
    return {"w": w, "b": b, "primal": primal_value(w, b, X, y), "dual": float(alpha.sum() - 0.5 * w @ w),
            "balance": float((alpha * y).sum())}


def primal_value(w: torch.Tensor, b: float, X: torch.Tensor, y: torch.Tensor) -> float:
    """½‖w‖² + C Σ max(0, 1 − yᵢ(wᵀxᵢ + b)): the unconstrained (hinge) value of a classifier."""
    return float(0.5 * w @ w + C * (1.0 - y * (X @ w + b)).clamp(min=0).sum())


def build(quick: bool) -> Problem:
    """The primal SVM on breast cancer (quick: 60 × 10, n = 71; full: 200 × 20, n = 221), f_opt from SVC."""
    X, y = load_data(quick)
    N, d = X.shape
    model = SoftMarginSVM(d, N)

    def objective() -> torch.Tensor:
        return 0.5 * model.linear.weight.pow(2).sum() + C * model.slack.sum()

    constraints = [
        co.ineq(lambda: -model.slack, name="slack_nonnegative"),                    # ξᵢ ≥ 0
        co.ineq(lambda: 1.0 - model.slack - y * model(X), name="margin"),           # yᵢ(wᵀxᵢ + b) ≥ 1 − ξᵢ
    ]
    oracle = svc_oracle(X, y)
    source = ("scikit-learn SVC(kernel='linear', tol=1e-10), polished in float64" if oracle["polished"]
              else "scikit-learn SVC(kernel='linear', tol=1e-10), primal value")
    problem = Problem(name=f"svm_{N}x{d}", model=model, objective=objective, constraints=constraints,
                      f_opt=oracle["primal"], oracle=source,
                      reset=model.reset, options={"max_iter": 500})
    problem.data = (X, y)       # for main and the tests: the decision values are compared on X
    problem.svc = oracle
    return problem


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    problem = build(args.quick)
    X, y = problem.data
    model, svc = problem.model, problem.svc
    N, d = X.shape
    n = sum(p.numel() for p in model.parameters())
    print(f"== soft-margin SVM, breast cancer {N} samples x {d} features, C = {C}: "
          f"n = {n} variables, {2 * N} constraint rows ==")
    for label, bounds in (("SVC", svc["raw"]), ("SVC polished", svc["polished"])):
        if bounds is None:
            print(f"oracle {label}: rejected (α out of [0, C] or duality gap > 1e-12)")
        else:
            print(f"oracle {label}: primal {bounds['primal']:.14g}, dual {bounds['dual']:.14g}, "
                  f"duality gap {bounds['primal'] - bounds['dual']:.2e}, Σ αᵢyᵢ = {bounds['balance']:.1e}")

    problem.reset()
    start = time.perf_counter()
    result = co.minimize(problem.objective, model.parameters(), problem.constraints, **problem.options)
    elapsed = time.perf_counter() - start
    print(f"ConstrainedSQP: {result.nit} iterations, {result.nfev} evaluations, {elapsed:.2f} s")
    code = report(problem, result)

    with torch.no_grad():
        w, b = model.linear.weight.detach().reshape(-1), float(model.linear.bias)
        decision, decision_svc = model(X), X @ svc["w"] + svc["b"]
        scale = max(1.0, float(decision_svc.abs().max()))
        decision_error = float((decision - decision_svc).abs().max()) / scale
        hinge = primal_value(w, b, X, y)
        slack_error = float((model.slack - (1.0 - y * decision).clamp(min=0)).abs().max())
    print(f"hinge form at the SQP solution {hinge:.12g} (max |ξ − hinge| = {slack_error:.1e}); "
          f"{int((model.slack > 1e-6).sum())} margin violators, "
          f"{int((result.multipliers['margin'] > 1e-6).sum())} support vectors")
    print(f"decision values: max |f_sqp − f_svc| / max(1, max |f_svc|) = {decision_error:.2e} "
          f"(allowed {DECISION_TOL:g}); ‖w_sqp − w_svc‖ = {float((w - svc['w']).norm()):.2e}")
    if decision_error > DECISION_TOL:
        print("FAILED: the decision values differ from the oracle's")
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
