"""1-D total-variation denoising (a generalized LASSO), nonsmooth and as a smooth QP.

A piecewise-constant signal observed with Gaussian noise, y ∈ Rⁿ (quick n = 30, full n = 200), is denoised by

    minimize  ½‖x − y‖² + λ‖Dx‖₁   subject to   Σᵢ xᵢ = Σᵢ yᵢ                               (P)

with D ∈ R^{(n−1)×n} the first-difference matrix, (Dx)ᵢ = xᵢ₊₁ − xᵢ. The objective is strongly convex
and nonsmooth wherever two neighbours are equal, which is where the answer lives (it is piecewise
constant). The mean constraint makes it a constrained problem without changing the answer (below).

Oracle: the dual. Since λ‖z‖₁ = max_{‖u‖∞ ≤ λ} uᵀz, the unconstrained problem is

    min_x max_{‖u‖∞≤λ} ½‖x − y‖² + uᵀDx = max_{‖u‖∞≤λ} min_x ½‖x − y‖² + uᵀDx

(a convex-concave saddle with u in a compact set). The inner minimum is at x = y − Dᵀu, with value
uᵀDy − ½‖Dᵀu‖² = ½‖y‖² − ½‖y − Dᵀu‖². Hence

    f* = ½‖y‖² − min_{‖u‖∞ ≤ λ} ½‖y − Dᵀu‖²,        x* = y − Dᵀu*,

and the dual is a bounded least-squares problem, solved exactly (active set, ``method="bvls"``) by
``scipy.optimize.lsq_linear(Dᵀ, y, bounds=(−λ, λ))``. The mean constraint changes nothing: D𝟏 = 0, so
𝟏ᵀx* = 𝟏ᵀy − (D𝟏)ᵀu* = 𝟏ᵀy, i.e. the unconstrained minimizer is feasible for (P) and therefore optimal
for it. f_opt is the primal value at x*; the example prints its difference to the dual value (rounding).

Smooth reformulation (a QP): with Dx = p − q, p, q ≥ 0,

    minimize  ½‖x − y‖² + λ Σ(p + q)   subject to   Dx − p + q = 0,   Σx = Σy,   p ≥ 0,   q ≥ 0,

which has the same optimum (at a solution pᵢqᵢ = 0, so Σ(p + q) = ‖Dx‖₁). The SQP certifies it
(CONVERGED) in a few dozen iterations; on (P) it needs hundreds to thousands of iterations, because BFGS
crawls along the kinks, and its gradient-sampling certificate may or may not close: measured, the quick
instance ends CONVERGED after 474 iterations (gap 6e-15); the full one reaches a relative gap of 1e-6
after ~1000 iterations, 1e-10 after ~1900, and 5e-12 at its 2500-iteration budget (MAX_ITER; run on, it
stops STALLED_FEASIBLE after ~3700). So for (P) the certificate is not required, while the gap (<= 1e-8)
and feasibility are; the QP must be certified and within 1e-8.

    python examples/tv_denoising.py [--quick]
"""
from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Problem, parse, report, single_threaded  # noqa: E402

import constrained_optim as co  # noqa: E402

# (n, SQP iteration budget for (P)); the QP takes 21 (n = 30) and 24 (n = 200) iterations
SIZES = {True: (30, 1000), False: (200, 2500)}
LAM = 0.5
NOISE = 0.3


def signal(n: int, seed: int = 0) -> np.ndarray:
    """y: a piecewise-constant signal (about n/10 jumps, levels uniform in [−2, 2]) plus N(0, 0.3²) noise."""
    rng = np.random.default_rng(seed)
    jumps = np.sort(rng.choice(np.arange(1, n), max(3, n // 10), replace=False))
    levels = rng.uniform(-2.0, 2.0, jumps.size + 1)
    clean = np.repeat(levels, np.diff(np.r_[0, jumps, n]))
    return clean + NOISE * rng.standard_normal(n)


def difference_matrix(n: int) -> np.ndarray:
    """D ∈ R^{(n−1)×n}, (Dx)ᵢ = xᵢ₊₁ − xᵢ."""
    return np.diff(np.eye(n), axis=0)


def dual_oracle(y: np.ndarray, lam: float) -> tuple[float, float, np.ndarray]:
    """Solve min_{‖u‖∞≤λ} ½‖y − Dᵀu‖² by bounded least squares; returns (primal f(x*), dual value, x*)."""
    from scipy.optimize import lsq_linear
    d = difference_matrix(y.size)
    sol = lsq_linear(d.T, y, bounds=(-lam, lam), method="bvls", tol=1e-15)
    if sol.status < 1:
        raise RuntimeError(f"lsq_linear failed: {sol.message}")
    x_star = y - d.T @ sol.x
    primal = 0.5 * np.sum((x_star - y) ** 2) + lam * np.abs(d @ x_star).sum()
    dual = 0.5 * y @ y - 0.5 * np.sum((y - d.T @ sol.x) ** 2)
    return float(primal), float(dual), x_star


@functools.lru_cache(maxsize=None)
def oracle(quick: bool) -> tuple[float, float, np.ndarray]:
    """``dual_oracle`` on the instance of ``build(quick)`` (computed once)."""
    return dual_oracle(signal(SIZES[quick][0]), LAM)


class TVDenoising(torch.nn.Module):
    """(P): the signal x (started at y) and the data y."""

    def __init__(self, y: torch.Tensor, lam: float):
        super().__init__()
        self.register_buffer("y", y)
        self.lam = lam
        self.x = torch.nn.Parameter(torch.empty_like(y))
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.x.copy_(self.y)

    def objective(self) -> torch.Tensor:
        return 0.5 * (self.x - self.y).pow(2).sum() + self.lam * torch.diff(self.x).abs().sum()

    def mean_shift(self) -> torch.Tensor:
        return self.x.sum() - self.y.sum()


class TVDenoisingQP(torch.nn.Module):
    """The smooth reformulation: x (started at y) and p, q (started at the positive and negative parts
    of Dy, so that the start is feasible)."""

    def __init__(self, y: torch.Tensor, lam: float):
        super().__init__()
        self.register_buffer("y", y)
        self.lam = lam
        self.x = torch.nn.Parameter(torch.empty_like(y))
        self.p = torch.nn.Parameter(torch.empty(y.numel() - 1, dtype=y.dtype))
        self.q = torch.nn.Parameter(torch.empty(y.numel() - 1, dtype=y.dtype))
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.x.copy_(self.y)
            dy = torch.diff(self.y)
            self.p.copy_(dy.clamp(min=0))
            self.q.copy_((-dy).clamp(min=0))

    def objective(self) -> torch.Tensor:
        return 0.5 * (self.x - self.y).pow(2).sum() + self.lam * (self.p + self.q).sum()

    def split(self) -> torch.Tensor:
        return torch.diff(self.x) - self.p + self.q

    def mean_shift(self) -> torch.Tensor:
        return self.x.sum() - self.y.sum()


def build(quick: bool) -> Problem:
    """(P): min ½‖x − y‖² + λ‖Dx‖₁ s.t. Σx = Σy; f_opt from the bounded least-squares dual."""
    n, max_iter = SIZES[quick]
    model = TVDenoising(torch.tensor(signal(n)), LAM)
    f_opt, _, _ = oracle(quick)
    return Problem(
        name=f"tv_denoising_n{n}", model=model, objective=model.objective,
        constraints=[co.eq(model.mean_shift, name="mean")], f_opt=f_opt,
        oracle="dual by scipy lsq_linear/bvls", reset=model.reset, options={"max_iter": max_iter})


def build_qp(quick: bool) -> Problem:
    """The smooth reformulation (Dx = p − q, p, q ≥ 0) of the same instance; same f_opt."""
    n, _ = SIZES[quick]
    model = TVDenoisingQP(torch.tensor(signal(n)), LAM)
    f_opt, _, _ = oracle(quick)
    return Problem(
        name=f"tv_denoising_qp_n{n}", model=model, objective=model.objective,
        constraints=[co.eq(model.split, name="split"), co.eq(model.mean_shift, name="mean"),
                     co.NonNegative(model.p, name="p"), co.NonNegative(model.q, name="q")],
        f_opt=f_opt, oracle="dual by scipy lsq_linear/bvls", reset=model.reset, options={"max_iter": 200})


def solve(problem: Problem) -> tuple[co.OptimizeResult, float]:
    problem.reset()
    start = time.perf_counter()
    result = co.minimize(problem.objective, list(problem.model.parameters()), problem.constraints,
                         **problem.options)
    return result, time.perf_counter() - start


def describe(problem: Problem, result: co.OptimizeResult, seconds: float, x_star: np.ndarray) -> None:
    print(f"status {result.status.name}, {result.nit} iterations, {result.nfev} function evaluations, "
          f"{seconds:.2f} s")
    x = problem.model.x.detach().numpy()
    jumps = int((np.abs(np.diff(x_star)) > 1e-8).sum())
    print(f"max |x − x*| = {np.abs(x - x_star).max():.1e}; x* has {jumps} jumps in {x_star.size - 1} differences "
          f"(the other {x_star.size - 1 - jumps} sit on kinks of ‖Dx‖₁)")


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    return single_threaded(_run, args.quick)


def _run(quick: bool) -> int:
    primal, dual, x_star = oracle(quick)
    print(f"oracle: primal {primal:.12g}, dual {dual:.12g}, difference {primal - dual:.1e}")
    oracle_ok = abs(primal - dual) <= 1e-10 * max(1.0, abs(primal))

    problem = build(quick)
    print(f"\n== 1. {problem.name}: min ½‖x − y‖² + λ‖Dx‖₁ s.t. Σx = Σy (λ = {LAM}) ==")
    result, seconds = solve(problem)
    describe(problem, result, seconds, x_star)
    feasible = result.violation <= 1e-8
    print(f"certificate not required (nonsmooth: the SQP may stop STALLED_FEASIBLE at the optimum); "
          f"feasibility (|Σx − Σy| = {result.violation:.1e} <= 1e-8) and the objective gap are required")
    code = report(problem, result, rel_tol=1e-8, require_certificate=False)

    qp = build_qp(quick)
    print(f"\n== 2. {qp.name}: the same as a QP, Dx = p − q, p, q ≥ 0 (certificate required) ==")
    qp_result, qp_seconds = solve(qp)
    describe(qp, qp_result, qp_seconds, x_star)
    qp_code = report(qp, qp_result, rel_tol=1e-8)

    if not oracle_ok or not feasible:
        print("FAILED: " + ("the oracle's primal and dual values differ" if not oracle_ok else "(P) infeasible"))
        return 1
    return 1 if code or qp_code else 0


if __name__ == "__main__":
    sys.exit(main())
