"""ConstrainedSQP as a torch.optim optimizer, its validation, and co.minimize (public API)."""
import math

import pytest
from conftest import require_qpth
import torch

import constrained_optim as co

F64 = torch.float64


def _regression(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(60, 6, generator=gen, dtype=dtype)
    w = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, -0.5]], dtype=dtype)
    y = X @ w.T + 0.3 + 0.01 * torch.randn(60, 1, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 1).to(dtype)
    return X, y, model


def _train(opt, closure, steps=200):
    for _ in range(steps):
        opt.step(closure)
        if opt.certificate.converged or opt.certificate.status.terminal:
            break
    return opt.certificate


def _ball_problem(dtype=F64):
    """min ‖x − a‖² + 0.1 Σx⁴  s.t.  Σx <= 1,  x₀ − x₁ = −0.2: a strictly convex problem, both active."""
    a = torch.tensor([1.0, 2.0, -0.5], dtype=dtype)
    x = torch.zeros(3, dtype=dtype, requires_grad=True)
    cons = [co.ineq(lambda: x.sum() - 1.0, name="budget"), co.eq(lambda: x[0] - x[1] + 0.2, name="link")]
    return x, a, cons


# -------------------------------------------------------------------------------------- training loop
def test_design_training_loop_converges():
    X, y, model = _regression(dtype=F64)
    constraints = [co.ineq(lambda: model.weight.norm() - 1.0, name="unit_norm"),
                   co.eq(lambda: model.bias.sum(), name="zero_bias")]
    opt = co.ConstrainedSQP(model.parameters(), constraints=constraints)
    assert opt.certificate.status is co.Status.IN_PROGRESS and not opt.certificate.converged

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(200):
        losses.append(float(opt.step(closure)))
        if opt.certificate.converged:
            break
    cert = opt.certificate
    assert cert.converged and cert.status is co.Status.CONVERGED and cert.kkt
    assert cert.iteration >= 1 and losses[-1] <= losses[0]
    assert abs(float(model.weight.norm()) - 1.0) <= 1e-4        # the ball is active at the optimum


def test_design_training_loop_float32_reaches_the_float64_answer():
    """float32 gradients have a rounding floor near 1e-5 (relative): the run must end at the float64
    solution, certified or honestly stalled, and a CONVERGED claim must satisfy the KKT tolerances."""
    answers = {}
    for dtype in (F64, torch.float32):
        X, y, model = _regression(dtype=F64)      # same data and start for both, then cast
        X, y, model = X.to(dtype), y.to(dtype), model.to(dtype)
        opt = co.ConstrainedSQP(model.parameters(), constraints=[
            co.ineq(lambda: model.weight.norm() - 1.0, name="unit_norm"),
            co.eq(lambda: model.bias.sum(), name="zero_bias")])

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), y)
            loss.backward()
            return loss
        cert = _train(opt, closure)
        assert cert.status in (co.Status.CONVERGED, co.Status.STALLED_FEASIBLE), cert
        assert cert.kkt == cert.converged and cert.feasible
        answers[dtype] = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).double()
    assert torch.allclose(answers[torch.float32], answers[F64], atol=1e-4)
    assert abs(float(model.bias.sum())) <= cert.tol_eq
    assert set(cert.multipliers) == {"unit_norm", "zero_bias"}
    assert float(cert.multipliers["unit_norm"]) > 0
    assert model.weight.dtype == torch.float32 and model.weight.is_leaf
    assert "CONVERGED" in str(cert)
    # a converged optimizer stays put
    x = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(x, model.parameters()))


def test_restarts_when_user_moves_parameters():
    x, a, cons = _ball_problem()
    opt = co.ConstrainedSQP([x], cons)

    def closure():
        opt.zero_grad()
        loss = ((x - a) ** 2).sum()
        loss.backward()
        return loss
    _train(opt, closure)
    assert opt.certificate.converged
    with torch.no_grad():
        x.fill_(5.0)          # moved by the user: the next step re-evaluates and certifies this point
    opt.step(closure)
    assert not opt.certificate.converged and opt.certificate.violation > 1
    assert _train(opt, closure).converged


# ---------------------------------------------------------------------------------- option validation
BAD_OPTIONS = [
    ("mu0", 0.0), ("mu0", -1.0), ("mu0", math.nan), ("mu0", math.inf), ("mu0", True),
    ("memory", 0), ("memory", -3), ("memory", 2.5), ("memory", True),
    ("tol_opt", 0.0), ("tol_opt", -1e-8), ("tol_ineq", 0.0), ("tol_eq", -1.0),
    ("c_v", 0.0), ("c_v", 1.0), ("c_mu", 0.0), ("c_mu", 1.0), ("c_mu", 1.5),
    ("c1", 0.0), ("c1", 1.0), ("c2", 1e-5), ("c2", 1.0),
    ("damping", 0.0), ("damping", 1.0),
    ("max_steering", 0), ("max_steering", 1.5), ("max_ls_evals", 0),
    ("ngrad", 0), ("ngrad", -1), ("sample_radius", 0.0), ("sample_radius", -1e-3),
    ("qp_solver", "x"), ("qp_solver", "QPTH"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_invalid_option_raises_value_error_naming_it(name, value):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        co.ConstrainedSQP([x], [], **{name: value})


def test_empty_constraint_list_raises():
    x = torch.zeros(2, requires_grad=True)
    for empty in ([], (), None):
        with pytest.raises(ValueError, match="no constraints"):
            co.ConstrainedSQP([x], empty)
    with pytest.raises(ValueError, match="no constraints"):
        co.minimize(lambda: (x ** 2).sum(), [x], [])


def test_valid_options_accepted():
    x = torch.zeros(2, requires_grad=True)
    co.ConstrainedSQP([x], [co.ineq(lambda: x.sum())], mu0=10, memory=3, tol_opt=1e-6, tol_ineq=1e-7, tol_eq=1e-7, c_v=0.5, c_mu=0.5,
                      max_steering=3, c1=0.1, c2=0.9, max_ls_evals=5, ngrad=4, sample_radius=1e-6,
                      damping=0.2, qp_solver="builtin", seed=3)


def test_mixed_dtype_params_raise_type_error():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match="dtype"):
        co.ConstrainedSQP([a, b])


def test_bad_constraint_list_raises_type_error():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="co.ineq"):
        co.ConstrainedSQP([x], [lambda: x.sum()])


# ------------------------------------------------------------------------------------- closure errors
def _opt(dtype=F64):
    x = torch.ones(3, dtype=dtype, requires_grad=True)
    return x, co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1.0)])


def test_step_without_closure_raises():
    x, opt = _opt()
    for call in (lambda: opt.step(None), lambda: opt.step()):       # step() is what GradScaler.step calls
        with pytest.raises(ValueError, match="closure.*AMP"):
            call()


def test_closure_returning_non_scalar_raises():
    x, opt = _opt()

    def closure():
        opt.zero_grad()
        loss = x ** 2
        loss.sum().backward()
        return loss
    with pytest.raises(ValueError, match="scalar"):
        opt.step(closure)


def test_closure_returning_float_raises():
    x, opt = _opt()

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return float(loss)
    with pytest.raises(TypeError, match="float"):
        opt.step(closure)


def test_closure_forgetting_backward_raises_clear_error():
    x, opt = _opt()

    def closure():
        opt.zero_grad()
        return (x ** 2).sum()
    with pytest.raises(ValueError, match=r"backward\(\)"):
        opt.step(closure)


def test_constraint_not_depending_on_params_raises():
    x = torch.ones(3, dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: torch.tensor(1.0, dtype=F64), name="const")])

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss
    with pytest.raises(ValueError, match="'const'.*does not depend"):
        opt.step(closure)


def test_nan_objective_at_start_raises():
    x = torch.full((3,), -1.0, dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x - 5.0)])

    def closure():
        opt.zero_grad()
        loss = torch.log(x).sum()
        loss.backward()
        return loss
    with pytest.raises(ValueError, match="not finite"):
        opt.step(closure)


def test_parameters_never_nan_after_nan_trial_points():
    # f(x) = Σ x log x + 10 x is NaN for x < 0; from x = 1 the first SQP step (d ≈ -10) lands at x < 0
    x = torch.ones(3, dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: 0.1 - x, name="lower")])
    seen_nan = []

    def closure():
        opt.zero_grad()
        loss = (x * torch.log(x)).sum() + 10.0 * x.sum()
        seen_nan.append(bool(torch.isnan(loss)))
        loss.backward()
        return loss
    for _ in range(100):
        loss = opt.step(closure)
        assert bool(torch.isfinite(x).all()), x
        assert math.isfinite(float(loss))
        if opt.certificate.converged:
            break
    assert any(seen_nan), "the test should exercise NaN trial points"
    assert opt.certificate.converged
    assert torch.allclose(x.detach(), torch.full((3,), 0.1, dtype=F64), atol=1e-8)


# ------------------------------------------------------------------------------------------ minimize
def test_minimize_result_fields():
    x, a, cons = _ball_problem()
    res = co.minimize(lambda: ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum(), [x], cons, max_iter=100)
    assert isinstance(res, co.OptimizeResult)
    assert res.success is True and res.status is co.Status.CONVERGED
    assert isinstance(res.message, str) and res.message.startswith("converged")
    assert isinstance(res.fun, float) and math.isclose(res.fun, float(((x - a) ** 2).sum() + 0.1 * (x ** 4).sum()),
                                                       rel_tol=1e-12)
    assert isinstance(res.nit, int) and 1 <= res.nit <= 100
    assert isinstance(res.nfev, int) and res.nfev >= res.nit + 1
    assert res.violation <= 1e-8 and res.stationarity <= 1e-8
    assert set(res.multipliers) == {"budget", "link"}
    assert float(res.multipliers["budget"]) > 0
    assert isinstance(res.history, list) and len(res.history) == res.nit + 1
    assert res.history[0]["iteration"] == 0 and res.history[-1]["iteration"] == res.nit
    assert {"fun", "violation", "stationarity", "penalty", "nfev", "time"} <= set(res.history[0])
    assert isinstance(res.x, list) and len(res.x) == 1 and torch.equal(res.x[0], x.detach())
    assert not res.x[0].requires_grad
    assert res.returned == "last" and res.certificate.converged
    assert res["fun"] == res.fun
    with pytest.raises(AttributeError):
        res.no_such_field
    # KKT by hand: ∇f + λ_b (1,1,1) + λ_l (1,-1,0) = 0
    xs = x.detach()
    grad = 2 * (xs - a) + 0.4 * xs ** 3
    lam_b, lam_l = float(res.multipliers["budget"]), float(res.multipliers["link"])
    assert torch.allclose(grad + lam_b * torch.ones(3, dtype=F64) + lam_l * torch.tensor([1.0, -1.0, 0.0], dtype=F64),
                          torch.zeros(3, dtype=F64), atol=1e-6)


def test_minimize_max_iter_status():
    x, a, cons = _ball_problem()
    res = co.minimize(lambda: ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum(), [x], cons, max_iter=1)
    assert res.status is co.Status.MAX_ITER and not res.success and res.nit == 1


def test_minimize_callback_stops():
    x, a, cons = _ball_problem()
    seen = []
    res = co.minimize(lambda: ((x - a) ** 2).sum(), [x], cons,
                      callback=lambda cert: seen.append(cert.iteration) or True)
    assert seen == [1] and res.status is co.Status.CALLBACK and not res.success


def test_minimize_bad_arguments():
    x, a, cons = _ball_problem()
    with pytest.raises(ValueError, match="method"):
        co.minimize(lambda: (x ** 2).sum(), [x], method="newton")
    with pytest.raises(ValueError, match="max_iter"):
        co.minimize(lambda: (x ** 2).sum(), [x], max_iter=-1)


def test_minimize_hs071():
    x = torch.tensor([1.0, 5.0, 5.0, 1.0], dtype=F64, requires_grad=True)
    cons = [co.ineq(lambda: 25.0 - x.prod(), name="product"), co.eq(lambda: (x ** 2).sum() - 40.0, name="sphere"),
            co.ineq(lambda: 1.0 - x, name="lower"), co.ineq(lambda: x - 5.0, name="upper")]
    res = co.minimize(lambda: x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2], [x], cons, max_iter=200)
    assert res.success
    assert abs(res.fun - 17.0140172891564) <= 1e-6
    assert torch.allclose(x.detach(), torch.tensor([1.0, 4.74299963, 3.82114998, 1.37940829], dtype=F64), atol=1e-5)


def test_minimize_progress_bar(capsys):
    pytest.importorskip("tqdm")
    x, a, cons = _ball_problem()
    res = co.minimize(lambda: ((x - a) ** 2).sum(), [x], cons, progress=True)
    assert res.success
    err = capsys.readouterr().err
    assert "minimize" in err


# ------------------------------------------------------------------------------ dtypes and L-BFGS
def test_float32_parameters():
    x, a, cons = _ball_problem(dtype=torch.float32)
    opt = co.ConstrainedSQP([x], cons)

    def closure():
        opt.zero_grad()
        loss = ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum()
        loss.backward()
        return loss
    cert = _train(opt, closure)
    assert cert.converged
    assert x.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in cert.multipliers.values())
    reference, _, cons64 = _ball_problem()
    co.minimize(lambda: ((reference - a.double()) ** 2).sum() + 0.1 * (reference ** 4).sum(), [reference], cons64)
    # float32 default tol_opt = 1000 eps ≈ 1.2e-4 (relative stationarity): x is accurate to about that
    assert torch.allclose(x.detach().double(), reference.detach(), atol=1e-3)


def test_lbfgs_memory():
    X, y, model = _regression(dtype=F64)
    constraints = [co.ineq(lambda: model.weight.norm() - 1.0, name="unit_norm"),
                   co.eq(lambda: model.bias.sum(), name="zero_bias")]
    results = {}
    for memory in (None, 5):
        with torch.no_grad():
            model.weight.fill_(0.1)
            model.bias.fill_(0.0)
        res = co.minimize(lambda: torch.nn.functional.mse_loss(model(X), y), model.parameters(), constraints,
                          memory=memory, max_iter=300)
        assert res.success, (memory, res)
        results[memory] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(results[None], results[5], atol=1e-6)


# ------------------------------------------------------------------------------- scale invariance
def _certify_or_solve(scale, start, steps):
    a = torch.tensor([1.0, 2.0, -0.5], dtype=F64)
    x = start.clone().requires_grad_(True)
    cons = [co.ineq(lambda: x.sum() - 1.0, name="budget"), co.eq(lambda: x[0] - x[1] + 0.2, name="link")]
    opt = co.ConstrainedSQP([x], cons)

    def closure():
        opt.zero_grad()
        loss = scale * (((x - a) ** 2).sum() + 0.1 * (x ** 4).sum())
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
        if opt.certificate.converged or opt.certificate.status.terminal:
            break
    return x.detach(), opt.certificate


SCALES = (1e-6, 1.0, 1e6)


def test_certificate_invariant_to_objective_scale_at_the_solution():
    runs = {s: _certify_or_solve(s, torch.zeros(3, dtype=F64), steps=100) for s in SCALES}
    for s, (x, cert) in runs.items():
        assert cert.converged, (s, cert)
        assert torch.allclose(x, runs[1.0][0], atol=1e-6, rtol=0), s
        assert math.isclose(float(cert.multipliers["budget"]), s * float(runs[1.0][1].multipliers["budget"]),
                            rel_tol=1e-5)


@pytest.mark.parametrize("start", [[0.2, 0.4, 0.1],     # feasible, not stationary
                                   [0.0, 0.2, 0.0],     # feasible, not stationary, inequality inactive
                                   [0.9, 1.1, -0.99]])  # near the solution but not on it
def test_certificate_invariant_to_objective_scale_at_a_nonoptimal_point(start):
    start = torch.tensor(start, dtype=F64)
    certs = {s: _certify_or_solve(s, start, steps=1)[1] for s in SCALES}
    for s, cert in certs.items():
        assert cert.iteration == 0          # the first step only evaluates and certifies the start
        assert not cert.converged and not cert.kkt, (s, cert)
        ref = certs[1.0]
        assert math.isclose(cert.stationarity, ref.stationarity, rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(cert.complementarity, ref.complementarity, rel_tol=1e-6, abs_tol=1e-12)
        assert cert.violation == ref.violation


@pytest.mark.qpth
def test_qpth_backend():
    require_qpth()
    x, a, cons = _ball_problem()
    res = co.minimize(lambda: ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum(), [x], cons, qp_solver="qpth")
    assert res.success
    reference, _, cons_ref = _ball_problem()
    co.minimize(lambda: ((reference - a) ** 2).sum() + 0.1 * (reference ** 4).sum(), [reference], cons_ref)
    assert torch.allclose(x.detach(), reference.detach(), atol=1e-7)
