"""ConstrainedSQP's step mechanics: termination statuses, fallbacks and the truthfulness of the certificate."""
import math
import warnings

import pytest
import torch

import constrained_optim as co

F64 = torch.float64


def _run(f, x, constraints, **options):
    return co.minimize(lambda: f(x), [x], constraints, max_iter=300, **options)


def test_locally_infeasible_problem_is_reported_infeasible():
    # ‖x‖² <= 1 and x₀ >= 2 cannot both hold; the violation is stationary at x = (1, 0)
    x = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    res = _run(lambda x: (x ** 2).sum(), x, [co.ineq(lambda: torch.stack([(x ** 2).sum() - 1, 2 - x[0]]))])
    assert res.status is co.Status.INFEASIBLE and not res.success
    assert res.violation == pytest.approx(1.0, abs=1e-6)       # the least possible violation
    assert torch.isfinite(x).all()


def test_unbounded_problem_is_reported_unbounded():
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    res = _run(lambda x: -x.sum(), x, [co.ineq(lambda: x[0] - x[1] - 1)])
    assert res.status is co.Status.UNBOUNDED and not res.success
    assert res.nit < 20 and res.fun < -1e6 and res.violation <= 1e-8


def test_bounded_problem_with_tiny_gradient_is_not_called_unbounded():
    # huge curvature, tiny gradient: early steps expand but the problem is bounded
    x = torch.tensor([1e-6, 1e-6], dtype=F64, requires_grad=True)
    res = _run(lambda x: 1e-8 * ((x - 1) ** 2).sum(), x, [co.ineq(lambda: x.sum() - 1)])
    assert res.status is co.Status.CONVERGED
    assert torch.allclose(x.detach(), torch.tensor([0.5, 0.5], dtype=F64), atol=1e-6)


def test_start_at_the_optimum_converges_without_moving():
    x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    res = _run(lambda x: ((x - 2) ** 2).sum(), x, [co.ineq(lambda: x.sum() - 2)])
    assert res.status is co.Status.CONVERGED and res.nit == 0 and res.nfev == 1
    assert res.multipliers["ineq0"].item() == pytest.approx(2.0)


def test_start_on_a_kink_with_zero_subgradient():
    # nonsmooth Rosenbrock from (1, 1): |x₁² − x₂| = 0 there, and torch's subgradient of |·| at 0 is 0
    x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    res = _run(lambda x: 8 * (x[0] ** 2 - x[1]).abs() + (1 - x[0]) ** 2, x,
               [co.ineq(lambda: torch.stack([math.sqrt(2) * x[0] - 1, 2 * x[1] - 1]))])
    assert res.success
    assert res.fun == pytest.approx((1 - 1 / math.sqrt(2)) ** 2, rel=1e-6)


def test_nan_trial_points_are_rejected_and_never_left_in_the_parameters():
    # log(x) is NaN for x < 0; the first full step from x = 1 (d = −9) lands at x = −8
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    seen = []

    def f(x):
        value = -torch.log(x).sum() + 10 * x.sum()
        seen.append(float(value.detach()))
        return value
    res = _run(f, x, [co.ineq(lambda: x - 2.0)])
    assert any(math.isnan(v) for v in seen)              # a NaN trial really happened
    assert res.success and torch.isfinite(x).all()
    assert x.item() == pytest.approx(0.1, rel=1e-6)      # minimizer of −log x + 10x
    assert all(math.isfinite(h["fun"]) for h in res.history)


def test_closure_that_raises_mid_step_leaves_the_last_good_point():
    x = torch.tensor([3.0, -1.0], dtype=F64, requires_grad=True)
    calls = {"n": 0}
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1)])

    def closure():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("data loader failed")
        opt.zero_grad()
        loss = ((x - torch.tensor([2.0, 2.0], dtype=F64)) ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)                     # evaluates the start (call 1)
    opt.step(closure)                     # one iteration (call 2 is its first trial)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(closure)                 # call 3 raises inside the line search
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_certificate_refuses_a_non_kkt_point_at_every_scale(scale):
    # the first step only evaluates and certifies the start: a feasible, non-stationary point
    x = torch.tensor([0.3, 0.1], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1)])

    def closure():
        opt.zero_grad()
        loss = scale * ((x - 1) ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    cert = opt.certificate
    assert not cert.converged and not cert.kkt
    assert cert.stationarity > 0.1


def test_sampled_certificate_is_not_claimed_far_from_the_optimum():
    # a sampled certificate holds only within sample_radius: the nonsmooth runs must end within
    # 1e-6 (relative) of the true optimal value whenever they claim convergence
    fopt = (1 - 1 / math.sqrt(2)) ** 2
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = (torch.rand(2, generator=gen, dtype=F64) * 6 - 3).requires_grad_()
        res = _run(lambda x: 8 * (x[0] ** 2 - x[1]).abs() + (1 - x[0]) ** 2, x,
                   [co.ineq(lambda: torch.stack([math.sqrt(2) * x[0] - 1, 2 * x[1] - 1]))])
        if res.success:
            assert abs(res.fun - fopt) <= 1e-6 * fopt
    assert res.certificate.samples >= 1



def test_sampled_fit_with_rows_shared_by_all_points_matches_scipy():
    """Rows equal at every sampled point (linear constraints) get one multiplier in the sampled fit: with all rows
    active (κ = 0) its residual is the least over per-point multipliers, which SciPy's SLSQP finds in the original
    form (one λ per point and row), and the multipliers are the sums over the points of SciPy's."""
    import numpy as np
    import scipy.optimize
    from constrained_optim.stationarity import _sampled
    gen = torch.Generator().manual_seed(4)
    k, n, m = 3, 12, 3                      # rows 0 (inequality) and 2 (equality) linear, row 1 (inequality) not
    g = torch.randn(k, n, generator=gen, dtype=F64)
    J = torch.randn(k, m, n, generator=gen, dtype=F64)
    J[:, [0, 2]] = torch.randn(2, n, generator=gen, dtype=F64)
    lower = torch.tensor([0.0, 0.0, -math.inf], dtype=F64)
    lam, r, solved, points = _sampled(g, J, torch.zeros(m, dtype=F64), lower, torch.full((m,), math.inf, dtype=F64))
    assert solved and points == k

    gn, Jn = g.numpy(), J.numpy()

    def residual(z):
        return z[:k] @ gn + np.einsum("jm,jmn->n", z[k:].reshape(k, m), Jn)
    ref = scipy.optimize.minimize(
        lambda z: 0.5 * residual(z) @ residual(z), np.r_[np.full(k, 1 / k), np.zeros(k * m)],
        jac=lambda z: np.r_[gn @ residual(z), np.einsum("jmn,n->jm", Jn, residual(z)).ravel()],
        bounds=[(0, None)] * k + [(0, None), (0, None), (None, None)] * k,
        constraints=[{"type": "eq", "fun": lambda z: z[:k].sum() - 1, "jac": lambda z: np.r_[np.ones(k), np.zeros(k * m)]}],
        method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    assert ref.success
    assert np.linalg.norm(residual(ref.x)) > 0.1       # not stationary: the fit has something to minimize
    assert np.allclose(r.numpy(), residual(ref.x), atol=1e-6)
    assert np.allclose(lam.numpy(), ref.x[k:].reshape(k, m).sum(0), atol=1e-5)
    # within max_size (k + 2 + k · 1 variables: 2 shared rows) only the first points: 7 fits 2 of them
    _, _, _, points = _sampled(g, J, torch.zeros(m, dtype=F64), lower, torch.full((m,), math.inf, dtype=F64), 7)
    assert points == 2

def test_lbfgs_and_dense_reach_the_same_answer():
    answers = []
    for memory in (None, 3):
        x = torch.tensor([2.0, 0.0, -1.0], dtype=F64, requires_grad=True)
        res = _run(lambda x: (x ** 4).sum() + ((x - 1) ** 2).sum(), x,
                   [co.eq(lambda: (x ** 2).sum() - 1), co.ineq(lambda: -x[0])], memory=memory)
        assert res.success
        answers.append(x.detach().clone())
    assert torch.allclose(answers[0], answers[1], atol=1e-6)


# ------------------------------------------------------------------ random convex problems vs SLSQP
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), n=st.integers(2, 8), p=st.integers(1, 6), with_eq=st.booleans())
def test_random_convex_problems_match_slsqp(seed, n, p, with_eq):
    """min ½xᵀPx + qᵀx  s.t.  Gx <= h,  ‖x‖² <= 4,  (aᵀx = b): a strictly convex problem with a unique
    solution, feasible by construction (x = 0 strictly satisfies the inequalities, and the plane passes through a
    point x₁ with ‖Gx₁‖∞ <= 0.09 < min h and ‖x₁‖ <= 1, which does too); SLSQP is the independent oracle."""
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=gen, dtype=F64)
    P = B @ B.T + 0.5 * torch.eye(n, dtype=F64)
    q = 3 * torch.randn(n, generator=gen, dtype=F64)
    G = torch.randn(p, n, generator=gen, dtype=F64)
    h = torch.rand(p, generator=gen, dtype=F64) + 0.1
    a = torch.randn(n, generator=gen, dtype=F64)
    u = torch.randn(n, generator=gen, dtype=F64)
    b = float(a @ (0.09 * u / max(float((G @ u).abs().max()), 0.09 * float(u.norm()))))  # ‖x₁‖ <= 1; (a plane
    # drawn at random can miss the polytope: seen)

    x = torch.zeros(n, dtype=F64, requires_grad=True)
    cons = [co.ineq(lambda: G @ x - h, name="linear"), co.ineq(lambda: (x ** 2).sum() - 4, name="ball")]
    if with_eq:
        cons.append(co.eq(lambda: a @ x - b, name="plane"))
    res = co.minimize(lambda: 0.5 * x @ P @ x + q @ x, [x], cons, max_iter=500)

    Pn, qn, Gn, hn, an = (t.numpy() for t in (P, q, G, h, a))
    scipy_cons = [{"type": "ineq", "fun": lambda z: hn - Gn @ z, "jac": lambda z: -Gn},
                  {"type": "ineq", "fun": lambda z: 4 - z @ z, "jac": lambda z: -2 * z}]
    if with_eq:
        scipy_cons.append({"type": "eq", "fun": lambda z: an @ z - b, "jac": lambda z: an[None]})
    objective = (lambda z: 0.5 * z @ Pn @ z + qn @ z)

    def oracle_violation(z):
        parts = [max(0.0, -float(min(con["fun"](z).min(), 0.0))) for con in scipy_cons if con["type"] == "ineq"]
        parts += [float(abs(con["fun"](z))) for con in scipy_cons if con["type"] == "eq"]
        return max(parts)

    # SLSQP's flag is not the test: it sometimes reports "Positive directional derivative" after reaching the
    # optimum. Its point is used when it is feasible; otherwise SciPy's interior point method, started with a
    # small barrier parameter so that it does not stop on a barrier subproblem.
    ref = optimize.minimize(objective, torch.zeros(n, dtype=F64).numpy(), jac=lambda z: Pn @ z + qn,
                            constraints=scipy_cons, method="SLSQP", options={"ftol": 1e-12, "maxiter": 1000})
    if oracle_violation(ref.x) > 1e-7:
        ref = optimize.minimize(objective, torch.zeros(n, dtype=F64).numpy(), jac=lambda z: Pn @ z + qn,
                                hess=lambda z: Pn, constraints=scipy_cons, method="trust-constr",
                                options={"gtol": 1e-12, "xtol": 1e-14, "barrier_tol": 1e-12,
                                         "initial_barrier_parameter": 1e-8, "maxiter": 5000})
    assert oracle_violation(ref.x) <= 1e-7, ref.message
    assert res.success, res.certificate
    assert res.violation <= 1e-8
    assert abs(res.fun - ref.fun) <= 1e-6 * max(1.0, abs(ref.fun))
    assert float((x.detach() - torch.from_numpy(ref.x)).abs().max()) <= 1e-4


# ------------------------------------------------------------------------------------------------ scale
def _bounded_problem(x):
    """min Σ (x − t)⁴ + ‖x − t‖²  s.t.  ‖x‖² <= 3 and a box (one side unbounded in one entry)."""
    t = torch.tensor([2.0, -1.0, 0.5, 1.5, -2.0], dtype=F64)
    lower = torch.tensor([-0.5, -0.5, float("-inf"), -0.5, -0.5], dtype=F64)
    box = co.Box(x, lower=lower, upper=1.0)
    return (lambda: ((x - t) ** 4).sum() + ((x - t) ** 2).sum()), box


@pytest.mark.parametrize("memory", [None, 3])
def test_box_rows_by_column_give_the_iterates_of_the_dense_rows(memory):
    # the same box as bound rows (never formed) and as an ordinary constraint (rows ±e_i by autograd)
    paths = []
    for structured in (True, False):
        x = torch.full((5,), 0.1, dtype=F64, requires_grad=True)
        f, box = _bounded_problem(x)
        rows = box if structured else co.ineq(box._rows, name="box0")
        opt = co.ConstrainedSQP([x], [co.ineq(lambda: (x ** 2).sum() - 3, name="ball"), rows], memory=memory)

        def closure():
            opt.zero_grad()
            loss = f()
            loss.backward()
            return loss
        path = []
        for _ in range(40):
            opt.step(closure)
            path.append(x.detach().clone())
        assert opt.certificate.converged
        paths.append(torch.stack(path))
    assert float((paths[0] - paths[1]).abs().max()) <= 1e-12


def test_box_on_a_large_parameter_never_forms_its_rows(monkeypatch):
    """min ½‖x − t‖² s.t. Σx = 0 and 0 <= x_i <= 1 for i < 150, n = 200 000: x_i = clip(t_i − ν) on the box,
    t_i − ν elsewhere. The box's 300 rows as dense rows would be a 300 × 200 000 matrix."""
    from constrained_optim.constraints import ConstraintValues
    from constrained_optim.jacobian import Jacobian

    def refuse(*args, **kwargs):
        raise AssertionError("a dense Jacobian was formed")
    monkeypatch.setattr(Jacobian, "to_dense", refuse)
    monkeypatch.setattr(ConstraintValues, "jacobian", refuse)
    differentiated = []
    block_rows = ConstraintValues._block_rows
    monkeypatch.setattr(ConstraintValues, "_block_rows",
                        lambda self, value: differentiated.append(value.numel()) or block_rows(self, value))

    n, k = 200_000, 150
    t = 2 * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    lower = torch.full((n,), float("-inf"), dtype=F64)
    upper = torch.full((n,), float("inf"), dtype=F64)
    lower[:k], upper[:k] = 0.0, 1.0
    res = co.minimize(lambda: 0.5 * ((x - t) ** 2).sum(), [x], [co.eq(lambda: x.sum(), name="sum"),
                      co.Box(x, lower=lower, upper=upper)], memory=5, max_iter=50)
    assert res.success and set(differentiated) == {1}

    def solution(nu):
        return torch.cat([(t[:k] - nu).clamp(0, 1), t[k:] - nu])
    low, high = float(t.min()) - 1, float(t.max()) + 1        # Σ solution(ν) decreases in ν
    for _ in range(100):
        nu = 0.5 * (low + high)
        low, high = (nu, high) if float(solution(nu).sum()) > 0 else (low, nu)
    assert float((x.detach() - solution(0.5 * (low + high))).abs().max()) <= 1e-7


def test_many_constraint_rows_warn_once_naming_the_largest():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    offsets = torch.arange(1001, dtype=F64)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 10 - offsets, name="many"),
                                  co.ineq(lambda: x[0] - 5, name="one")])

    def closure():
        opt.zero_grad()
        loss = ((x - 2) ** 2).sum()
        loss.backward()
        return loss
    with pytest.warns(UserWarning, match=r"1002 scalar constraint rows.*'many' \(1001 rows\).*fold='l2'"):
        opt.step(closure)
    with torch.no_grad():
        x += 0.1                                    # moved by hand: the next step restarts here, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)


def test_gradient_samples_fit_the_memory_budget():
    # samples · (m + 2) · n <= 2²⁴: with n = 300 000 and m = 1, 18 samples (not ngrad = 100)
    x = torch.zeros(300_000, dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1)])

    def closure():
        opt.zero_grad()
        loss = ((x - 1) ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    assert opt.state[x]["samples"].maxlen == 18


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-6), (torch.float32, 1e-4)])
def test_rows_of_linear_constraints_are_shared_between_points_without_changing_the_iterates(monkeypatch, dtype, tol):
    # L-BFGS at n = 300,000 with three linear rows (the same Jacobian block at every point) and a norm bound:
    # the shared block's J Jᵀ, J W and (J − J_prev)ᵀw are reused; the iterates are those of fresh products
    # (float32 rows: the products of the copying path, accumulated in float64)
    from constrained_optim.jacobian import Jacobian
    n = 300_000
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(n, generator=gen, dtype=F64).to(dtype)
    A = (torch.randn(3, n, generator=gen, dtype=F64) / n ** 0.5).to(dtype)
    b = A @ t - 0.5

    def run():
        x = torch.zeros(n, dtype=dtype, requires_grad=True)
        opt = co.ConstrainedSQP([x], [co.ineq(lambda: A @ x - b, name="linear"),
                                      co.ineq(lambda: x.dot(x) - 0.5 * n, name="norm")], memory=2)

        def closure():
            opt.zero_grad()
            loss = ((x - t) ** 2).mean() + 0.1 * ((x - t) ** 4).mean()
            loss.backward()
            return loss
        path = []
        for _ in range(8):      # rounding differences (1e-14) grow to ~1e-8 by step 7 on this problem
            opt.step(closure)
            path.append(x.detach().clone())
        return torch.stack(path), opt.certificate
    shared = []
    share = Jacobian.share_unchanged

    def spy(self, previous):
        share(self, previous)
        shared.append(list(self.shared))
    monkeypatch.setattr(Jacobian, "share_unchanged", spy)
    path, cert = run()
    assert shared and all(flags == [True, False] for flags in shared)
    monkeypatch.setattr(Jacobian, "share_unchanged", lambda self, previous: None)
    fresh_path, fresh_cert = run()
    assert float((path - fresh_path).abs().max()) <= tol
    assert cert.status == fresh_cert.status and abs(cert.objective - fresh_cert.objective) <= tol * 1e-4
    assert float((path[-1] - path[-2]).abs().max()) > 1e-3      # still moving: the products mattered


def _count_corrections(monkeypatch):
    calls = []
    correct = co.ConstrainedSQP._second_order_correction

    def spy(self, closure, point, linear, trial):
        out = correct(self, closure, point, linear, trial)
        calls.append(out is not None and self._phi(out, self._state["mu"]) <= self._phi(point, self._state["mu"]))
        return out
    monkeypatch.setattr(co.ConstrainedSQP, "_second_order_correction", spy)
    return calls


def test_second_order_corrections_remove_the_maratos_effect(monkeypatch):
    # Powell's example: min 2(x₁² + x₂² − 1) − x₁ s.t. x₁² + x₂² = 1 (x* = (1, 0)); near x* the full SQP step
    # raises the violation by second-order terms, and the correction is what lets it be taken
    calls = _count_corrections(monkeypatch)
    x = torch.tensor([math.cos(0.3), math.sin(0.3)], dtype=F64, requires_grad=True)
    res = _run(lambda x: 2 * ((x ** 2).sum() - 1) - x[0], x, [co.eq(lambda: (x ** 2).sum() - 1, name="circle")])
    assert res.status is co.Status.CONVERGED
    assert torch.allclose(x.detach(), torch.tensor([1.0, 0.0], dtype=F64), atol=1e-7)
    assert any(calls)                 # a correction was tried and taken


# Hock & Schittkowski 78: min x₁x₂x₃x₄x₅ s.t. Σxᵢ² = 10, x₂x₃ = 5x₄x₅, x₁³ + x₂³ = −1 (f* = −2.91970041); f is
# quintic and the constraints at most cubic, so φ = μf + v is unbounded below off the feasible set for every μ.
# From this start (the book's, perturbed) the first correction of the full step moved x to ‖x‖ ≈ 2e3, with
# f = −4.5e15 and violation 8e10: φ fell, and the run ended STALLED_INFEASIBLE at ‖c‖ ≈ 5e100
HS78_START = (-1.38772426, 0.86108374, 2.12542965, -1.11355392, -1.09052986)


def _hs78(x):
    return (x.prod(), torch.stack([(x ** 2).sum() - 10, x[1] * x[2] - 5 * x[3] * x[4], x[0] ** 3 + x[1] ** 3 + 1]))


def test_a_correction_that_raises_the_violation_is_not_taken():
    x = torch.tensor(HS78_START, dtype=F64, requires_grad=True)
    res = _run(lambda x: _hs78(x)[0], x, [co.eq(lambda: _hs78(x)[1], name="hs78")])
    assert res.status is co.Status.CONVERGED
    assert res.fun == pytest.approx(-2.919700410, abs=1e-8)
    assert res.violation <= 1e-8


def test_no_corrections_where_the_objective_itself_rejects_the_step(monkeypatch):
    # a kink of f (|·|) with a linear constraint: the full step keeps c on its linear model, so a correction
    # cannot help and is not tried (each try would cost an evaluation)
    calls = _count_corrections(monkeypatch)
    x = torch.tensor([0.9, -0.4, 0.3], dtype=F64, requires_grad=True)
    res = _run(lambda x: x.abs().sum() + 0.5 * (x ** 2).sum(), x, [co.eq(lambda: x.sum() - 1, name="sum")])
    assert calls == []
    assert abs(res.fun - (1 + 0.5 / 3)) <= 1e-7
