"""ProjectedGradient (constrained_optim/projected_gradient.py) and co.minimize(method="pgd").

Oracles are closed forms (clamp, radial scaling, a bisection for the ball-constrained QP and for the
ℓ1/simplex thresholds, the top-k eigenspace for Stiefel) or SciPy SLSQP; none uses the library's
projections.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize as scipy_minimize

import constrained_optim as co

F64 = torch.float64
N = 6


def _quadratic(seed=0, n=N, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=gen, dtype=F64)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=F64)
    q = scale * torch.randn(n, generator=gen, dtype=F64)
    return Q, q


Q, QV = _quadratic()
L_Q = float(torch.linalg.eigvalsh(Q).max())


def _bisect(fn, lo, hi, iters=200):
    """Root of a decreasing function fn on [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _threshold(v: torch.Tensor, r: float) -> float:
    """θ with Σ max(v − θ, 0) = r (by bisection)."""
    return _bisect(lambda t: float((v - t).clamp(min=0).sum()) - r, float(v.min()) - r, float(v.max()))


def _slsqp(fun, jac, x0, **kwargs):
    """SciPy SLSQP (a cross-check only: it may stop with status 8 at a vertex it has already reached)."""
    res = scipy_minimize(fun, x0, jac=jac, method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000}, **kwargs)
    return res.x


# ---------------------------------------------------------------------------- problem instances
# each case: (make params + set, objective(x), x_star, f_star); the objective is the QP ½xᵀQx + qᵀx unless
# a closed form needs another one
def _box_case():
    d = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5, 1.0], dtype=F64)
    a = torch.tensor([2.0, -3.0, 0.2, -0.1, 0.7, -0.4], dtype=F64)
    lo = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, -0.2], dtype=F64)
    hi = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.3], dtype=F64)
    x_star = torch.minimum(torch.maximum(a, lo), hi)
    return (lambda x: co.Box(x, lo, hi)), (lambda x: (d * (x - a) ** 2).sum()), x_star, float(2 * d.max())


def _ball2_case():
    r = 1.0
    x_free = torch.linalg.solve(Q, -QV)
    assert float(x_free.norm()) > r                         # the ball is active
    mu = _bisect(lambda m: float(torch.linalg.solve(Q + m * torch.eye(N, dtype=F64), -QV).norm()) - r, 0.0, 1e3)
    x_star = torch.linalg.solve(Q + mu * torch.eye(N, dtype=F64), -QV)
    return (lambda x: co.Ball(x, r)), (lambda x: 0.5 * x @ Q @ x + QV @ x), x_star, L_Q


Q_SPARSE, QV_SPARSE = _quadratic(scale=0.5)     # its simplex and ℓ1-ball solutions have 3 nonzeros
L_SPARSE = float(torch.linalg.eigvalsh(Q_SPARSE).max())


def _eq_qp(support, s, r):
    """min ½xᵀQx + qᵀx  s.t.  x_i = 0 off the support, sᵀx_S = r (the KKT linear system)."""
    idx = torch.tensor(support)
    k = len(support)
    K = torch.zeros(k + 1, k + 1, dtype=F64)
    K[:k, :k] = Q_SPARSE[idx][:, idx]
    K[:k, k] = s
    K[k, :k] = s
    sol = torch.linalg.solve(K, torch.cat([-QV_SPARSE[idx], torch.tensor([r], dtype=F64)]))
    x = torch.zeros(N, dtype=F64)
    x[idx] = sol[:k]
    return x


def _qp_value(x):
    return float(0.5 * x @ Q_SPARSE @ x + QV_SPARSE @ x)


def _enumerate(candidates):
    """The feasible candidate of lowest objective: the optimum when the optimum's active set is among them."""
    return min(candidates, key=_qp_value)


def _ball1_case():
    """Exact oracle: every support and sign pattern with ‖x‖₁ = r active, and the free minimizer."""
    r = 1.0
    candidates = []
    free = torch.linalg.solve(Q_SPARSE, -QV_SPARSE)
    if float(free.abs().sum()) <= r:
        candidates.append(free)
    for k in range(1, N + 1):
        for support in itertools.combinations(range(N), k):
            for signs in itertools.product([-1.0, 1.0], repeat=k):
                s = torch.tensor(signs, dtype=F64)
                x = _eq_qp(list(support), s, r)
                if bool((x[list(support)] * s >= 0).all()):
                    candidates.append(x)
    x_star = _enumerate(candidates)
    # cross-check with SciPy SLSQP on the split form x = u − v, u, v >= 0
    Qn, qn = Q_SPARSE.numpy(), QV_SPARSE.numpy()
    z = _slsqp(lambda z: 0.5 * (z[:N] - z[N:]) @ Qn @ (z[:N] - z[N:]) + qn @ (z[:N] - z[N:]),
               lambda z: np.concatenate([Qn @ (z[:N] - z[N:]) + qn, -(Qn @ (z[:N] - z[N:]) + qn)]),
               np.zeros(2 * N), bounds=[(0, None)] * (2 * N),
               constraints=[{"type": "ineq", "fun": lambda z: r - z.sum(), "jac": lambda z: -np.ones(2 * N)}])
    assert _qp_value(x_star) <= _qp_value(torch.from_numpy(z[:N] - z[N:])) + 1e-9
    assert int((x_star != 0).sum()) < N             # a sparse solution: the ℓ1 ball's nonsmooth points
    return (lambda x: co.Ball(x, r, p=1)), (lambda x: 0.5 * x @ Q_SPARSE @ x + QV_SPARSE @ x), x_star, L_SPARSE


def _simplex_case():
    """Exact oracle: every support with Σx = r and x_S from the KKT linear system."""
    r = 1.0
    candidates = []
    for k in range(1, N + 1):
        for support in itertools.combinations(range(N), k):
            x = _eq_qp(list(support), torch.ones(k, dtype=F64), r)
            if bool((x >= 0).all()):
                candidates.append(x)
    x_star = _enumerate(candidates)
    Qn, qn = Q_SPARSE.numpy(), QV_SPARSE.numpy()
    z = _slsqp(lambda y: 0.5 * y @ Qn @ y + qn @ y, lambda y: Qn @ y + qn, np.full(N, r / N),
               bounds=[(0, None)] * N,
               constraints=[{"type": "eq", "fun": lambda y: y.sum() - r, "jac": lambda y: np.ones((1, N))}])
    assert _qp_value(x_star) <= _qp_value(torch.from_numpy(z)) + 1e-9
    assert 1 < int((x_star > 0).sum()) < N
    return (lambda x: co.Simplex(x, r)), (lambda x: 0.5 * x @ Q_SPARSE @ x + QV_SPARSE @ x), x_star, L_SPARSE


def _sphere_case():
    r = 1.5
    a = torch.tensor([0.3, -2.0, 1.0, 0.5, 0.0, -0.7], dtype=F64)
    return (lambda x: co.Sphere(x, r)), (lambda x: ((x - a) ** 2).sum()), r * a / a.norm(), 2.0


CASES = {"box": _box_case, "ball2": _ball2_case, "ball1": _ball1_case, "simplex": _simplex_case,
         "sphere": _sphere_case}


def _start(kind):
    return torch.full((N,), 0.1, dtype=F64) if kind != "sphere" else torch.ones(N, dtype=F64)


def _stiefel_data(n=8, k=3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=gen, dtype=F64)
    A = (B + B.T) / 2
    w, U = torch.linalg.eigh(A)
    X0 = torch.randn(n, k, generator=gen, dtype=F64)
    return A, -float(w[-k:].sum()), U[:, -k:], X0, float(w.abs().max())


def _assert_stiefel_optimum(X, f, f_star, U_top, tol):
    k = X.shape[1]
    assert abs(f - f_star) <= tol * max(1.0, abs(f_star))
    assert torch.allclose(X.T @ X, torch.eye(k, dtype=F64), atol=1e-10)
    assert torch.allclose(X @ X.T, U_top @ U_top.T, atol=math.sqrt(tol))     # the top-k eigenspace


# ----------------------------------------------------------------------------- 1. known optima
@pytest.mark.parametrize("kind", list(CASES))
def test_minimize_pgd_reaches_the_known_optimum(kind):
    make_set, f, x_star, _ = CASES[kind]()
    x = _start(kind).requires_grad_(True)
    res = co.minimize(lambda: f(x), [x], [make_set(x)], method="pgd", max_iter=500)
    # the run stops at stationarity <= 1e-6 (relative to ‖∇f‖∞), so x is accurate to ~1e-6 / λ_min(Q)
    assert torch.allclose(x.detach(), x_star, atol=1e-5, rtol=0), (x, x_star)
    assert abs(res.fun - float(f(x_star))) <= 1e-8 * max(1.0, abs(float(f(x_star))))
    assert res.violation <= 1e-12
    assert res.success and res.status is co.Status.CONVERGED, res


def test_minimize_pgd_stiefel_trace():
    A, f_star, U_top, X0, _ = _stiefel_data()
    X = X0.clone().requires_grad_(True)
    res = co.minimize(lambda: -(X * (A @ X)).sum(), [X], [co.Stiefel(X)], method="pgd", max_iter=1000)
    assert res.success, res
    _assert_stiefel_optimum(X.detach(), res.fun, f_star, U_top, 1e-9)


@pytest.mark.parametrize("step", ["fixed", "apgd"])
@pytest.mark.parametrize("kind", list(CASES))
def test_projected_gradient_loop_reaches_the_known_optimum(kind, step):
    make_set, f, x_star, lipschitz = CASES[kind]()
    x = _start(kind).requires_grad_(True)
    steps = 1000
    extra = dict(apgd_steps=steps) if step == "apgd" else {}
    opt = co.ProjectedGradient([x], sets=[make_set(x)], lr=1.0 / lipschitz, step=step, **extra)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    assert torch.allclose(x.detach(), x_star, atol=1e-6, rtol=0), (x, x_star)
    assert float(f(x.detach())) <= float(f(x_star)) + 1e-8 * max(1.0, abs(float(f(x_star))))


@pytest.mark.parametrize("step", ["fixed", "apgd"])
def test_projected_gradient_loop_stiefel_trace(step):
    A, f_star, U_top, X0, top = _stiefel_data()
    X = X0.clone().requires_grad_(True)
    steps = 1000
    extra = dict(apgd_steps=steps) if step == "apgd" else {}
    opt = co.ProjectedGradient([X], [co.Stiefel(X)], lr=1.0 / (2 * top), step=step, **extra)

    def closure():
        opt.zero_grad()
        loss = -(X * (A @ X)).sum()
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    X = X.detach()
    _assert_stiefel_optimum(X, float(-(X * (A @ X)).sum()), f_star, U_top, 1e-9)


def test_step_without_closure_uses_existing_gradients():
    make_set, f, x_star, lipschitz = _box_case()
    x = _start("box").requires_grad_(True)
    opt = co.ProjectedGradient([x], [make_set(x)], lr=1.0 / lipschitz)
    for _ in range(500):
        opt.zero_grad()
        f(x).backward()
        assert opt.step() is None
    assert torch.allclose(x.detach(), x_star, atol=1e-10, rtol=0)


def test_fixed_step_is_projection_of_the_gradient_step():
    x = torch.tensor([0.6, -0.2, 0.4], dtype=F64, requires_grad=True)      # inside the ball
    g = torch.tensor([-3.0, 1.0, 0.5], dtype=F64)
    opt = co.ProjectedGradient([x], [co.Ball(x, 1.0)], lr=0.1)
    opt.zero_grad()
    (g @ x).backward()
    opt.step()
    y = torch.tensor([0.6, -0.2, 0.4], dtype=F64) - 0.1 * g
    assert float(y.norm()) > 1.0
    assert torch.allclose(x.detach(), y / y.norm(), atol=1e-15)


def test_free_parameters_take_plain_gradient_steps():
    x = torch.tensor([2.0, 2.0], dtype=F64, requires_grad=True)
    y = torch.tensor([2.0, 2.0], dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x, y], [co.Box(x, upper=1.0)], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum() + (y ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    assert torch.equal(x.detach(), torch.full((2,), 0.5, dtype=F64))    # start projected to 1, then 1 − 0.25·2
    assert torch.equal(y.detach(), torch.full((2,), 1.0, dtype=F64))    # 2 − 0.25·4, never projected


# ------------------------------------------------------------------ 2. inner optimizer + projection
def _in_set(kind, x, tol=1e-12):
    if kind == "box":
        return bool(((x >= -0.5 - tol) & (x <= 0.5 + tol)).all())
    if kind == "nonneg":
        return bool((x >= 0).all())
    if kind == "ball2":
        return float(x.norm()) <= 1.0 + tol
    if kind == "ballinf":
        return float(x.abs().max()) <= 1.0 + tol
    if kind == "ball1":
        return float(x.abs().sum()) <= 1.0 + tol
    if kind == "simplex":
        return bool((x >= 0).all()) and abs(float(x.sum()) - 1.0) <= tol
    if kind == "sphere":
        return abs(float(x.norm()) - 1.0) <= tol
    W = x.reshape(N // 2, 2)
    return bool(torch.allclose(W.T @ W, torch.eye(2, dtype=F64), atol=tol))


def _make_set(kind, x):
    return {"box": lambda: co.Box(x, -0.5, 0.5), "nonneg": lambda: co.NonNegative(x),
            "ball2": lambda: co.Ball(x, 1.0), "ballinf": lambda: co.Ball(x, 1.0, p="inf"),
            "ball1": lambda: co.Ball(x, 1.0, p=1), "simplex": lambda: co.Simplex(x, 1.0),
            "sphere": lambda: co.Sphere(x, 1.0), "stiefel": lambda: co.Stiefel(x)}[kind]()


INNER_KINDS = ["box", "nonneg", "ball2", "ballinf", "ball1", "simplex", "sphere", "stiefel"]


@pytest.mark.parametrize("kind", INNER_KINDS)
def test_adam_plus_projection_stays_in_the_set(kind):
    shape = (N // 2, 2) if kind == "stiefel" else (N,)
    x = (2.0 * torch.ones(shape, dtype=F64) + torch.arange(N, dtype=F64).reshape(shape)).requires_grad_(True)
    opt = co.ProjectedGradient([x], [_make_set(kind, x)], optimizer=torch.optim.Adam, lr=0.05)
    assert isinstance(opt._inner, torch.optim.Adam)

    def objective():
        return 0.5 * x.reshape(-1) @ Q @ x.reshape(-1) + QV @ x.reshape(-1)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = objective()
        loss.backward()
        opt.step()
        assert _in_set(kind, x.detach()), (kind, x)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[1]


def test_inner_optimizer_options_and_lr_scheduler():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], optimizer=torch.optim.SGD, lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    (-x.sum()).backward()
    opt.step()
    assert torch.allclose(x.detach(), torch.full((3,), 0.1, dtype=F64))
    sched.step()
    assert opt._inner.param_groups[0]["lr"] == 0.05 and opt._inner.param_groups[0]["momentum"] == 0.5
    opt.zero_grad()
    (-x.sum()).backward()
    opt.step()          # SGD with momentum 0.5: v = 0.5·1 + 1, x += 0.05·1.5
    assert torch.allclose(x.detach(), torch.full((3,), 0.1 + 0.075, dtype=F64))


# ------------------------------------------------------------------------------------ 3. errors
def test_function_constraints_are_refused_with_a_pointer():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    for kwargs in (dict(constraints=[co.ineq(lambda: x.sum() - 1.0)]),
                   dict(sets=[co.Box(x, -1.0, 1.0), co.eq(lambda: x[0])]),
                   dict(constraints=co.ineq(lambda: x.sum()))):
        with pytest.raises(ValueError, match="AugmentedLagrangian") as err:
            co.ProjectedGradient([x], **kwargs)
        assert "ConstrainedSQP" in str(err.value)
    with pytest.raises(ValueError, match="AugmentedLagrangian"):
        co.minimize(lambda: (x ** 2).sum(), [x], [co.ineq(lambda: x.sum() - 1.0)], method="pgd")


def test_two_sets_on_one_parameter_raise():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter"):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0), co.Ball(x, 1.0)])
    with pytest.raises(ValueError, match="same parameter"):
        co.ProjectedGradient([x], sets=[co.Box(x, -1.0, 1.0)], constraints=[co.Ball(x, 1.0)])


def test_set_on_a_tensor_that_is_not_a_parameter_raises():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    other = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        co.ProjectedGradient([x], [co.Box(other, -1.0, 1.0)])
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        co.ProjectedGradient([x], [co.Box(x.detach().clone(), -1.0, 1.0)])   # equal values, another tensor


def test_no_sets_raise():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    for kwargs in ({}, dict(sets=[]), dict(constraints=[]), dict(sets=None, constraints=None)):
        with pytest.raises(ValueError, match="no sets"):
            co.ProjectedGradient([x], **kwargs)


def test_not_a_set_raises_type_error():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match="set"):
        co.ProjectedGradient([x], ["box"])


def test_apgd_needs_its_budget():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="apgd_steps"):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], step="apgd")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="apgd_steps"):
            co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], step="apgd", apgd_steps=bad)


@pytest.mark.parametrize("step", ["spg", "apgd"])
def test_spg_and_apgd_need_a_closure(step):
    x = torch.ones(3, dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], step=step, apgd_steps=10)
    (x ** 2).sum().backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


BAD = [dict(step="newton"), dict(lr=0.0), dict(lr=-1.0), dict(lr=math.nan), dict(tol_opt=0.0), dict(tol_eq=-1.0)]


@pytest.mark.parametrize("kwargs", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k in BAD])
def test_bad_options_raise_value_error_naming_them(kwargs):
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], **kwargs)


def test_inner_optimizer_only_with_the_fixed_rule_and_options_only_with_an_inner_optimizer():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="fixed"):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], optimizer=torch.optim.Adam, step="spg")
    with pytest.raises(TypeError, match="momentum"):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], momentum=0.9)
    with pytest.raises(TypeError):
        co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], optimizer="adam")


def test_step_without_closure_or_gradients_raises():
    x = torch.ones(3, dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)])
    with pytest.raises(ValueError, match="backward"):
        opt.step()


def test_nan_loss_skips_the_step_with_a_warning():
    x = torch.tensor([0.5, -0.5], dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], lr=0.1, step="spg")

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum() * math.nan
        loss.backward()
        return loss
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    assert torch.equal(x.detach(), torch.tensor([0.5, -0.5], dtype=F64))


# ---------------------------------------------------------------------------------- 4. certify
def _exact_projection_case(kind):
    """f = ½‖x − a‖² over the set: x* = P(a) in closed form (own code), and a feasible non-optimal point."""
    a = torch.tensor([1.3, -0.4, 0.9, 0.05, -1.1, 0.2], dtype=F64)
    if kind == "box":
        return a, a.clamp(-0.5, 0.5), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    if kind == "ball2":
        return a, a / a.norm(), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)
    if kind == "ballinf":
        return a, a.clamp(-1.0, 1.0), torch.zeros(N, dtype=F64)
    if kind == "ball1":
        theta = _threshold(a.abs(), 1.0)
        return a, a.sign() * (a.abs() - theta).clamp(min=0), torch.tensor([0.5, 0, 0, 0, 0.5, 0], dtype=F64)
    if kind == "simplex":
        theta = _threshold(a, 1.0)
        return a, (a - theta).clamp(min=0), torch.full((N,), 1.0 / N, dtype=F64)
    if kind == "nonneg":
        return a, a.clamp(min=0), torch.ones(N, dtype=F64)
    if kind == "sphere":      # (−a/‖a‖ would be stationary too: the farthest point)
        return a, a / a.norm(), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    # stiefel: P(A) = U Vᵀ computed from the eigen-decomposition of AᵀA (not by the library's SVD)
    A = a.reshape(N // 2, 2)
    w, V = torch.linalg.eigh(A.T @ A)
    star = A @ V @ torch.diag(w.rsqrt()) @ V.T
    other = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=F64)
    return a, star.reshape(-1), other.reshape(-1)


CERT_KINDS = ["box", "nonneg", "ball2", "ballinf", "ball1", "simplex", "sphere", "stiefel"]


@pytest.mark.parametrize("kind", CERT_KINDS)
def test_certify_at_the_optimum_and_at_a_feasible_non_optimal_point(kind):
    a, x_star, other = _exact_projection_case(kind)
    shape = (N // 2, 2) if kind == "stiefel" else (N,)
    x = x_star.reshape(shape).clone().requires_grad_(True)
    target = a.reshape(shape)
    opt = co.ProjectedGradient([x], [_make_set(kind, x)])

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((x - target) ** 2).sum()
        loss.backward()
        return loss
    assert _in_set(kind, x.detach(), tol=1e-12) and _in_set(kind, other.reshape(shape), tol=1e-12)
    with torch.no_grad():
        x.copy_(other.reshape(shape))
    cert = opt.certify(closure)
    assert cert.feasible and not cert.converged and cert.status is co.Status.IN_PROGRESS, (kind, cert)
    assert cert.stationarity > 1e-3
    with torch.no_grad():
        x.copy_(x_star.reshape(shape))
    cert = opt.certify(closure)
    assert torch.equal(x.detach(), x_star.reshape(shape))             # certify does not move the point
    assert cert.converged and cert.status is co.Status.CONVERGED, (kind, cert)
    assert cert.kkt and cert.violation <= 1e-12
    assert cert.objective == pytest.approx(0.5 * float(((x_star - a) ** 2).sum()), rel=1e-14)


def test_running_certificate_never_claims_convergence():
    make_set, f, x_star, lipschitz = _box_case()
    x = x_star.clone().requires_grad_(True)
    opt = co.ProjectedGradient([x], [make_set(x)], lr=1.0 / lipschitz)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss
    opt.step(closure)
    assert opt.certificate.status is co.Status.IN_PROGRESS and math.isnan(opt.certificate.stationarity)
    assert opt.certificate.violation == 0.0
    assert opt.certify(closure).converged


# ------------------------------------------------------------------------------ 5. state_dict
def _resume_case(step, seed_x):
    x = seed_x.clone().requires_grad_(True)
    extra = {}
    if step == "apgd":
        extra = dict(apgd_steps=40)
    if step == "adam":
        step, extra = "fixed", dict(optimizer=torch.optim.Adam)
    opt = co.ProjectedGradient([x], [co.Ball(x, 1.0)], lr=0.05, step=step, **extra)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ Q @ x + QV @ x + 0.1 * (x ** 4).sum()
        loss.backward()
        return loss
    return x, opt, closure


@pytest.mark.parametrize("step", ["spg", "apgd", "adam"])
def test_state_dict_round_trip_is_exact(step, tmp_path):
    start = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.4, -0.3], dtype=F64)
    k = 6
    x_full, opt_full, closure_full = _resume_case(step, start)
    for _ in range(2 * k):
        opt_full.step(closure_full)

    x1, opt1, closure1 = _resume_case(step, start)
    for _ in range(k):
        opt1.step(closure1)
    torch.save({"x": x1.detach().clone(), "opt": opt1.state_dict()}, tmp_path / "pgd.pt")
    saved = torch.load(tmp_path / "pgd.pt", weights_only=False)
    x2, opt2, closure2 = _resume_case(step, torch.zeros(N, dtype=F64))
    with torch.no_grad():
        x2.copy_(saved["x"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(k):
        opt2.step(closure2)
    assert not torch.equal(x1.detach(), x_full.detach())       # the second half moved
    assert torch.equal(x2.detach(), x_full.detach())
    assert opt2.certificate.iteration == opt_full.certificate.iteration == 2 * k


def test_state_dict_inner_mismatch_raises():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    with_inner = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)], optimizer=torch.optim.Adam)
    without = co.ProjectedGradient([x], [co.Box(x, -1.0, 1.0)])
    with pytest.raises(ValueError, match="inner"):
        without.load_state_dict(with_inner.state_dict())
    with pytest.raises(ValueError, match="inner"):
        with_inner.load_state_dict(without.state_dict())
