"""Simple sets: exact projections, their properties, and the sets as constraints (constrained_optim/sets.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize as scipy_minimize

from constrained_optim._flat import FlatParams
from constrained_optim.constraints import Constraint, canonical, evaluate
from constrained_optim.sets import Ball, Box, NonNegative, Set, Simplex, Sphere, Stiefel

F64, F32 = torch.float64, torch.float32
KINDS = ["box", "nonneg", "ball1", "ball2", "ballinf", "simplex", "simplex_dim", "sphere", "stiefel"]
CONVEX = [k for k in KINDS if k not in ("sphere", "stiefel")]
NONCONVEX = ["sphere", "stiefel"]


# ------------------------------------------------------------------------------------ random instances
def _draw_set(data, kind: str, dtype=F64) -> tuple[Set, torch.Generator]:
    """A random instance of ``kind`` on a fresh parameter (zeros), and the generator for its points."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    min_dims = 2 if kind in ("stiefel", "simplex_dim") else 1
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=min_dims, max_size=3), label="shape"))
    param = torch.zeros(shape, dtype=dtype, requires_grad=True)
    radius = data.draw(st.floats(0.05, 5.0), label="radius")

    def rand():
        return torch.randn(shape, generator=gen, dtype=F64).to(dtype)

    center = data.draw(st.sampled_from([None, 0.7, "tensor"]), label="center")
    center = rand() if center == "tensor" else center
    if kind == "box":
        return _draw_box(data, param, gen), gen
    if kind == "nonneg":
        return NonNegative(param), gen
    if kind.startswith("ball"):
        p = {"ball1": 1, "ball2": 2, "ballinf": data.draw(st.sampled_from([math.inf, "inf"]))}[kind]
        return Ball(param, radius=radius, p=p, center=center), gen
    if kind == "simplex":
        return Simplex(param, radius=radius), gen
    if kind == "simplex_dim":
        return Simplex(param, radius=radius, dim=data.draw(st.integers(-len(shape), len(shape) - 1))), gen
    if kind == "sphere":
        return Sphere(param, radius=radius, center=center), gen
    return Stiefel(param), gen


def _draw_box(data, param, gen) -> Box:
    shape, dtype = param.shape, param.dtype
    lower = torch.randn(shape, generator=gen, dtype=F64) - 0.5
    upper = lower + 2 * torch.rand(shape, generator=gen, dtype=F64)
    upper = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.1, lower, upper)   # l = u entries
    lower[torch.rand(shape, generator=gen, dtype=F64) < 0.25] = -math.inf
    upper[torch.rand(shape, generator=gen, dtype=F64) < 0.25] = math.inf
    form = data.draw(st.sampled_from(["tensors", "floats", "lower only", "upper only"]), label="bounds")
    if form == "floats":
        return Box(param, lower=-0.3, upper=0.4)
    if form == "lower only":
        return Box(param, lower=lower.to(dtype))
    if form == "upper only":
        return Box(param, upper=upper.to(dtype))
    return Box(param, lower=lower.to(dtype), upper=upper.to(dtype))


def _draw_point(data, s: Set, gen: torch.Generator) -> torch.Tensor:
    """Near and far points, sometimes on a grid (ties, exact zeros, points exactly on bounds)."""
    scale = data.draw(st.sampled_from([1e-3, 0.3, 1.0, 10.0]), label="scale")
    x = torch.randn(s.param.shape, generator=gen, dtype=F64) * scale
    if data.draw(st.booleans(), label="grid"):
        x = torch.round(x / (0.5 * scale)) * (0.5 * scale)
    return x.to(s.param.dtype)


def _tol(s: Set, *xs: torch.Tensor) -> float:
    """Rounding slack, relative to the size of the numbers involved."""
    size = 1.0 + max(float(x.abs().max()) for x in xs) + getattr(s, "radius", 0.0)
    for option in ("center", "lower", "upper"):
        t = getattr(s, option, None)
        if t is not None and torch.isfinite(t).any():
            size += float(t[torch.isfinite(t)].abs().max())
    eps = 1e-11 if xs[0].dtype == F64 else 5e-5
    return eps * size * (1 + xs[0].numel()) ** 0.5


# ------------------------------------------------------------------------ KKT of min ½‖y − x‖², y ∈ S
def _kkt_box(lower, upper, x, y, tol):
    """``x − y`` in the normal cone of the box at ``y``: zero inside, <= 0 at a lower, >= 0 at an upper bound."""
    assert (y >= lower - tol).all() and (y <= upper + tol).all()
    r = x - y
    at_lower = (y - lower).abs() <= tol
    at_upper = (upper - y).abs() <= tol
    assert ((r.abs() <= tol) | ((r < 0) & at_lower) | ((r > 0) & at_upper)).all()


def _kkt_ball2(c, r, x, y, tol):
    """``x − y = λ (y − c)``, ``λ >= 0``, and ``λ > 0`` only on the boundary."""
    d, e = (x - c).reshape(-1), (y - c).reshape(-1)
    norm = float(e.norm())
    assert norm <= r + tol
    res = d - e
    if float(res.norm()) <= tol:
        return
    lam = float(res @ e) / norm ** 2
    assert lam >= -tol
    assert float((res - lam * e).norm()) <= tol
    assert abs(norm - r) <= tol


def _kkt_ball1(c, r, x, y, tol):
    """``x − y = θ g`` with ``θ >= 0``, ``g ∈ ∂‖·‖₁(y − c)``; ``θ > 0`` only on the boundary."""
    d, e = (x - c).reshape(-1), (y - c).reshape(-1)
    assert float(e.abs().sum()) <= r + tol
    if float((d - e).abs().max()) <= tol:
        return
    assert abs(float(e.abs().sum()) - r) <= tol
    nonzero = e != 0
    assert (torch.sign(e[nonzero]) == torch.sign(d[nonzero])).all()
    gaps = d[nonzero].abs() - e[nonzero].abs()            # θ on the support
    theta = float(gaps.median())
    assert theta >= -tol
    assert float((gaps - theta).abs().max()) <= tol
    assert (d[~nonzero].abs() <= theta + tol).all()


def _kkt_simplex_rows(X, Y, r, tol):
    """Per row: ``y_i = x_i − θ`` where ``y_i > 0``, ``x_i − θ <= 0`` where ``y_i = 0``, and ``Σ y = r``."""
    assert (Y >= 0).all()
    assert float((Y.sum(-1) - r).abs().max()) <= tol
    positive = Y > 0
    assert positive.any(-1).all()
    theta = torch.where(positive, X - Y, torch.nan).nanmean(-1, keepdim=True)
    assert (((X - Y - theta).abs() <= tol) | ~positive).all()
    assert ((X <= theta + tol) | positive).all()


def _kkt_sphere(c, r, x, y, tol):
    """``‖y − c‖ = r`` and ``x − c`` is a nonnegative multiple of ``y − c``."""
    d, e = (x - c).reshape(-1), (y - c).reshape(-1)
    assert abs(float(e.norm()) - r) <= tol
    mu = float(d @ e) / r ** 2
    assert mu >= -tol
    assert float((d - mu * e).norm()) <= tol


def _kkt_stiefel(X, P, tol):
    """The smaller Gram matrix of ``P`` is ``I``, and ``PᵀX`` (or ``XPᵀ``) is symmetric positive semidefinite."""
    a, b = X.shape[-2:]
    G, M = (P.mT @ P, P.mT @ X) if a >= b else (P @ P.mT, X @ P.mT)
    eye = torch.eye(min(a, b), dtype=X.dtype)
    assert float((G - eye).abs().max()) <= tol
    assert float((M - M.mT).abs().max()) <= tol
    assert float(torch.linalg.eigvalsh((M + M.mT) / 2).min()) >= -tol


def _check_kkt(s: Set, x: torch.Tensor, y: torch.Tensor, tol: float) -> None:
    if isinstance(s, Box):
        _kkt_box(s.lower.to(x), s.upper.to(x), x, y, tol)
    elif isinstance(s, NonNegative):
        _kkt_box(torch.zeros_like(x), torch.full_like(x, math.inf), x, y, tol)
    elif isinstance(s, Ball) and s.p == math.inf:
        c = s.center.to(x)
        _kkt_box(c - s.radius, c + s.radius, x, y, tol)
    elif isinstance(s, Ball):
        (_kkt_ball2 if s.p == 2 else _kkt_ball1)(s.center.to(x), s.radius, x, y, tol)
    elif isinstance(s, Simplex):
        if s.dim is None:
            _kkt_simplex_rows(x.reshape(1, -1), y.reshape(1, -1), s.radius, tol)
        else:
            n = x.shape[s.dim]
            _kkt_simplex_rows(x.movedim(s.dim, -1).reshape(-1, n), y.movedim(s.dim, -1).reshape(-1, n),
                              s.radius, tol)
    elif isinstance(s, Sphere):
        _kkt_sphere(s.center.to(x), s.radius, x, y, tol)
    else:
        _kkt_stiefel(x, y, tol)


# -------------------------------------------------------------------------------- projection is exact
@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from([F64, F32]), data=st.data())
def test_projection_satisfies_kkt(kind, dtype, data):
    s, gen = _draw_set(data, kind, dtype)
    x = _draw_point(data, s, gen)
    y = s.project(x)
    assert y.shape == x.shape and y.dtype == dtype and not y.requires_grad
    _check_kkt(s, x, y, _tol(s, x))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_projection_is_idempotent(kind, data):
    s, gen = _draw_set(data, kind)
    x = _draw_point(data, s, gen)
    y = s.project(x)
    assert float((s.project(y) - y).abs().max()) <= _tol(s, x)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(CONVEX), data=st.data())
def test_projection_onto_convex_set_is_nonexpansive(kind, data):
    s, gen = _draw_set(data, kind)
    assert s.convex
    x1, x2 = _draw_point(data, s, gen), _draw_point(data, s, gen)
    if data.draw(st.booleans(), label="nearby"):
        x2 = x1 + 1e-3 * x2
    distance = float((s.project(x1) - s.project(x2)).norm())
    assert distance <= float((x1 - x2).norm()) + _tol(s, x1, x2)


def _random_points_of(s: Set, gen: torch.Generator, count: int) -> torch.Tensor:
    """``count`` random points of a sphere or Stiefel set, stacked along a new leading dimension."""
    shape = (count, *s.param.shape)
    if isinstance(s, Sphere):
        u = torch.randn(shape, generator=gen, dtype=F64)
        norms = u.reshape(count, -1).norm(dim=1).reshape(count, *[1] * s.param.ndim)
        return s.center + s.radius * u / norms
    a, b = s.param.shape[-2:]
    if a >= b:
        return torch.linalg.qr(torch.randn(shape, generator=gen, dtype=F64)).Q
    return torch.linalg.qr(torch.randn(*shape[:-2], b, a, generator=gen, dtype=F64)).Q.mT


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(NONCONVEX), data=st.data())
def test_projection_onto_nonconvex_set_beats_other_points(kind, data):
    s, gen = _draw_set(data, kind)
    assert not s.convex
    x = _draw_point(data, s, gen)
    y = s.project(x)
    nearby = torch.stack([s.project(y + 0.05 * torch.randn(y.shape, generator=gen, dtype=F64))
                          for _ in range(5)])
    others = torch.cat([_random_points_of(s, gen, 20), nearby])
    if isinstance(s, Stiefel):   # compare matrix by matrix: each is its own Stiefel set
        best = (y - x).square().sum((-2, -1))
        rivals = (others - x).square().sum((-2, -1))
    else:
        best = (y - x).square().sum()
        rivals = (others - x).reshape(len(others), -1).square().sum(1)
    assert bool((best <= rivals + _tol(s, x)).all())


# ------------------------------------------------------------------------------- independent oracle
def _slsqp(objective_x, n_vars, constraints, bounds):
    res = scipy_minimize(objective_x, np.zeros(n_vars), jac=True, method="SLSQP", bounds=bounds,
                         constraints=constraints, options={"ftol": 1e-12, "maxiter": 500})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(6))
def test_ball1_projection_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 5
    x, c = 2 * rng.standard_normal(n), 0.3 * rng.standard_normal(n)
    r = float(rng.uniform(0.2, 1.5))
    # y = c + p − q with p, q >= 0 and Σ(p + q) <= r: the ℓ1 ball as a smooth problem
    def objective(z):
        g = c + z[:n] - z[n:] - x
        return 0.5 * g @ g, np.concatenate([g, -g])
    ball = {"type": "ineq", "fun": lambda z: r - z.sum(), "jac": lambda z: -np.ones(2 * n)}
    z = _slsqp(objective, 2 * n, [ball], [(0, None)] * (2 * n))
    expected = c + z[:n] - z[n:]
    s = Ball(torch.zeros(n, dtype=F64), radius=r, p=1, center=torch.from_numpy(c))
    assert np.abs(s.project(torch.from_numpy(x)).numpy() - expected).max() <= 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_simplex_projection_matches_slsqp(seed):
    rng = np.random.default_rng(100 + seed)
    n = 2 + seed % 5
    x, r = rng.standard_normal(n), float(rng.uniform(0.2, 2.0))

    def objective(y):
        return 0.5 * (y - x) @ (y - x), y - x
    total = {"type": "eq", "fun": lambda y: y.sum() - r, "jac": lambda y: np.ones(n)}
    expected = _slsqp(objective, n, [total], [(0, None)] * n)
    s = Simplex(torch.zeros(n, dtype=F64), radius=r)
    assert np.abs(s.project(torch.from_numpy(x)).numpy() - expected).max() <= 1e-6


# ------------------------------------------------------------------------------ particular projections
def test_box_is_elementwise_clamp_with_broadcast_bounds():
    w = torch.tensor([[-2.0, 0.5, 3.0], [1.0, -1.0, 0.0]], dtype=F64)
    s = Box(torch.zeros(2, 3, dtype=F64), lower=torch.tensor([[-1.0], [0.0]]), upper=1.0)
    assert s.lower.shape == s.upper.shape == (2, 3) and s.lower.dtype == F64
    assert torch.equal(s.project(w), torch.tensor([[-1.0, 0.5, 1.0], [1.0, 0.0, 0.0]], dtype=F64))


def test_inside_points_are_returned_unchanged():
    x = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    for s in [Ball(torch.zeros(3, dtype=F64), p=p) for p in (1, 2, "inf")] + [
            Box(torch.zeros(3, dtype=F64), lower=-1.0, upper=1.0)]:
        y = s.project(x)
        assert torch.equal(y, x) and y is not x


def test_ball2_scales_and_ballinf_clamps_around_center():
    c = torch.tensor([1.0, 1.0], dtype=F64)
    ball2 = Ball(torch.zeros(2, dtype=F64), radius=2.0, center=c)
    assert torch.allclose(ball2.project(torch.tensor([4.0, 5.0], dtype=F64)), torch.tensor([2.2, 2.6], dtype=F64))
    ballinf = Ball(torch.zeros(2, dtype=F64), radius=0.5, p=float("inf"), center=1.0)
    assert torch.equal(ballinf.project(torch.tensor([4.0, 0.2], dtype=F64)), torch.tensor([1.5, 0.5], dtype=F64))


def test_ball1_restores_signs():
    s = Ball(torch.zeros(3, dtype=F64), radius=1.0, p=1)
    assert torch.allclose(s.project(torch.tensor([-2.0, 0.5, 1.0], dtype=F64)),
                          torch.tensor([-1.0, 0.0, 0.0], dtype=F64))
    assert torch.allclose(s.project(torch.tensor([1.0, -1.0, 0.1], dtype=F64)),
                          torch.tensor([0.5, -0.5, 0.0], dtype=F64))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_simplex_per_slice_of_a_matrix(dim):
    gen = torch.Generator().manual_seed(dim + 5)
    x = torch.randn(3, 5, generator=gen, dtype=F64)
    s = Simplex(torch.zeros(3, 5, dtype=F64), radius=2.0, dim=dim)
    y = s.project(x)
    assert torch.allclose(y.sum(dim), torch.full((x.shape[dim - 1 if dim else 1],), 2.0, dtype=F64))
    for k in range(x.shape[1 - dim % 2]):   # each slice equals the whole-tensor projection of that slice
        sl = (k, slice(None)) if dim % 2 else (slice(None), k)
        one = Simplex(torch.zeros(x[sl].shape, dtype=F64), radius=2.0)
        assert torch.allclose(y[sl], one.project(x[sl]), rtol=0, atol=1e-14)


def test_simplex_whole_tensor_and_known_value():
    s = Simplex(torch.zeros(2, 2, dtype=F64))
    y = s.project(torch.tensor([[1.0, 0.5], [-1.0, 0.0]], dtype=F64))
    assert torch.allclose(y, torch.tensor([[0.75, 0.25], [0.0, 0.0]], dtype=F64))


def test_sphere_at_center_returns_first_basis_point():
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    s = Sphere(torch.zeros(2, 2, dtype=F64), radius=2.0, center=c)
    expected = c.clone()
    expected[0, 0] += 2.0
    assert torch.equal(s.project(c.clone()), expected)
    assert torch.allclose(s.project(torch.tensor([[1.0, 1.0], [0.5, 3.0]], dtype=F64)),
                          torch.tensor([[1.0, 0.0], [0.5, 3.0]], dtype=F64))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (2, 5, 3), (2, 3, 2, 4)])
def test_stiefel_batched_orthonormal_columns_or_rows(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=F64)
    P = Stiefel(torch.zeros(shape, dtype=F64)).project(x)
    a, b = shape[-2:]
    G = P.mT @ P if a >= b else P @ P.mT
    assert torch.allclose(G, torch.eye(min(a, b), dtype=F64).expand_as(G), atol=1e-12)
    for index in np.ndindex(*shape[:-2]):   # each matrix is projected on its own
        alone = Stiefel(torch.zeros(a, b, dtype=F64)).project(x[index])
        assert torch.allclose(P[index], alone, atol=1e-12)
    _kkt_stiefel(x, P, 1e-11)


# --------------------------------------------------------------------------- project() and project_()
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", KINDS)
def test_project_in_place_keeps_the_leaf_parameter(kind, dtype):
    shape = (3, 4)
    gen = torch.Generator().manual_seed(1)
    param = (3 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    s = _fixed_set(kind, param)
    before = param.detach().clone()
    expected = s.project(param)
    assert torch.equal(param.detach(), before)           # project() is pure
    assert not expected.requires_grad
    pointer = param.data_ptr()
    s.project_()
    assert param.data_ptr() == pointer and param.is_leaf and param.requires_grad and param.grad_fn is None
    assert torch.equal(param.detach(), expected) and param.dtype == dtype
    _check_kkt(s, before, param.detach(), _tol(s, before))


def _fixed_set(kind: str, param: torch.Tensor) -> Set:
    return {"box": lambda: Box(param, lower=-0.5, upper=torch.linspace(0, 1, param.shape[-1])),
            "nonneg": lambda: NonNegative(param),
            "ball1": lambda: Ball(param, radius=1.5, p=1, center=0.2),
            "ball2": lambda: Ball(param, radius=1.5, center=0.2),
            "ballinf": lambda: Ball(param, radius=0.5, p="inf"),
            "simplex": lambda: Simplex(param, radius=2.0),
            "simplex_dim": lambda: Simplex(param, dim=1),
            "sphere": lambda: Sphere(param, radius=2.0, center=-0.1),
            "stiefel": lambda: Stiefel(param)}[kind]()


def test_project_follows_the_input_dtype():
    s = Ball(torch.zeros(3, dtype=F64), radius=1.0, p=1, center=torch.tensor([0.1, 0.2, 0.3]))
    y = s.project(torch.tensor([3.0, -1.0, 0.5], dtype=F32))
    assert y.dtype == F32
    assert s.center.dtype == F64


def test_project_of_empty_parameter():
    for s in [Ball(torch.zeros(0)), Box(torch.zeros(0, 3), lower=0.0), Stiefel(torch.zeros(0, 2, 2))]:
        assert s.project(s.param).shape == s.param.shape


# ----------------------------------------------------------------------------------- as_constraint
def _rows(constraints: list[Constraint]) -> tuple[torch.Tensor, torch.Tensor]:
    """All inequality rows and all equality rows (detached)."""
    ineq_rows = [c.values().detach() for c in constraints if c.kind == "ineq"]
    eq_rows = [c.values().detach() for c in constraints if c.kind == "eq"]
    return torch.cat(ineq_rows or [torch.zeros(0)]), torch.cat(eq_rows or [torch.zeros(0)])


def _violation(constraints: list[Constraint]) -> float:
    """Largest violation: ``max(c_I)⁺`` and ``|c_E|`` over all rows (0 when there are none)."""
    ineq_rows, eq_rows = _rows(constraints)
    worst = torch.cat([ineq_rows.clamp(min=0), eq_rows.abs(), torch.zeros(1, dtype=ineq_rows.dtype)])
    return float(worst.max())


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_constraints_hold_at_projection_and_fail_outside(kind, data):
    s, gen = _draw_set(data, kind)
    x = _draw_point(data, s, gen)
    constraints = s.as_constraint()                 # built before the parameter moves: they read it when called
    with torch.no_grad():
        s.param.copy_(x)
    outside = float((s.project(x) - x).norm()) > 1e-6
    if outside:
        assert _violation(constraints) > 0
    s.project_()
    ineq_rows, eq_rows = _rows(constraints)
    assert ineq_rows.numel() == 0 or float(ineq_rows.max()) <= 1e-10
    assert eq_rows.numel() == 0 or float(eq_rows.abs().max()) <= 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_constraints_depend_on_the_parameter(kind):
    param = torch.full((3, 4), 0.25, dtype=F64, requires_grad=True)
    s = _fixed_set(kind, param)
    constraints = canonical(s.as_constraint())
    values = evaluate(constraints, FlatParams([param]), check_dependence=True)
    assert values.jacobian().shape == (values.m, 12)
    with torch.no_grad():
        param.copy_(torch.linspace(-3, 3, 12, dtype=F64).reshape(3, 4))
    moved = evaluate(constraints, FlatParams([param]))
    assert not torch.equal(values.c, moved.c)
    assert _violation(constraints) > 0


@pytest.mark.parametrize("make, outside", [
    (lambda p: Box(p, lower=-1.0, upper=1.0), [0.0, 1.5, 0.0]),
    (lambda p: Box(p, upper=torch.tensor([math.inf, math.inf, 0.0])), [9.0, 9.0, 0.1]),
    (lambda p: NonNegative(p), [1.0, -0.1, 0.0]),
    (lambda p: Ball(p, radius=1.0, p=1), [0.5, 0.5, 0.1]),
    (lambda p: Ball(p, radius=1.0), [0.8, 0.7, 0.0]),
    (lambda p: Ball(p, radius=1.0, p="inf", center=1.0), [1.0, 2.1, 0.0]),
    (lambda p: Simplex(p), [0.5, 0.5, 0.1]),
    (lambda p: Simplex(p), [1.1, -0.1, 0.0]),
    (lambda p: Sphere(p, radius=2.0), [1.0, 1.0, 1.0]),
])
def test_constraints_violated_at_a_known_outside_point(make, outside):
    param = torch.tensor(outside, dtype=F64, requires_grad=True)
    assert _violation(make(param).as_constraint()) > 1e-3


def test_stiefel_constraint_rows_are_the_upper_triangle():
    W = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]],
                     dtype=F64, requires_grad=True)                      # (2, 2, 3): rows orthonormal
    (con,) = Stiefel(W, name="q").as_constraint()
    assert con.kind == "eq" and con.name == "q"
    # per matrix the rows are (G − I)[0,0], [0,1], [1,1] with G = W Wᵀ
    assert torch.equal(con.values().detach(), torch.tensor([0.0, 0.0, 3.0, 1.0, 1.0, 0.0], dtype=F64))
    tall = Stiefel(torch.zeros(5, 3, dtype=F64, requires_grad=True)).as_constraint()[0]
    assert tall.values().numel() == 6                                    # 3 × 3 Gram: 6 distinct entries


def test_box_constraint_rows_skip_infinite_bounds():
    x = torch.tensor([0.0, 1.0, 2.0], dtype=F64, requires_grad=True)
    (con,) = Box(x, lower=torch.tensor([-math.inf, 0.0, 1.0]), upper=torch.tensor([1.0, math.inf, 1.5]),
                 name="b").as_constraint()
    assert con.kind == "ineq" and con.name == "b"
    # lower − x on entries 1, 2, then x − upper on entries 0, 2
    assert torch.equal(con.values().detach(), torch.tensor([-1.0, -1.0, -1.0, 0.5], dtype=F64))
    free = Box(x, lower=-math.inf).as_constraint()[0]
    assert free.values().numel() == 0


def test_ball_constraint_values():
    x = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    c = torch.tensor([0.0, 1.0], dtype=F64)
    two, one, inf = (Ball(x, radius=2.0, p=p, center=c).as_constraint()[0] for p in (2, 1, "inf"))
    assert torch.allclose(two.values(), torch.tensor([(18.0 - 4.0) / 4.0], dtype=F64))
    assert torch.allclose(one.values(), torch.tensor([4.0], dtype=F64))
    assert torch.equal(inf.values().detach(), torch.tensor([1.0, 1.0, -5.0, -5.0], dtype=F64))
    # on the boundary the ℓ2 row has the gradient of ‖x − c‖ − r: the unit normal
    with torch.no_grad():
        x.copy_(c + torch.tensor([1.2, 1.6], dtype=F64))
    (grad,) = torch.autograd.grad(two.values().sum(), x)
    assert torch.allclose(grad, torch.tensor([0.6, 0.8], dtype=F64))


def test_constraint_names_and_kinds():
    p = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    assert [c.name for c in Box(p, lower=0.0).as_constraint()] == ["box"]
    assert [c.name for c in Box(p, lower=0.0, name="w").as_constraint()] == ["w"]
    assert [c.name for c in Box(p, lower=0.0, name="w").as_constraint("v")] == ["v"]
    assert [c.name for c in NonNegative(p).as_constraint()] == ["nonnegative"]
    assert [c.name for c in Ball(p, p=1).as_constraint()] == ["ball"]
    simplex = Simplex(p, dim=1, name="mix").as_constraint()
    assert [(c.name, c.kind) for c in simplex] == [("mix.nonneg", "ineq"), ("mix.sum", "eq")]
    assert simplex[1].values().shape == (2,)
    assert [c.name for c in Simplex(p).as_constraint()] == ["simplex.nonneg", "simplex.sum"]
    assert [(c.name, c.kind) for c in Sphere(p).as_constraint()] == [("sphere", "eq")]
    assert [(c.name, c.kind) for c in Stiefel(p).as_constraint()] == [("stiefel", "eq")]
    # several sets together get unique names when named
    names = [c.name for c in canonical(Ball(p, name="a").as_constraint() + Ball(p, name="b").as_constraint())]
    assert names == ["a", "b"]


def test_convexity_flags_and_repr():
    p = torch.zeros(3, 2)
    assert [cls.convex for cls in (Box, NonNegative, Ball, Simplex, Sphere, Stiefel)] == [True] * 4 + [False] * 2
    assert (repr(Ball(p, radius=2.0, p="inf", name="b"))
            == "Ball(shape=(3, 2), radius=2.0, p='inf', center=0.0, name='b')")
    assert repr(Simplex(p, dim=0)) == "Simplex(shape=(3, 2), radius=1.0, dim=0, name=None)"
    assert "lower=-1.0" in repr(Box(p, lower=-1.0)) and "upper=inf" in repr(Box(p, lower=-1.0))
    assert repr(Stiefel(p)) == "Stiefel(shape=(3, 2), name=None)"


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("p", [3, 0, -1, 1.5, "l1", "2", True, math.nan, None])
def test_ball_bad_p(p):
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        Ball(torch.zeros(2), p=p)


@pytest.mark.parametrize("cls", [Ball, Simplex, Sphere])
@pytest.mark.parametrize("radius", [0.0, -1.0, math.inf, math.nan])
def test_bad_radius(cls, radius):
    with pytest.raises(ValueError, match=f"{cls.__name__} radius must be positive and finite"):
        cls(torch.zeros(2), radius=radius)


@pytest.mark.parametrize("cls", [Ball, Simplex, Sphere])
def test_radius_must_be_a_number(cls):
    with pytest.raises(TypeError, match="radius must be a real number, got str"):
        cls(torch.zeros(2), radius="1")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lower=1.0, upper=0.0), "lower must be <= upper"),
    (dict(lower=torch.tensor([0.0, 2.0]), upper=1.0), "lower must be <= upper.*1 entries"),
    (dict(lower=torch.tensor([0.0, math.nan])), "lower contains NaN"),
    (dict(lower=0.0, upper=math.nan), "upper contains NaN"),
    (dict(), "got neither"),
    (dict(lower=math.inf), r"lower contains \+inf"),
    (dict(upper=-math.inf), "upper contains -inf"),
    (dict(lower=torch.zeros(3)), r"lower of shape \(3,\) does not broadcast .* \(2,\)"),
])
def test_box_bad_bounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Box(torch.zeros(2), **kwargs)


def test_box_bound_of_wrong_type():
    with pytest.raises(TypeError, match="Box upper must be a float or a tensor, got str"):
        Box(torch.zeros(2), upper="1")


@pytest.mark.parametrize("cls", [Ball, Sphere])
def test_bad_center(cls):
    with pytest.raises(ValueError, match="center must be finite"):
        cls(torch.zeros(2), center=torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="center of shape"):
        cls(torch.zeros(2), center=torch.zeros(3))


@pytest.mark.parametrize("shape", [(), (4,)])
def test_stiefel_needs_a_matrix(shape):
    with pytest.raises(ValueError, match=r"at least 2 dimensions .* got shape"):
        Stiefel(torch.zeros(shape))


@pytest.mark.parametrize("dim, error, match", [(2, ValueError, r"dim must be in \[-2, 2\)"),
                                               (-3, ValueError, "dim must be in"),
                                               (1.0, TypeError, "dim must be an int"),
                                               (True, TypeError, "dim must be an int")])
def test_simplex_bad_dim(dim, error, match):
    with pytest.raises(error, match=match):
        Simplex(torch.zeros(2, 3), dim=dim)


def test_empty_simplex_and_sphere():
    with pytest.raises(ValueError, match="Simplex slices .* are empty"):
        Simplex(torch.zeros(2, 0), dim=1)
    with pytest.raises(ValueError, match="Sphere needs .* at least one element"):
        Sphere(torch.zeros(0))


def _all_sets(param):
    return [lambda: Box(param, lower=0.0), lambda: NonNegative(param), lambda: Ball(param),
            lambda: Simplex(param), lambda: Sphere(param), lambda: Stiefel(param)]


@pytest.mark.parametrize("param, match", [([1.0, 2.0], "got list"), (np.zeros((2, 2)), "got ndarray"),
                                          (torch.zeros(2, 2, dtype=torch.int64), "floating-point.*int64")])
def test_param_must_be_a_floating_tensor(param, match):
    for make in _all_sets(param):
        with pytest.raises(TypeError, match=match):
            make()


def test_names_must_be_strings():
    with pytest.raises(TypeError, match="name must be a string or None, got int"):
        Ball(torch.zeros(2), name=3)
    with pytest.raises(TypeError, match="name must be a string or None, got int"):
        Ball(torch.zeros(2)).as_constraint(name=3)


def test_project_checks_its_input():
    s = Ball(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"parameter's shape \(2, 3\), got \(3, 2\)"):
        s.project(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="floating torch.Tensor, got list"):
        s.project([[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="got torch.int64"):
        s.project(torch.zeros(2, 3, dtype=torch.int64))
