"""Minimize the largest eigenvalue of an affine matrix family: a nonsmooth, constrained problem.

1. Commuting family, with an exact LP oracle. With a random orthogonal Q and diagonal matrices D_i,

       A(x) = Q (D₀ + Σᵢ xᵢ Dᵢ) Qᵀ,        minimize  λ_max(A(x))   subject to  x ≥ 0,  Σᵢ xᵢ = 1,

   where λ_max is computed by ``torch.linalg.eigvalsh(A)[-1]`` and differentiated by autograd. Because the
   Dᵢ share the eigenvectors Q, λ_max(A(x)) = max_j (d₀ + Dᵀx)_j is a maximum of linear functions, and
   the problem is the linear program

       minimize  t   subject to  d₀,ⱼ + Σᵢ xᵢ dᵢⱼ ≤ t  (j = 1..m),   x ≥ 0,   Σᵢ xᵢ = 1,

   solved exactly by ``scipy.optimize.linprog`` (HiGHS): that is f_opt. The data are built so that the
   optimum is nonsmooth: a point x* in the interior of the simplex and weights w > 0 on k eigenvalue
   indices J are drawn, the columns dᵢ,J are shifted so that Σ_{j∈J} wⱼ dᵢⱼ = 0 for every i (stationarity
   of the LP with multipliers w), d₀,J puts those k eigenvalues at the same value t* at x*, and the
   other m − k eigenvalues stay below t*. At the solution k eigenvalues coalesce, so λ_max is not
   differentiable there; the LP recovers x* and t* independently of this construction.

2. Non-commuting family (no oracle). A(x) = A₀ + Σᵢ xᵢ Aᵢ with random symmetric A₀ and traceless
   random symmetric Aᵢ, minimized over the ball ‖x‖₂ ≤ R. Its optimum is not known in closed form;
   the answer is checked by a Lagrangian dual bound instead: for every density matrix Y (Y ⪰ 0,
   tr Y = 1) and every feasible x,

       λ_max(A(x)) ≥ ⟨Y, A(x)⟩ = ⟨Y, A₀⟩ + Σᵢ xᵢ ⟨Y, Aᵢ⟩ ≥ ⟨Y, A₀⟩ − R ‖a(Y)‖₂,   a(Y)ᵢ = ⟨Y, Aᵢ⟩,

   so every Y gives a rigorous lower bound on the optimum. After the solve we search Y = U Z Uᵀ over the
   top-r eigenvectors U of A(x̂) (r = 1, 2, 3; Z an r × r density matrix, parametrized as WWᵀ/‖W‖²_F and
   maximized with SciPy's BFGS) and report the gap between λ_max(A(x̂)) and the best bound.

Measured (torch 2.13 CPU, float64): part 1 ends CONVERGED through the gradient-sampling certificate in
both sizes (quick: 3 coalescing eigenvalues, 33 iterations, relative gap 4e-10; full: 6 coalescing, 119
iterations, 4e-11), so its certificate is required, with a gap <= 1e-7. Part 2's optima have a double top
eigenvalue on the sphere ‖x‖ = R; the quick run ends CONVERGED, the full one STALLED_FEASIBLE, both within
1e-14 of the dual bound; there only feasibility and the bound (gap <= 1e-6) are required.

Exits with status 1 if an answer is off.

    python examples/eigenvalue.py [--quick]
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Problem, parse, report, single_threaded  # noqa: E402

import constrained_optim as co  # noqa: E402

# (matrix size m, number of variables k = number of coalescing eigenvalues)
SIZES = {True: (8, 3), False: (30, 6)}
# (matrix size m, number of variables k, ball radius R, seed): both optima lie on the sphere ‖x‖ = R with
# a double top eigenvalue (the quick one ends CONVERGED, the full one STALLED_FEASIBLE; measured)
NONCOMMUTING_SIZES = {True: (10, 6, 0.3, 0), False: (16, 10, 0.3, 3)}


class SpectralFamily(torch.nn.Module):
    """x ↦ A(x) = Q diag(d₀ + Dᵀx) Qᵀ, with ``x`` the only parameter (started at the simplex centre)."""

    def __init__(self, q: torch.Tensor, d0: torch.Tensor, d: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("d0", d0)
        self.register_buffer("d", d)        # [k, m]: row i is the diagonal of D_i
        self.x = torch.nn.Parameter(torch.empty(d.shape[0], dtype=torch.float64))
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.x.fill_(1.0 / self.x.numel())

    def matrix(self) -> torch.Tensor:
        return (self.q * (self.d0 + self.x @ self.d)) @ self.q.T

    def lambda_max(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.matrix())[-1]


def planted_data(m: int, k: int, seed: int = 0):
    """The data of part 1 with a planted nonsmooth optimum; returns (Q, d₀, D, x*, t*)."""
    rng = np.random.default_rng(seed)
    x_star = rng.dirichlet(np.full(k, 5.0))                 # interior point of the simplex
    w = rng.dirichlet(np.full(k, 5.0))                      # LP multipliers of the k active rows
    t_star = 1.0 + rng.uniform()
    d = rng.standard_normal((k, m))
    d[:, :k] -= (d[:, :k] @ w)[:, None]                     # Σ_j w_j d_ij = 0: x* is stationary
    d0 = np.empty(m)
    d0[:k] = t_star - x_star @ d[:, :k]                     # k eigenvalues equal to t* at x*
    d0[k:] = t_star - x_star @ d[:, k:] - rng.uniform(0.2, 1.0, m - k)   # the others below
    perm = rng.permutation(m)                               # hide the active rows among the others
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return q, d0[perm], d[:, perm], x_star, t_star


def lp_oracle(d0: np.ndarray, d: np.ndarray) -> tuple[float, np.ndarray]:
    """min t s.t. d₀ + Dᵀx ≤ t·1, x ≥ 0, Σx = 1 (variables (x, t)) by HiGHS; returns (t, x)."""
    from scipy.optimize import linprog
    k, m = d.shape
    res = linprog(np.r_[np.zeros(k), 1.0], A_ub=np.c_[d.T, -np.ones(m)], b_ub=-d0,
                  A_eq=np.r_[np.ones(k), 0.0][None], b_eq=[1.0],
                  bounds=[(0, None)] * k + [(None, None)], method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    return float(res.fun), res.x[:k]


def build(quick: bool) -> Problem:
    """Part 1: λ_max of the commuting family over the simplex; f_opt from the LP."""
    m, k = SIZES[quick]
    q, d0, d, _, _ = planted_data(m, k)
    model = SpectralFamily(torch.tensor(q), torch.tensor(d0), torch.tensor(d)).double()
    f_opt, _ = lp_oracle(d0, d)
    return Problem(
        name=f"lambda_max_commuting_{m}x{m}_k{k}", model=model, objective=model.lambda_max,
        constraints=[co.Simplex(model.x, name="simplex")], f_opt=f_opt, oracle="LP by scipy linprog/HiGHS",
        reset=model.reset, options={"max_iter": 500})


class AffineFamily(torch.nn.Module):
    """x ↦ A(x) = A₀ + Σᵢ xᵢ Aᵢ, with ``x`` the only parameter (started at 0)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)        # [k + 1, m, m]
        self.x = torch.nn.Parameter(torch.zeros(a.shape[0] - 1, dtype=torch.float64))

    def reset(self) -> None:
        with torch.no_grad():
            self.x.zero_()

    def matrix(self) -> torch.Tensor:
        return self.a[0] + torch.tensordot(self.x, self.a[1:], 1)

    def lambda_max(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.matrix())[-1]


def build_noncommuting(quick: bool) -> tuple[Problem, float]:
    """Part 2: λ_max of a non-commuting family over the ball ‖x‖ ≤ R; returns (problem, R).

    There is no oracle (``f_opt`` is None); check the answer with :func:`dual_lower_bound`."""
    m, k, radius, seed = NONCOMMUTING_SIZES[quick]
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k + 1, m, m))
    a = (a + a.transpose(0, 2, 1)) / 2
    a[1:] -= np.trace(a[1:], axis1=1, axis2=2)[:, None, None] / m * np.eye(m)   # traceless directions
    model = AffineFamily(torch.tensor(a))
    problem = Problem(
        name=f"lambda_max_noncommuting_{m}x{m}_k{k}", model=model, objective=model.lambda_max,
        constraints=[co.Ball(model.x, radius, name="ball")], f_opt=None,
        oracle="none (Lagrangian dual bound after the solve)", reset=model.reset, options={"max_iter": 500})
    return problem, radius


def dual_lower_bound(a: np.ndarray, radius: float, x: np.ndarray, ranks=(1, 2, 3), seed: int = 0) -> float:
    """max over Y = U Z Uᵀ of ⟨Y, A₀⟩ − R‖a(Y)‖ (a rigorous lower bound on min_{‖x‖≤R} λ_max(A(x))),
    with U the top-r eigenvectors of A(x) and Z an r × r density matrix found by BFGS."""
    from scipy.optimize import minimize as scipy_minimize
    rng = np.random.default_rng(seed)
    _, vectors = np.linalg.eigh(a[0] + np.tensordot(x, a[1:], 1))
    best = -np.inf
    for r in ranks:
        u = vectors[:, -r:]
        b = np.einsum("ja,ijk,kb->iab", u, a, u)            # [k + 1, r, r]: the family on span(U)

        def negative_bound(w_flat: np.ndarray):
            w = w_flat.reshape(r, r)
            s = (w * w).sum()
            z = w @ w.T / s
            az = np.einsum("ab,iab->i", z, b[1:])
            norm = max(np.linalg.norm(az), 1e-300)
            g = np.tensordot(np.r_[1.0, -radius * az / norm], b, 1)     # gradient of the bound in Z
            grad_w = 2 * g @ w / s - 2 * np.sum(g * z) * w / s
            return -(np.sum(z * b[0]) - radius * norm), -grad_w.ravel()

        for _ in range(5):
            res = scipy_minimize(negative_bound, rng.standard_normal(r * r), jac=True, method="BFGS",
                                 options={"gtol": 1e-13, "maxiter": 2000})
            if np.isfinite(res.fun):
                # re-evaluate the bound at the final Z: it is valid for any density matrix
                best = max(best, -negative_bound(res.x)[0])
    return float(best)


def solve(problem: Problem) -> tuple[co.OptimizeResult, float]:
    problem.reset()
    start = time.perf_counter()
    result = co.minimize(problem.objective, list(problem.model.parameters()), problem.constraints,
                         **problem.options)
    return result, time.perf_counter() - start


def eigenvalues_near_top(matrix: torch.Tensor, count: int) -> str:
    values = torch.linalg.eigvalsh(matrix.detach())
    return ", ".join(f"{float(v):.10f}" for v in values[-count:].flip(0))


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    return single_threaded(_run, args.quick)


def _run(quick: bool) -> int:
    problem = build(quick)
    print(f"== 1. {problem.name}: min λ_max(Q(D₀ + Σ xᵢDᵢ)Qᵀ) s.t. x in the simplex ==")
    result, seconds = solve(problem)
    k = problem.model.x.numel()
    print(f"status {result.status.name}, {result.nit} iterations, {result.nfev} function evaluations, "
          f"{seconds:.2f} s")
    print(f"top {k + 1} eigenvalues at the answer ({k} coalesce at the optimum): "
          f"{eigenvalues_near_top(problem.model.matrix(), k + 1)}")
    _, x_lp = lp_oracle(problem.model.d0.numpy(), problem.model.d.numpy())
    print(f"max |x − x_LP| = {np.abs(problem.model.x.detach().numpy() - x_lp).max():.1e}")
    code = report(problem, result, rel_tol=1e-7)

    problem, radius = build_noncommuting(quick)
    print(f"\n== 2. {problem.name}: min λ_max(A₀ + Σ xᵢAᵢ) s.t. ‖x‖ ≤ {radius:g} (no oracle) ==")
    result, seconds = solve(problem)
    print(f"status {result.status.name}, {result.nit} iterations, {result.nfev} function evaluations, "
          f"{seconds:.2f} s")
    print(result.certificate)
    model = problem.model
    x = model.x.detach().numpy()
    print(f"‖x‖ = {np.linalg.norm(x):.10f}; top 3 eigenvalues at the answer: "
          f"{eigenvalues_near_top(model.matrix(), 3)}")
    bound = dual_lower_bound(model.a.numpy(), radius, x)
    gap = (result.fun - bound) / max(1.0, abs(result.fun))
    feasible = result.violation <= 1e-8
    # the certificate is not required here: at a point where eigenvalues coalesce the SQP may end
    # STALLED_FEASIBLE at the optimum; the dual bound proves the objective instead
    print(f"objective {result.fun:.10g}, dual lower bound {bound:.10g}, relative gap {gap:.2e} (allowed 1e-6); "
          f"certificate not required (nonsmooth), feasibility required: {'yes' if feasible else 'NO'}")
    ok = feasible and gap <= 1e-6
    print("OK" if ok else "FAILED")
    return 1 if code or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
