"""Trace optimization on the Stiefel manifold: the dominant k-dimensional invariant subspace of A.

With A ∈ Rⁿˣⁿ symmetric,

    minimize   −tr(VᵀAV)   over V ∈ Rⁿˣᵏ   subject to   VᵀV = I_k     (k(k+1)/2 equality rows)

The feasible set is nonconvex, but the minimum is known (Ky Fan's maximum principle):

    f* = −(λ₁ + … + λ_k),   λ₁ ≥ … ≥ λₙ the eigenvalues of A,

attained by any orthonormal basis of the top-k eigenvectors, and (when λ_k > λ_{k+1}) every local
minimizer is global, so both local solvers below should reach it. f* comes from ``torch.linalg.eigvalsh``,
which is independent of both solvers compared here:

- ``co.ConstrainedSQP`` with ``co.Stiefel(V)`` in its constraint list, i.e. the equalities
  triu(VᵀV − I) = 0 (the upper triangle, diagonal included, so that no row is repeated);
- ``co.ProjectedGradient`` on the set ``co.Stiefel(V)`` with ``step="spg"``: spectral projected
  gradient, the projection being the polar factor of V (``co.minimize(method="pgd")``).

Both start from the same random orthonormal V (A and V from a fixed seed; quick: n = 8, k = 2; full:
n = 50, k = 5), and at the end the column space of V is compared with the top-k eigenvectors (the
largest principal angle).

    python examples/orthogonality.py [--quick]

These problems are small: with other work on the machine, one thread (``OMP_NUM_THREADS=1``) can be
several times faster than torch's default of one per core.

Exits with status 1 if either certificate does not converge or an objective is not within 1e-6
(relative) of f*.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import constrained_optim as co  # noqa: E402
from _common import Problem, parse, report  # noqa: E402


class Frame(torch.nn.Module):
    """The variable V ∈ Rⁿˣᵏ, started at a fixed orthonormal V₀."""

    def __init__(self, V0: torch.Tensor):
        super().__init__()
        self.register_buffer("V0", V0.clone())
        self.V = torch.nn.Parameter(V0.clone())

    def reset(self) -> None:
        with torch.no_grad():
            self.V.copy_(self.V0)


def make_instance(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (B + Bᵀ)/2 with B standard normal (float64), and V₀ = Q of the QR of a standard normal n × k."""
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=generator, dtype=torch.float64)
    V0, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return 0.5 * (B + B.T), V0


def build(quick: bool) -> Problem:
    """min −tr(VᵀAV) s.t. VᵀV = I (quick: n = 8, k = 2; full: n = 50, k = 5), f_opt from eigvalsh."""
    n, k = (8, 2) if quick else (50, 5)
    A, V0 = make_instance(n, k)
    model = Frame(V0)

    def objective() -> torch.Tensor:
        return -torch.trace(model.V.T @ A @ model.V)

    f_opt = -float(torch.linalg.eigvalsh(A)[-k:].sum())
    problem = Problem(name=f"stiefel_trace_{n}x{k}", model=model, objective=objective,
                      constraints=[co.Stiefel(model.V, name="orthonormal")], f_opt=f_opt,
                      oracle="−(sum of the top-k eigenvalues), torch.linalg.eigvalsh", reset=model.reset,
                      options={"max_iter": 1000})
    problem.A = A
    return problem


def largest_principal_angle(V: torch.Tensor, A: torch.Tensor) -> float:
    """The largest principal angle (radians) between span(V) and the top-k eigenvectors of A."""
    k = V.shape[1]
    U = torch.linalg.eigh(A).eigenvectors[:, -k:]
    Qv, _ = torch.linalg.qr(V)
    cosines = torch.linalg.svdvals(U.T @ Qv).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


def solve(problem: Problem, method: str) -> tuple[co.OptimizeResult, float]:
    problem.reset()
    start = time.perf_counter()
    result = co.minimize(problem.objective, problem.model.parameters(), problem.constraints, method=method,
                         **problem.options)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    problem = build(args.quick)
    V, A = problem.model.V, problem.A
    n, k = V.shape
    print(f"== min −tr(VᵀAV) s.t. VᵀV = I, n = {n}, k = {k}: {n * k} variables, "
          f"{k * (k + 1) // 2} equality rows ==")
    code = 0
    for label, method in (("ConstrainedSQP, co.Stiefel as equality constraints", "sqp"),
                          ("ProjectedGradient (spg), projection onto co.Stiefel", "pgd")):
        print(f"\n-- {label} --")
        result, elapsed = solve(problem, method)
        print(f"{result.nit} iterations, {result.nfev} evaluations, {elapsed:.2f} s")
        code |= report(problem, result)
        with torch.no_grad():
            W = V.detach()
            orthogonality = float((W.T @ W - torch.eye(k, dtype=W.dtype)).abs().max())
        print(f"max |VᵀV − I| = {orthogonality:.1e}, largest principal angle to the top-{k} eigenvectors "
              f"{largest_principal_angle(W, A):.1e} rad")
    return code


if __name__ == "__main__":
    sys.exit(main())
