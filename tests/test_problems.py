"""Known-solution problem library: self-checks and solver acceptance tests.

Part 1 (self-checks) validates ``tests/problems.py`` itself: shapes/dtypes,
the stored optimal points and values, and that an independent solver (scipy
SLSQP with exact autograd derivatives) reproduces the stored optimal values.

Part 2 (acceptance) runs ``constrained_optim.minimize(method="sqp")`` on every
problem and requires the published optimal value to 1e-6 relative accuracy
with a violation of at most 1e-6 (float64), for dense BFGS and L-BFGS, plus a
looser float32 check on a well-scaled subset.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import require_qpth
import torch

from problems import (
    ALL_PROBLEMS,
    HS_PROBLEMS,
    evaluate,
    get_problem,
    make_torch_problem,
    max_iter_for,
    rel_error,
    slsqp_solve,
    svm_data,
    svm_dual_reference,
    svm_primal_value,
    trust_constr_solve,
    violation,
)

SMOOTH = [p for p in ALL_PROBLEMS if p.smooth]
WITH_XOPT = [p for p in ALL_PROBLEMS if p.x_opt is not None]


def _ids(probs):
    return [p.name for p in probs]


# =============================================================================
# Part 1: self-checks of the problem library (no constrained_optim needed)
# =============================================================================

def test_registry():
    names = [p.name for p in ALL_PROBLEMS]
    assert len(names) == len(set(names))
    assert len(HS_PROBLEMS) >= 30
    for p in ALL_PROBLEMS:
        assert len(p.x0) == p.n, p.name
        assert p.x_opt is None or len(p.x_opt) == p.n, p.name
        assert p.ineq is not None or p.eq is not None, p.name
        assert math.isfinite(p.f_opt), p.name
        assert p.source, p.name
    # coverage of the kinds of problems the acceptance suite is meant to exercise
    assert any(p.eq is not None and p.ineq is None for p in HS_PROBLEMS)
    assert any(p.ineq is not None and p.eq is None for p in HS_PROBLEMS)
    assert any(p.ineq is not None and p.eq is not None for p in HS_PROBLEMS)
    assert any(violation(p, p.x0) > 0 for p in HS_PROBLEMS)
    assert sum(not p.smooth for p in ALL_PROBLEMS) >= 4
    assert max(p.n for p in HS_PROBLEMS) >= 10


@pytest.mark.parametrize("prob", ALL_PROBLEMS, ids=_ids(ALL_PROBLEMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_functions_dtype_shape_grad(prob, dtype):
    x = torch.tensor(prob.x0, dtype=dtype, requires_grad=True)
    fx = prob.f(x)
    assert fx.shape == () and fx.dtype == dtype
    outs = [fx]
    for fn in (prob.ineq, prob.eq):
        if fn is not None:
            c = fn(x)
            assert c.ndim == 1 and c.numel() >= 1 and c.dtype == dtype
            outs.append(c.sum())
    for o in outs:
        (g,) = torch.autograd.grad(o, x, allow_unused=True)
        assert g is None or bool(torch.isfinite(g).all()), prob.name


@pytest.mark.parametrize("prob", WITH_XOPT, ids=_ids(WITH_XOPT))
def test_x_opt_feasible_and_optimal(prob):
    fx, viol = evaluate(prob, prob.x_opt)
    assert viol <= 1e-9, f"{prob.name}: x_opt violates constraints by {viol:.2e}"
    assert rel_error(prob, fx) <= 1e-9, f"{prob.name}: f(x_opt)={fx!r} vs f_opt={prob.f_opt!r}"


def test_x_opt_first_order_kkt():
    """At x_opt a nonnegative-multiplier KKT combination exists (smooth problems)."""
    from scipy.optimize import nnls

    for prob in WITH_XOPT:
        if not prob.smooth:
            continue
        x = torch.tensor(prob.x_opt, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(prob.f(x), x)
        cols = []
        if prob.ineq is not None:
            J = torch.autograd.functional.jacobian(prob.ineq, x.detach())
            act = prob.ineq(x.detach()) > -1e-7
            cols += list(J[act])
        if prob.eq is not None:
            J = torch.autograd.functional.jacobian(prob.eq, x.detach())
            cols += list(J) + list(-J)  # free multipliers as a difference of two >= 0
        if not cols:
            assert float(g.norm()) < 1e-7
            continue
        A = torch.stack(cols, dim=1).numpy()
        _, resid = nnls(A, -g.numpy(), maxiter=10000)
        assert resid <= 1e-6 * max(1.0, float(g.norm())), f"{prob.name}: KKT residual {resid:.2e}"


# scipy SLSQP reproduces f_opt from the published starting point on all smooth
# problems except these (failure reason in the comment); those are checked with
# trust-constr from x0 instead.
SLSQP_FAILS_FROM_X0 = {
    "hs061": "SLSQP: 'Singular matrix C in LSQ subproblem' at x0 = 0 (rank-deficient constraint Jacobian)",
}


@pytest.mark.parametrize("prob", SMOOTH, ids=_ids(SMOOTH))
def test_slsqp_oracle_from_x0(prob):
    if prob.name in SLSQP_FAILS_FROM_X0:
        r = trust_constr_solve(prob)
    else:
        r = slsqp_solve(prob)
    assert r["violation"] <= 1e-6, (prob.name, r)
    assert rel_error(prob, r["fun"]) <= 1e-6, (prob.name, r["fun"], prob.f_opt)


@pytest.mark.parametrize("prob", [p for p in WITH_XOPT if p.smooth], ids=_ids([p for p in WITH_XOPT if p.smooth]))
def test_slsqp_oracle_from_perturbed_x_opt(prob):
    """No better point nearby: SLSQP started next to x_opt returns to f_opt."""
    rng = np.random.default_rng(0)
    xo = np.asarray(prob.x_opt)
    xp = xo + 1e-3 * (1 + np.abs(xo)) * rng.standard_normal(prob.n)
    r = slsqp_solve(prob, x0=xp, ftol=1e-15)
    assert r["violation"] <= 1e-6, (prob.name, r)
    assert rel_error(prob, r["fun"]) <= 1e-6, (prob.name, r["fun"], prob.f_opt)


def test_slsqp_failure_list_is_current():
    for name in SLSQP_FAILS_FROM_X0:
        r = slsqp_solve(get_problem(name))
        assert not (rel_error(get_problem(name), r["fun"]) <= 1e-6 and r["violation"] <= 1e-6), name


def test_eq_qp_closed_form():
    for name in ("eqqp_n5_q2", "eqqp_n30_q10"):
        p = get_problem(name)
        x = torch.tensor(p.x_opt, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(p.f(x), x)
        A = torch.autograd.functional.jacobian(p.eq, x.detach())
        lam = torch.linalg.lstsq(A.T, -g[:, None]).solution
        assert float((g[:, None] + A.T @ lam).abs().max()) < 1e-10
        assert float(p.eq(x.detach()).abs().max()) < 1e-12


def test_cvx_reference_matches_trust_constr():
    p = get_problem("cvx_ball_n10")
    r = trust_constr_solve(p)
    assert r["violation"] <= 1e-8
    assert abs(r["fun"] - p.f_opt) <= 1e-8 * max(1.0, abs(p.f_opt))
    # the constraints matter: the unconstrained minimizer is infeasible
    Pm = torch.autograd.functional.hessian(p.f, torch.zeros(p.n, dtype=torch.float64))
    x = torch.zeros(p.n, dtype=torch.float64, requires_grad=True)
    (g0,) = torch.autograd.grad(p.f(x), x)
    x_unc = torch.linalg.solve(Pm, -g0)
    assert violation(p, x_unc) > 0.1


def test_trace_closed_form():
    for name, n, k in (("trace_n8_k2", 8, 2), ("trace_n10_k3", 10, 3)):
        p = get_problem(name)
        V = torch.tensor(p.x_opt, dtype=torch.float64).reshape(n, k)
        assert torch.allclose(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert p.eq(torch.tensor(p.x_opt, dtype=torch.float64)).numel() == k * (k + 1) // 2
        V0 = torch.tensor(p.x0, dtype=torch.float64).reshape(n, k)
        assert float((V0.T @ V0 - torch.eye(k, dtype=torch.float64)).abs().max()) > 0.1  # x0 not orthonormal
        # rotating the optimal basis keeps the value (the minimizer is a subspace)
        Q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        fv, viol = evaluate(p, (V @ Q).reshape(-1))
        assert viol < 1e-12 and abs(fv - p.f_opt) < 1e-10


def test_svm_primal_equals_dual_and_not_separable():
    from scipy.optimize import linprog

    ref = svm_dual_reference()
    assert ref["success"]
    assert abs(ref["primal"] - ref["dual"]) <= 1e-9 * max(1.0, abs(ref["dual"]))
    p = get_problem("svm_primal_m20")
    assert abs(p.f_opt - ref["dual"]) < 1e-12
    assert abs(svm_primal_value(ref["w"], ref["b"]) - p.f_opt) <= 1e-9
    # hard-margin LP y_i (w.a_i + b) >= 1 is infeasible => data not linearly separable
    A, y, _ = svm_data()
    lp = linprog(np.zeros(3), A_ub=-(y[:, None] * np.c_[A, np.ones(len(y))]), b_ub=-np.ones(len(y)),
                 bounds=[(None, None)] * 3)
    assert lp.status == 2


def test_nonsmooth_rosenbrock_reference():
    for p in ALL_PROBLEMS:
        if not p.name.startswith("nsrosen"):
            continue
        assert not p.smooth
        assert p.f_opt == pytest.approx((1 - 1 / math.sqrt(2)) ** 2, rel=1e-15)
        # a coarse grid over the feasible set never beats f_opt
        g1 = torch.linspace(-2, 1 / math.sqrt(2), 301, dtype=torch.float64)
        g2 = torch.linspace(-2, 0.5, 301, dtype=torch.float64)
        X1, X2 = torch.meshgrid(g1, g2, indexing="ij")
        F = 8 * (X1 ** 2 - X2).abs() + (1 - X1) ** 2
        assert float(F.min()) >= p.f_opt - 1e-12
    starts = {get_problem(f"nsrosen_{i}").x0 for i in range(5)}
    assert (1.0, 1.0) in starts


# =============================================================================
# Part 2: acceptance tests for constrained_optim.minimize(method="sqp")
# =============================================================================

# Iteration limit: 1000, raised for degenerate and nonsmooth problems (see problems.MAX_ITER_HINT).
# Problems run only with the slow marker for dense BFGS (n >= 15 or expensive).
BIG = {p.name for p in ALL_PROBLEMS if p.n >= 15}

FLOAT32_SUBSET = [
    "hs007", "hs010", "hs012", "hs014", "hs022", "hs028", "hs035", "hs042", "hs043",
    "hs048", "hs051", "hs052", "hs053", "hs065", "hs071", "hs076",
    "eqqp_n5_q2", "cvx_ball_n10", "trace_n8_k2", "nsrosen_0",
]


def _run_sqp(prob, dtype=torch.float64, **options):
    import constrained_optim as co

    x, objective, cons = make_torch_problem(prob, dtype)
    max_iter = max_iter_for(prob)
    res = co.minimize(objective, [x], cons, method="sqp", max_iter=max_iter, **options)
    return x, res


def _check(prob, x, res, f_tol, viol_tol):
    info = (f"{prob.name}: fun={res.fun!r} f_opt={prob.f_opt!r} violation={res.violation:.2e} "
            f"nit={res.nit} status={res.status} message={res.message!r}")
    assert rel_error(prob, res.fun) <= f_tol, info
    assert res.violation <= viol_tol, info
    # the parameter tensor holds the returned point, and the reported values are honest
    fx, viol = evaluate(prob, x)
    assert abs(fx - res.fun) <= 10 * f_tol * max(1.0, abs(prob.f_opt)), info + f" f(x)={fx!r}"
    assert viol <= 2 * viol_tol, info + f" violation(x)={viol:.2e}"


def _params(names_slow):
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in names_slow else [])
            for p in ALL_PROBLEMS]


@pytest.mark.parametrize("prob", _params(BIG))
def test_sqp_bfgs_float64(prob):
    x, res = _run_sqp(prob)
    _check(prob, x, res, f_tol=1e-6, viol_tol=1e-6)


def _perturbed_start(prob, seed, eps):
    """x₀ + ε (1 + |x₀|) ⊙ N(0, I), seeded."""
    x0 = np.asarray(prob.x0, dtype=np.float64)
    return x0 + eps * (1 + np.abs(x0)) * np.random.default_rng(seed).standard_normal(x0.shape)


def _check_from_perturbed_start(prob, seed, eps):
    """The run ends CONVERGED and feasible; at f_opt, or, where a nonconvex problem has other local solutions, at
    one: SLSQP started at our answer stays there (same objective)."""
    import constrained_optim as co

    x, objective, cons = make_torch_problem(prob, x0=_perturbed_start(prob, seed, eps))
    res = co.minimize(objective, [x], cons, max_iter=max_iter_for(prob))
    info = f"{prob.name} seed {seed} eps {eps}: {res.status.name}, f = {res.fun!r}, violation {res.violation:.1e}"
    assert res.status is co.Status.CONVERGED and res.violation <= 1e-6, info
    if rel_error(prob, res.fun) > 1e-6:
        local = slsqp_solve(prob, x0=x.detach().numpy())
        assert abs(local["fun"] - res.fun) <= 1e-7 * max(1.0, abs(res.fun)), info + f", SLSQP from it: {local['fun']!r}"
    return res


# Found by a scan of seeds 0–7 at ε = 1e-3, 1e-2, 1e-1 over the smooth problems. hs108 ended STALLED 0.03–2.4 %
# above f_opt with μ steered from 1 to 1e-17: at x₉ ≈ 0 the row ∇(x₉² − 1) of J is rounding, and the box QP of the
# direction equilibrated it into a wrong SOLVED answer (test_qp::test_a_row_of_rounding_size_is_not_scaled_up);
# hs078 diverged to ‖c‖ = 5e100 through a second-order correction (test_sqp). hs044 reaches a local solution.
@pytest.mark.parametrize("name, seed, eps", [("hs108", 2, 1e-3), ("hs108", 4, 1e-3), ("hs108", 1, 1e-2), ("hs108", 7, 1e-1),
                                             ("hs078", 3, 1e-1), ("hs044", 3, 1e-1)])
def test_sqp_from_perturbed_starts_found_by_the_scan(name, seed, eps):
    res = _check_from_perturbed_start(get_problem(name), seed, eps)
    if name == "hs108":
        assert rel_error(get_problem(name), res.fun) <= 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("prob", SMOOTH, ids=_ids(SMOOTH))
def test_sqp_from_perturbed_starts(prob, seed):
    _check_from_perturbed_start(prob, seed, 1e-1)


@pytest.mark.slow
@pytest.mark.parametrize("prob", ALL_PROBLEMS, ids=_ids(ALL_PROBLEMS))
def test_sqp_lbfgs_float64(prob):
    x, res = _run_sqp(prob, memory=10)
    _check(prob, x, res, f_tol=1e-6, viol_tol=1e-6)


@pytest.mark.parametrize("name", FLOAT32_SUBSET)
def test_sqp_bfgs_float32(name):
    prob = get_problem(name)
    x, res = _run_sqp(prob, dtype=torch.float32)
    assert x.dtype == torch.float32
    _check(prob, x, res, f_tol=1e-4, viol_tol=1e-5)


# float32 parameters: the line search's allowance for the rounding of φ = μf + v was that of float64 (where f and c
# are kept), 1e9 times too small for values the closure computes in float32, and these five ended STALLED_FEASIBLE
# with stationarity 1.3–5e-5 (tolerance 1.2e-5) after 258–326 evaluations; now CONVERGED in 9–37.
@pytest.mark.parametrize("name", ["hs035", "hs037", "hs040", "hs052", "hs053"])
def test_sqp_bfgs_float32_certifies(name):
    prob = get_problem(name)
    x, res = _run_sqp(prob, dtype=torch.float32)
    assert res.status.name == "CONVERGED", res.certificate
    _check(prob, x, res, f_tol=1e-6, viol_tol=1e-5)


# float32: a search that bisected down to steps below the resolution of x (every x + t d rounds to x) evaluated x
# itself, up to 50 times, and where c₁ t g₀ fell below the rounding of φ(x) it returned x as a point of sufficient
# decrease: a step of zero, never the failed search that resets H. These three ended STALLED_FEASIBLE after 266–311
# evaluations (1.4e-7 to 7.3e-7 above f*); the search now ends at the resolution and they certify in 66–157.
@pytest.mark.parametrize("name", ["hs042", "hs100", "hs113"])
def test_sqp_float32_searches_end_at_the_resolution_of_the_step(name):
    prob = get_problem(name)
    x, res = _run_sqp(prob, dtype=torch.float32)
    assert res.status.name == "CONVERGED", res.certificate
    assert res.nfev <= 200
    _check(prob, x, res, f_tol=2e-6, viol_tol=1e-5)


# The optional qpth backend for the direction QP (CI installs it with `pip install --no-deps qpth`,
# without cvxpy, in a step after the README's test command). The certificate is computed by the builtin
# solver either way. qpth is less accurate (KKT residuals near 1e-11 on singular duals), which can make
# steering shrink the penalty too far (svm_primal_m20 then stalls honestly): a CONVERGED claim must
# still meet the bars, and the well-conditioned problems must be solved.
_QPTH_SOLVED = ("hs035", "hs071", "trace_n8_k2", "nsrosen_1")
_QPTH_PROBLEMS = [get_problem(name) for name in _QPTH_SOLVED + ("hs093", "svm_primal_m20")]


@pytest.mark.qpth
@pytest.mark.parametrize("prob", _QPTH_PROBLEMS, ids=_ids(_QPTH_PROBLEMS))
def test_sqp_qpth_backend(prob):
    import constrained_optim as co
    require_qpth()
    x, res = _run_sqp(prob, qp_solver="qpth")
    if prob.name in _QPTH_SOLVED:
        assert res.success, res.message
    if res.success:
        _check(prob, x, res, f_tol=1e-6, viol_tol=1e-6)
    else:
        assert res.status is not co.Status.CONVERGED
