"""Penalty (constrained_optim/penalty.py) and co.minimize(method="penalty").

The quadratic penalty's minimizer violates an active constraint by ≈ |λ*|/ρ; the ℓ1 penalty is exact
once ρ > |λ*|. Both are checked against closed forms.
"""
import math

import pytest
import torch

import constrained_optim as co
import problems
from wrapped_helpers import A3, lbfgs_inner as _lbfgs, make_closure as _closure, qp3 as _qp3, qp3_reference as _qp3_reference

F64, F32 = torch.float64, torch.float32


# ------------------------------------------------------------------------------- 1. known optima
@pytest.mark.parametrize("name", ["hs035", "hs043", "hs076", "cvx_ball_n10", "eqqp_n5_q2"])
def test_quadratic_penalty_reaches_known_optima(name):
    prob = problems.get_problem(name)
    x, objective, cons = problems.make_torch_problem(prob)
    res = co.minimize(objective, [x], cons, method="penalty", max_iter=100)
    assert res.violation <= 1e-6 and problems.violation(prob, x) <= 1e-6
    assert problems.rel_error(prob, res.fun) <= 1e-5, (res.fun, prob.f_opt)
    assert res.success and res.returned == "last", res
    assert res.history[-1]["penalty"] > 1.0          # the penalty had to grow to get there


def test_quadratic_penalty_projection_onto_a_ball():
    a = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)
    r = 1.5
    x = torch.zeros(4, dtype=F64, requires_grad=True)
    res = co.minimize(lambda: ((x - a) ** 2).sum(), [x], [co.ineq(lambda: x @ x - r ** 2, name="ball")],
                      method="penalty")
    x_star = r * a / a.norm()
    assert res.success and res.violation <= 1e-6
    assert abs(res.fun - float(((x_star - a) ** 2).sum())) <= 1e-5 * float(((x_star - a) ** 2).sum())
    assert torch.allclose(x.detach(), x_star, atol=1e-5)
    # the penalty's multiplier estimate ρ max(0, c) approaches λ* = (‖a‖ − r)/r
    lam_star = float((a.norm() - r) / r)
    assert abs(float(res.multipliers["ball"]) - lam_star) <= 1e-4 * lam_star


# --------------------------------------------------------------- 2. the documented 1/ρ behaviour
def _one_d(kind, rho, optimizer=_lbfgs, steps=5, **options):
    """min (x − 2)²  s.t.  x <= 1:  x* = 1, λ* = 2."""
    x = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.ineq(lambda: x - 1.0, name="c")], kind=kind, optimizer=optimizer,
                     schedule=lambda k: rho, **options)
    closure = _closure(opt, lambda: ((x - 2.0) ** 2).sum())
    return x, opt, closure


@pytest.mark.parametrize("rho", [0.5, 1.0, 10.0, 100.0, 1e4, 1e6])
def test_quadratic_penalty_minimizer_violates_by_lambda_over_rho(rho):
    # M(x) = (x − 2)² + ρ/2 max(0, x − 1)²;  for x > 1: 2(x − 2) + ρ(x − 1) = 0  ⇒  x(ρ) = (4 + ρ)/(2 + ρ)
    x, opt, closure = _one_d("quadratic", rho)
    for _ in range(5):
        opt.step(closure)
    x_rho = (4 + rho) / (2 + rho)
    assert float(x.detach()) == pytest.approx(x_rho, rel=1e-12, abs=1e-14)
    violation = float(x.detach()) - 1.0          # = 2/(2 + ρ) ≈ λ*/ρ
    assert violation == pytest.approx(2.0 / (2.0 + rho), rel=1e-8)
    assert rho * violation == pytest.approx(2.0, rel=3.0 / rho)    # ρ·violation → λ* = 2
    opt.step(closure)
    cert = opt.certificate
    assert cert.penalty == rho
    assert float(cert.multipliers["c"]) == pytest.approx(rho * violation, rel=1e-8)   # w = ρ max(0, c)


def test_quadratic_penalty_multiplier_estimates_converge_like_one_over_rho():
    x_ref, ref = _qp3_reference()
    lam = {k: float(v) for k, v in ref.multipliers.items()}
    errors = []
    for rho in (1e2, 1e3, 1e4):
        x, objective, cons = _qp3()
        opt = co.Penalty([x], cons, optimizer=_lbfgs, schedule=lambda k: rho)
        closure = _closure(opt, objective)
        for _ in range(4):
            opt.step(closure)
        with torch.no_grad():
            c_budget, c_link = float(x.sum() - 1.0), float(x[0] - x[1] + 0.2)
        assert c_budget > 0 and abs(c_link) > 0                  # infeasible for every finite ρ
        err = max(abs(rho * c_budget - lam["budget"]), abs(rho * c_link - lam["link"]))
        assert err <= 3.0 / rho, (rho, err)
        errors.append(err)
    assert errors[0] > 5 * errors[1] > 25 * errors[2]


@pytest.mark.parametrize("rho", [2.5, 5.0, 50.0])
def test_l1_penalty_is_exact_above_the_multiplier(rho):
    x, opt, closure = _one_d("l1", rho)
    for _ in range(5):
        opt.step(closure)
    assert abs(float(x.detach()) - 1.0) <= 1e-6


@pytest.mark.parametrize("rho", [2.5, 10.0])
def test_l1_penalty_is_exact_with_sgd_and_a_decaying_step(rho):
    x, opt, closure = _one_d("l1", rho, optimizer=torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    for _ in range(1000):
        opt.step(closure)
        sched.step()
    assert abs(float(x.detach()) - 1.0) <= 1e-6


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.5])
def test_l1_penalty_is_not_exact_below_the_multiplier(rho):
    # for ρ < λ* = 2: M'(x) = 2(x − 2) + ρ = 0 at x = 2 − ρ/2 > 1
    x, opt, closure = _one_d("l1", rho)
    for _ in range(5):
        opt.step(closure)
    assert float(x.detach()) == pytest.approx(2.0 - rho / 2, abs=1e-8)
    assert float(x.detach()) - 1.0 >= 0.2


# --------------------------------------------------------------------------------- 3. schedule
def test_schedule_is_called_with_the_step_count_and_used():
    calls = []

    def schedule(k):
        calls.append(k)
        return 10.0 * k
    x = torch.tensor([2.0, 2.0], dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.eq(lambda: x.sum() - 1.0, name="sum")], optimizer=torch.optim.SGD, lr=1e-3,
                     schedule=schedule)
    for k in range(1, 6):
        xk = x.detach().clone()
        opt.zero_grad()
        (x ** 2).sum().backward()
        expected_grad = 2 * xk + 10.0 * k * float(xk.sum() - 1.0)      # ∇f + ρ_k c ∇c
        opt.step()
        assert calls == list(range(1, k + 1))
        assert opt.certificate.penalty == 10.0 * k
        assert torch.allclose(x.grad, expected_grad, rtol=1e-14, atol=0)
        assert torch.allclose(x.detach(), xk - 1e-3 * expected_grad, rtol=1e-14, atol=0)


def test_schedule_is_called_once_per_step_with_lbfgs():
    calls = []
    x = torch.tensor([2.0, 2.0], dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.eq(lambda: x.sum() - 1.0)], optimizer=_lbfgs,
                     schedule=lambda k: calls.append(k) or 100.0)
    closure = _closure(opt, lambda: (x ** 2).sum())
    for _ in range(3):
        opt.step(closure)
    assert calls == [1, 2, 3]
    assert opt.nfev > 3                       # LBFGS evaluates several points per step, all at ρ_k


@pytest.mark.parametrize("bad,error", [(lambda k: 0.0, ValueError), (lambda k: -1.0, ValueError),
                                       (lambda k: math.nan, ValueError), (lambda k: math.inf, ValueError)])
def test_schedule_returning_a_bad_penalty_raises(bad, error):
    x = torch.ones(2, dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.eq(lambda: x.sum())], schedule=bad)
    with pytest.raises(error, match="schedule"):
        opt.step(_closure(opt, lambda: (x ** 2).sum()))


def test_schedule_must_be_callable():
    x = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match="schedule"):
        co.Penalty([x], [co.eq(lambda: x.sum())], schedule=10.0)


# ------------------------------------------------------------------------------ adaptive growth
def test_adaptive_growth_when_the_violation_stalls():
    x = torch.tensor([3.0, 3.0], dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.eq(lambda: x.sum() - 1.0)], optimizer=torch.optim.SGD, lr=1e-14, update_every=3,
                     penalty_growth=10.0, max_penalty=5e3)
    rhos = []
    for _ in range(30):
        opt.zero_grad()
        (x ** 2).sum().backward()
        opt.step()
        rhos.append(opt.certificate.penalty)
    assert all(b >= a for a, b in zip(rhos, rhos[1:]))
    for k, (a, b) in enumerate(zip(rhos, rhos[1:]), start=2):
        if b != a:
            assert k % 3 == 0 and (b == pytest.approx(10 * a) or b == 5e3), (k, rhos)
    assert max(rhos) == 5e3 and {1.0, 10.0, 100.0, 1000.0} <= set(rhos)


def test_no_growth_when_feasible():
    x = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    opt = co.Penalty([x], [co.ineq(lambda: x.sum() - 1.0)], lr=1e-2, update_every=2)
    for _ in range(20):
        opt.zero_grad()
        ((x + 0.1) ** 2).sum().backward()
        opt.step()
        assert opt.certificate.penalty == 1.0


def test_defaults_with_adam_reach_the_optimum():
    """Penalty's defaults (Adam at its default lr, the adaptive rule) on a 3-variable convex problem: the
    quadratic penalty needs ρ ≈ |λ*|/violation, so 1e-3 feasibility and 1e-2 accuracy are fair targets."""
    x_ref, ref = _qp3_reference()
    x, objective, cons = _qp3()
    opt = co.Penalty([x], cons)
    for _ in range(5000):
        opt.zero_grad()
        objective().backward()
        opt.step()
    assert opt.certificate.violation <= 1e-3
    assert torch.allclose(x.detach(), x_ref, atol=1e-2), (x, x_ref, opt.certificate.penalty)


# ---------------------------------------------------------------------------- kind and options
def test_kind_validation():
    x = torch.ones(2, dtype=F64, requires_grad=True)
    for bad in ("l2", "L1", "exact", None, 1):
        with pytest.raises(ValueError, match="kind"):
            co.Penalty([x], [co.eq(lambda: x.sum())], kind=bad)
    for good in ("quadratic", "l1"):
        assert co.Penalty([x], [co.eq(lambda: x.sum())], kind=good).defaults["kind"] == good


def test_l1_gradient_weights():
    """ℓ1: w = ρ [1(c_I > 0); sign(c_E)]; a satisfied inequality contributes nothing."""
    x = torch.tensor([2.0, -1.0], dtype=F64, requires_grad=True)
    cons = [co.ineq(lambda: x[0] - 1.0, name="violated"), co.ineq(lambda: x[1], name="satisfied"),
            co.eq(lambda: x[0] + 3 * x[1] + 0.5, name="eq")]      # c_eq = −0.5
    opt = co.Penalty([x], cons, kind="l1", optimizer=torch.optim.SGD, lr=1e-12, schedule=lambda k: 3.0)
    opt.step(_closure(opt, lambda: x.sum() * 0.0 + (x ** 2).sum(), backward=False))
    expected = torch.tensor([4.0, -2.0], dtype=F64) + 3.0 * torch.tensor([1.0, 0.0], dtype=F64) \
        - 3.0 * torch.tensor([1.0, 3.0], dtype=F64)
    assert torch.allclose(x.grad, expected, rtol=1e-14, atol=0)


BAD_OPTIONS = [("penalty", 0.0), ("penalty", -2.0), ("penalty", math.inf), ("penalty_growth", 0.9),
               ("penalty_growth", math.nan), ("max_penalty", 0.1), ("violation_decrease", 0.0),
               ("violation_decrease", 2.0), ("update_every", 0), ("update_every", 1.5), ("lr", 0.0),
               ("tol_opt", -1.0), ("tol_ineq", 0.0), ("tol_eq", math.nan)]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_invalid_option_raises_value_error_naming_it(name, value):
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        co.Penalty([x], [co.ineq(lambda: x.sum())], **{name: value})


def test_no_constraints_and_bad_optimizer():
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="no constraints"):
        co.Penalty([x], [])
    with pytest.raises(TypeError):
        co.Penalty([x], [co.ineq(lambda: x.sum())], optimizer=dict)
    with pytest.raises(ValueError, match="closure"):
        opt = co.Penalty([x], [co.ineq(lambda: x.sum())], optimizer=torch.optim.LBFGS)
        (x ** 2).sum().backward()
        opt.step()


def test_nan_constraint_skips_the_step():
    x = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    bad = {"on": False}
    opt = co.Penalty([x], [co.eq(lambda: (x.sum() - 1.0) * (math.nan if bad["on"] else 1.0))], lr=0.1)
    closure = _closure(opt, lambda: (x ** 2).sum())
    opt.step(closure)
    x0, rho0 = x.detach().clone(), opt.certificate.penalty
    bad["on"] = True
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    assert torch.equal(x.detach(), x0) and opt.certificate.penalty == rho0


# ------------------------------------------------------------------------------- state_dict
def _resume(inner, x0):
    x = x0.clone().requires_grad_(True)
    cons = [co.ineq(lambda: x.sum() - 1.0, name="budget"), co.eq(lambda: x[0] - x[1] + 0.2, name="link")]
    if inner == "adam":
        opt = co.Penalty([x], cons, lr=1e-2, update_every=3)
    elif inner == "lbfgs":
        opt = co.Penalty([x], cons, optimizer=_lbfgs, update_every=1)
    else:
        opt = co.Penalty([x], cons, kind="l1", optimizer=torch.optim.SGD, lr=1e-2, momentum=0.9,
                         schedule=lambda k: 1.0 + 0.5 * k)
    return x, opt, _closure(opt, lambda: ((x - A3) ** 2).sum() + 0.1 * (x ** 4).sum())


@pytest.mark.parametrize("inner", ["adam", "lbfgs", "sgd_l1_schedule"])
def test_state_dict_round_trip_is_exact(inner, tmp_path):
    start = torch.tensor([0.4, -0.2, 0.9], dtype=F64)
    k = 7 if inner != "lbfgs" else 3
    x_full, opt_full, closure_full = _resume(inner, start)
    for _ in range(2 * k):
        opt_full.step(closure_full)
    x1, opt1, closure1 = _resume(inner, start)
    for _ in range(k):
        opt1.step(closure1)
    torch.save({"x": x1.detach().clone(), "opt": opt1.state_dict()}, tmp_path / "penalty.pt")
    saved = torch.load(tmp_path / "penalty.pt", weights_only=False)
    assert "inner" in saved["opt"]
    x2, opt2, closure2 = _resume(inner, torch.zeros(3, dtype=F64))
    with torch.no_grad():
        x2.copy_(saved["x"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(k):
        opt2.step(closure2)
    assert torch.equal(x2.detach(), x_full.detach())
    assert opt2.certificate.penalty == opt_full.certificate.penalty
    for name, w in opt_full.certificate.multipliers.items():
        assert torch.equal(opt2.certificate.multipliers[name], w)


# ------------------------------------------------------------------------------------ float32
def test_float32_parameters():
    x_ref, _ = _qp3_reference()
    x, objective, cons = _qp3(dtype=F32)
    res = co.minimize(objective, [x], cons, method="penalty", max_iter=60)
    assert x.dtype == F32 and all(v.dtype == F32 for v in res.multipliers.values())
    assert res.violation <= 2e-5                     # float32 tolerance max(1e-6, 100 eps) = 1.2e-5
    assert torch.allclose(x.detach().double(), x_ref, atol=1e-4)
    x, objective, cons = _qp3(dtype=F32)
    opt = co.Penalty([x], cons, optimizer=_lbfgs, schedule=lambda k: 1e3)
    closure = _closure(opt, objective)
    for _ in range(4):
        opt.step(closure)
    assert x.dtype == F32 and opt.certificate.multipliers["budget"].dtype == F32
    assert torch.allclose(x.detach().double(), x_ref, atol=2e-3)      # violation ≈ λ*/ρ ≈ 1e-3
