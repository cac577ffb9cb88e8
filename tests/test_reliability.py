"""Reliability catalogue (see tests/README.md): bad values, bad types, hard problems and certificate truthfulness.

Cases already covered elsewhere are listed in tests/README.md with the test that covers them; this file holds
the rest.
"""
import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import example, given, settings, strategies as st

import constrained_optim as co

F64 = torch.float64


def _closure(opt, objective):
    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss
    return closure


def _sqp_start_raises(objective, constraints, x, match):
    opt = co.ConstrainedSQP([x], constraints)
    before = x.detach().clone()
    with pytest.raises(ValueError, match=match):
        opt.step(_closure(opt, objective))
    assert torch.equal(x.detach(), before)


# ------------------------------------------------------------------------------------------ bad values
def test_nan_gradient_with_finite_objective_at_start_raises():
    x = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    # sqrt(|x|) is finite at 0 but its gradient is inf there
    _sqp_start_raises(lambda: x[0].abs().sqrt() + x[1] ** 2, [co.ineq(lambda: x.sum() - 5)], x, "not finite")


def test_nan_constraint_value_at_start_raises():
    x = torch.tensor([-1.0, 1.0], dtype=F64, requires_grad=True)
    _sqp_start_raises(lambda: (x ** 2).sum(), [co.ineq(lambda: torch.log(x[0:1]))], x, "not finite")


def test_infinite_constraint_gradient_at_start_raises():
    x = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    _sqp_start_raises(lambda: (x ** 2).sum(), [co.ineq(lambda: x[0:1].abs().sqrt() - 1)], x, "gradient is not finite")


@pytest.mark.parametrize("where", ["objective inf", "constraint nan", "jacobian nan"])
def test_non_finite_trial_points_are_rejected(where):
    """The first full step from x = 1 (towards the unconstrained minimizer 0.1 of −log x + 10x, d ≈ −9) lands at
    a negative x where the chosen quantity is not finite; the run must still certify the optimum."""
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    seen = []

    def objective():
        if where == "objective inf":
            value = torch.where(x > 0, -torch.log(x.clamp(min=1e-300)) + 10 * x, torch.full_like(x, math.inf)).sum()
        else:
            value = (-torch.log(x.abs()) + 10 * x).sum()
        return value

    def cons():
        c = x - 2.0
        if where == "constraint nan":
            c = c + torch.where(x > 0, torch.zeros_like(x), torch.full_like(x, math.nan))
        if where == "jacobian nan":
            c = c + 0.0 * torch.sqrt(x)        # value finite (0 · NaN is NaN only where x < 0), gradient NaN there
            seen.append(float(x))
        return c
    res = co.minimize(objective, [x], [co.ineq(cons)], max_iter=100)
    assert res.success and torch.isfinite(x).all()
    assert x.item() == pytest.approx(0.1, rel=1e-6)
    assert all(math.isfinite(h["fun"]) and math.isfinite(h["violation"]) for h in res.history)


@pytest.mark.parametrize("method", ["alm", "penalty", "pgd"])
def test_first_order_nan_gradient_skips_the_step(method):
    x = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    if method == "pgd":
        opt = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], lr=0.1)
    else:
        cls = co.AugmentedLagrangian if method == "alm" else co.Penalty
        opt = cls([x], [co.ineq(lambda: x.sum() - 1.0)], lr=0.1)
    opt.step(_closure(opt, lambda: (x ** 2).sum()))
    before = x.detach().clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(_closure(opt, lambda: (x ** 2).sum() + 0.0 * x.sum().sqrt() * math.nan))
    assert torch.equal(x.detach(), before)


# ------------------------------------------------------------------------------------- bad shapes, types
def test_parameters_on_different_devices_raise():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, device="meta", requires_grad=True)
    for build in (lambda: co.ConstrainedSQP([a, b], [co.ineq(lambda: a.sum())]),
                  lambda: co.AugmentedLagrangian([a, b], [co.ineq(lambda: a.sum())])):
        with pytest.raises(TypeError, match="different devices"):
            build()


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(5, 2, sparse=True).double()
    opt = co.ConstrainedSQP(emb.parameters(), [co.ineq(lambda: emb.weight.sum() - 1.0)])
    with pytest.raises(TypeError, match="sparse"):
        opt.step(_closure(opt, lambda: emb(torch.tensor([0, 1])).square().sum()))


def test_integer_parameter_raises():
    with pytest.raises(TypeError, match="floating"):
        co.ConstrainedSQP([torch.zeros(2, dtype=torch.int64)], [co.ineq(lambda: torch.zeros(1))])


@pytest.mark.parametrize("optimizer", ["sqp", "alm", "penalty"])
def test_empty_constraint_list_raises(optimizer):
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    cls = {"sqp": co.ConstrainedSQP, "alm": co.AugmentedLagrangian, "penalty": co.Penalty}[optimizer]
    with pytest.raises(ValueError, match="no constraints"):
        cls([x], [])


# ------------------------------------------------------------------------------------------ hard problems
def test_linearly_dependent_constraint_gradients():
    """LICQ fails: the same constraint twice and a multiple of it; multipliers are not unique but the KKT
    certificate (a fit) exists, and the solution is the projection onto the plane."""
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    cons = [co.eq(lambda: x.sum() - 1.0, name="e1"), co.eq(lambda: x.sum() - 1.0, name="e2"),
            co.eq(lambda: 2 * x.sum() - 2.0, name="e3")]
    res = co.minimize(lambda: ((x - a) ** 2).sum(), [x], cons, max_iter=100)
    assert res.success
    expected = a - (a.sum() - 1.0) / 3
    assert torch.allclose(x.detach(), expected, atol=1e-7)
    total = float(res.multipliers["e1"] + res.multipliers["e2"] + 2 * res.multipliers["e3"])
    assert total == pytest.approx(2 * (a.sum().item() - 1) / 3, rel=1e-6)    # the combination is unique


def test_degenerate_active_constraint_with_zero_multiplier():
    """x₀ <= 1 is active at the optimum (1, −1) of (x₀ − 1)² + (x₁ + 1)², with multiplier 0."""
    x = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    cons = [co.ineq(lambda: x[0:1] - 1.0, name="degenerate"), co.ineq(lambda: x[1:2] - 5.0, name="slack")]
    res = co.minimize(lambda: (x[0] - 1) ** 2 + (x[1] + 1) ** 2, [x], cons, max_iter=100)
    assert res.success
    assert torch.allclose(x.detach(), torch.tensor([1.0, -1.0], dtype=F64), atol=1e-7)
    assert abs(float(res.multipliers["degenerate"])) <= 1e-6


def test_badly_scaled_constraints_side_by_side():
    """1e-8 and 1e8 scaled constraints in one problem. Feasibility tolerances are absolute (in each constraint's
    units), so a constraint scaled by 1e-8 is resolved only with a tolerance below its scale; with the default
    1e-8 the run must not claim convergence at a point that is not a KKT point of the unscaled problem (the
    start (0, 0): the tiny constraint's value −1e-8 is within the tolerance, but it is 0.7 away from its
    boundary), and with tol_ineq = 1e-12 it solves the problem like the unscaled one."""
    def solve(scale_tiny, scale_huge, **options):
        x = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
        cons = [co.ineq(lambda: scale_tiny * (x[0:1] + x[1:2] - 1.0), name="tiny"),
                co.ineq(lambda: scale_huge * (x[0:1] - x[1:2] - 0.5), name="huge")]
        res = co.minimize(lambda: (x[0] - 2) ** 2 + (x[1] - 2) ** 2, [x], cons, max_iter=200, **options)
        return x.detach(), res
    x_ref, ref = solve(1.0, 1.0)
    assert ref.success and torch.allclose(x_ref, torch.tensor([0.5, 0.5], dtype=F64), atol=1e-8)
    x, res = solve(1e-8, 1e8)
    assert res.history[0]["stationarity"] > 0.1             # the start is not certified
    if res.success:
        assert torch.allclose(x, x_ref, atol=1e-6)
    else:
        assert res.status in (co.Status.STALLED_INFEASIBLE, co.Status.STALLED_FEASIBLE, co.Status.MAX_ITER)
    x, res = solve(1e-8, 1e8, tol_ineq=1e-12)
    assert res.success and torch.allclose(x, x_ref, atol=1e-8)
    assert res.fun == pytest.approx(ref.fun, rel=1e-10)
    x, res = solve(1.0, 1e8)                                   # the 1e8 scaling alone changes nothing
    assert res.success and torch.allclose(x, x_ref, atol=1e-8)


def test_infeasible_problem_returns_the_most_feasible_point():
    x = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: torch.stack([(x ** 2).sum() - 1, 2 - x[0]]))])
    closure = _closure(opt, lambda: (x ** 2).sum())
    for _ in range(300):
        opt.step(closure)
        if opt.certificate.status.terminal:
            break
    assert opt.certificate.status is co.Status.INFEASIBLE
    assert "infeasible" in opt.certificate.message
    best = opt.most_feasible      # the iterate with the least max-violation seen (not necessarily the last)
    assert best is not None and torch.isfinite(best["x"]).all()
    assert 0.69 <= best["violation"] <= opt.certificate.violation     # min over x of the max violation: 0.697
    c = torch.stack([(best["x"] ** 2).sum() - 1, 2 - best["x"][0]])
    assert float(c.clamp(min=0).max()) == pytest.approx(best["violation"], rel=1e-12)


# -------------------------------------------------------------------------------- property tests
def _random_convex_problem(seed):
    """min ½xᵀQx + pᵀx s.t. Gx <= h (feasible: h = G x₀ + slack), Q positive definite."""
    rng = np.random.default_rng(seed)
    n, m = rng.integers(2, 6), rng.integers(1, 5)
    M = rng.standard_normal((n, n))
    Q = M @ M.T + 0.5 * np.eye(n)
    p = rng.standard_normal(n) * 3
    G = rng.standard_normal((m, n))
    h = G @ rng.standard_normal(n) + rng.random(m)
    return Q, p, G, h


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([1e-4, 1e4]))
# found by a scan of seeds 0–299: these stopped STALLED_FEASIBLE at stationarity 1.0–1.7e-8 (the tolerance is 1e-8)
# while the line search could not see decreases below the rounding of φ (of an active constraint at 1e-4, of f
# at 1e4)
@example(seed=52, scale=1e-4)
@example(seed=166, scale=1e-4)
@example(seed=55, scale=1e4)
@example(seed=169, scale=1e4)
def test_solution_invariant_to_objective_scale(seed, scale):
    Q, p, G, h = (torch.tensor(a, dtype=F64) for a in _random_convex_problem(seed))
    xs = []
    for factor in (1.0, scale):
        x = torch.zeros(Q.shape[0], dtype=F64, requires_grad=True)
        res = co.minimize(lambda: factor * (0.5 * x @ Q @ x + p @ x), [x], [co.ineq(lambda: G @ x - h)], max_iter=300)
        assert res.success, res
        xs.append(x.detach().clone())
    assert torch.allclose(xs[0], xs[1], atol=1e-6 * max(1.0, float(xs[0].abs().max())))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), iterations=st.integers(0, 12),
       method=st.sampled_from(["sqp", "alm", "penalty"]))
def test_a_converged_certificate_is_always_true(seed, iterations, method):
    """Whatever the method and however far the run went: when the certificate says CONVERGED, an independent
    check (SciPy bounded least squares for the multipliers) confirms feasibility and stationarity."""
    Qn, pn, Gn, hn = _random_convex_problem(seed)
    Q, p, G, h = (torch.tensor(a, dtype=F64) for a in (Qn, pn, Gn, hn))
    x = torch.zeros(Q.shape[0], dtype=F64, requires_grad=True)
    res = co.minimize(lambda: 0.5 * x @ Q @ x + p @ x, [x], [co.ineq(lambda: G @ x - h)], method=method,
                      max_iter=iterations)
    if not res.success:
        return
    cert = res.certificate
    xn = x.detach().numpy()
    c = Gn @ xn - hn
    assert c.max() <= cert.tol_ineq
    g = Qn @ xn + pn
    active = c >= -cert.tol_ineq
    scale = max(np.abs(g).max(), np.abs(pn).max())
    if active.any():
        fit = scipy.optimize.lsq_linear(Gn[active].T, -g, bounds=(0, np.inf))
        residual = np.abs(Gn[active].T @ fit.x + g).max()
    else:
        residual = np.abs(g).max()
    # the certificate's fit may also use nearly active rows and κ-weighted multipliers; allow a factor 10
    assert residual <= 10 * cert.tol_opt * scale + 1e-12


def test_parameters_never_hold_nan_after_a_closure_that_raises_in_every_optimizer():
    for build in (lambda x: co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1)]),
                  lambda x: co.AugmentedLagrangian([x], [co.ineq(lambda: x.sum() - 1)], optimizer=torch.optim.LBFGS),
                  lambda x: co.ProjectedGradient([x], [co.Ball(x, 1.0)], step="spg")):
        x = torch.tensor([3.0, -1.0], dtype=F64, requires_grad=True)
        opt = build(x)
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            if calls["n"] == 3:
                with torch.no_grad():
                    x.fill_(math.nan)       # a closure that corrupts the parameters, then fails
                raise RuntimeError("data loader failed")
            loss = ((x - 2) ** 2).sum()
            loss.backward()
            return loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="data loader"):
                for _ in range(5):
                    opt.step(closure)
        assert torch.isfinite(x).all(), type(opt).__name__
