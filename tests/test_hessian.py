"""Damped BFGS / L-BFGS inverse-Hessian operators (constrained_optim/hessian.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrained_optim.hessian import LBFGS, DenseBFGS

F64 = torch.float64
CPU = torch.device("cpu")


def _spd(n, gen, low=1.0, high=10.0):
    """A random symmetric matrix with eigenvalues in [low, high] (well conditioned: no damping)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = low + (high - low) * torch.rand(n, generator=gen, dtype=F64)
    return Q @ torch.diag(eig) @ Q.T


def _pairs(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    A = _spd(n, gen)
    S = [torch.randn(n, generator=gen, dtype=F64) for _ in range(k)]
    return A, [(s, A @ s) for s in S]


def _matrix(H, n):
    return H.apply(torch.eye(n, dtype=F64))


def _assert_spd(M):
    assert torch.allclose(M, M.T, rtol=1e-10, atol=1e-10 * float(M.abs().max()))
    assert float(torch.linalg.eigvalsh(0.5 * (M + M.T)).min()) > 0


def _make(kind, n, memory=50):
    return DenseBFGS(n, F64, CPU) if kind == "dense" else LBFGS(n, F64, CPU, memory=memory)


@pytest.mark.parametrize("kind", ["dense", "lbfgs"])
@pytest.mark.parametrize("seed", range(5))
def test_secant_equation_for_last_pair(kind, seed):
    n, k = 6, 4
    _, pairs = _pairs(n, k, seed)
    H = _make(kind, n)
    for s, y in pairs:
        assert H.update(s, y)
        assert torch.allclose(H.apply(y), s, rtol=1e-9, atol=1e-11)
    assert H.updates == k
    _assert_spd(_matrix(H, n))


def test_lbfgs_secant_with_short_memory():
    n = 5
    _, pairs = _pairs(n, 7, seed=11)
    H = LBFGS(n, F64, CPU, memory=2)
    for s, y in pairs:
        assert H.update(s, y)
    assert len(H.S) == 2 and H.updates == 7
    s, y = pairs[-1]
    assert torch.allclose(H.apply(y), s, rtol=1e-9, atol=1e-11)
    _assert_spd(_matrix(H, n))


def test_initial_operators_are_identity():
    n = 4
    V = torch.randn(n, 3, dtype=F64)
    for H in (DenseBFGS(n, F64, CPU), LBFGS(n, F64, CPU, memory=3)):
        assert torch.equal(H.apply(V), V)


@pytest.mark.parametrize("seed", range(3))
def test_one_update_dense_equals_lbfgs(seed):
    # with a single pair both start from γ I, γ = sᵀy / yᵀy of that pair, and apply the same update
    n = 5
    _, pairs = _pairs(n, 1, seed)
    dense, lbfgs = DenseBFGS(n, F64, CPU), LBFGS(n, F64, CPU, memory=3)
    dense.update(*pairs[0])
    lbfgs.update(*pairs[0])
    assert torch.allclose(_matrix(dense, n), _matrix(lbfgs, n), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lbfgs_equals_dense_bfgs_started_from_the_same_scaling(seed):
    # L-BFGS with memory >= #updates is BFGS from H0 = γ_k I (γ_k of the newest pair). DenseBFGS rescales
    # its H0 with the *first* pair instead, so give it γ_k I explicitly (updates=1 disables the rescaling).
    n, k = 6, 4
    _, pairs = _pairs(n, k, seed)
    lbfgs = LBFGS(n, F64, CPU, memory=k)
    for s, y in pairs:
        lbfgs.update(s, y)
    s_k, y_k = pairs[-1]
    gamma = s_k.dot(y_k) / y_k.dot(y_k)
    dense = DenseBFGS(n, F64, CPU)
    dense.load_state_dict({"H": gamma * torch.eye(n, dtype=F64), "updates": 1})
    for s, y in pairs:
        dense.update(s, y)
    assert torch.allclose(_matrix(dense, n), _matrix(lbfgs, n), rtol=1e-9, atol=1e-11)


vec = st.lists(st.floats(-10, 10, allow_nan=False, allow_infinity=False), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["dense", "lbfgs"]), theta=st.sampled_from([1e-4, 0.2]),
       raw=st.lists(st.tuples(vec, vec), min_size=1, max_size=5))
def test_damping_keeps_positive_definite(kind, theta, raw):
    n = 4
    H = DenseBFGS(n, F64, CPU, damping=theta) if kind == "dense" else LBFGS(n, F64, CPU, memory=3, damping=theta)
    for s_list, y_list in raw:
        s, y = torch.tensor(s_list, dtype=F64), torch.tensor(y_list, dtype=F64)
        if float(s.norm()) < 1e-3 or float(y.norm()) < 1e-3:
            continue
        if float(s.dot(y)) >= 0:     # make the curvature negative: the undamped update would break PD
            y = -y
        if abs(float(s.dot(y))) < 1e-3:
            continue
        before = _matrix(H, n)
        accepted = H.update(s, y)
        after = _matrix(H, n)
        assert bool(torch.isfinite(after).all())
        if not accepted:
            assert torch.equal(before, after)
        # every damped pair has curvature θ yᵀHy > 0, so H₊ is PD in exact arithmetic. With θ = 1e-4 each
        # negative-curvature pair can multiply the condition number by up to 1/θ, so repeated pairs reach
        # cond ~ 1e16 where the smallest eigenvalue is rounding noise of the largest, and the L-BFGS operator (H
        # applied to I through triangular solves with SᵀY) is symmetric only to rounding amplified as much
        # (measured: asymmetry 1.7e-8 of the largest entry at cond 1e12; at cond 1e16 the smallest eigenvalue was
        # -1.1e-10 of the largest with the spare-slot buffer and +3.8e-11 before it, rounding noise either way).
        assert torch.allclose(after, after.T, rtol=0, atol=1e-6 * float(after.abs().max()))
        eig = torch.linalg.eigvalsh(0.5 * (after + after.T))
        assert float(eig.min()) > -1e-8 * float(eig.max())
        if theta == 0.2:
            _assert_spd(after)
        # the curvature along the pair's y is positive (H₊y = s' with s'ᵀy = θ yᵀHy > 0), up to rounding
        assert float(y.dot(H.apply(y))) > -1e-10 * float(eig.max()) * float(y.dot(y))
        if theta == 0.2:
            assert float(y.dot(H.apply(y))) > 0


@pytest.mark.parametrize("kind", ["dense", "lbfgs"])
def test_damped_pair_satisfies_damped_secant(kind):
    # sᵀy < 0: the stored step is s' = τ s + (1 − τ) H y with s'ᵀy = θ yᵀHy > 0 and H₊ y = s'
    n = 3
    H = _make(kind, n)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    y = torch.tensor([-1.0, 0.5, 0.0], dtype=F64)
    theta = H.damping
    Hy = H.apply(y)
    sy, yHy = s.dot(y), y.dot(Hy)
    tau = (1 - theta) * yHy / (yHy - sy)
    s_damped = tau * s + (1 - tau) * Hy
    assert torch.isclose(s_damped.dot(y), theta * yHy)
    assert H.update(s, y)
    assert torch.allclose(H.apply(y), s_damped, rtol=1e-8, atol=1e-12)
    _assert_spd(_matrix(H, n))


@pytest.mark.parametrize("kind", ["dense", "lbfgs"])
def test_nonfinite_pair_is_skipped(kind):
    n = 3
    H = _make(kind, n)
    before = _matrix(H, n)
    assert not H.update(torch.tensor([1.0, float("nan"), 0.0], dtype=F64), torch.ones(3, dtype=F64))
    assert not H.update(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    assert torch.equal(_matrix(H, n), before) and H.updates == 0


@pytest.mark.parametrize("kind", ["dense", "lbfgs"])
def test_apply_vector_and_matrix_consistent(kind):
    n, r = 7, 4
    _, pairs = _pairs(n, 5, seed=3)
    H = _make(kind, n, memory=3)
    for s, y in pairs:
        H.update(s, y)
    V = torch.randn(n, r, dtype=F64, generator=torch.Generator().manual_seed(1))
    HV = H.apply(V)
    assert HV.shape == (n, r)
    for j in range(r):
        Hv = H.apply(V[:, j])
        assert Hv.shape == (n,)
        assert torch.allclose(HV[:, j], Hv, rtol=1e-12, atol=1e-12)
    # apply is linear
    a, b = V[:, 0], V[:, 1]
    assert torch.allclose(H.apply(2.0 * a - 3.0 * b), 2.0 * H.apply(a) - 3.0 * H.apply(b), rtol=1e-10, atol=1e-12)
    # apply does not modify its argument
    V0 = V.clone()
    H.apply(V)
    assert torch.equal(V, V0)


@pytest.mark.parametrize("kind", ["dense", "lbfgs"])
def test_reset_and_state_dict_round_trip(kind):
    n = 4
    _, pairs = _pairs(n, 3, seed=5)
    H = _make(kind, n, memory=5)
    for s, y in pairs:
        H.update(s, y)
    state = H.state_dict()
    H2 = _make(kind, n, memory=5)
    H2.load_state_dict(state)
    assert H2.updates == H.updates
    assert torch.equal(_matrix(H2, n), _matrix(H, n))
    H.reset()
    assert H.updates == 0 and torch.equal(_matrix(H, n), torch.eye(n, dtype=F64))


def _pairs_damped_and_skipped(n, seed):
    """Seven pairs of a quadratic with a pair of negative curvature (damped) as the fourth and a NaN pair (skipped)
    as the sixth; and a generator for further draws."""
    gen = torch.Generator().manual_seed(seed - 1)
    _, pairs = _pairs(n, 7, seed=seed)
    s_neg = torch.randn(n, generator=gen, dtype=F64)
    pairs.insert(3, (s_neg, -0.5 * s_neg))
    pairs.insert(5, (torch.full((n,), float("nan"), dtype=F64), torch.ones(n, dtype=F64)))
    return pairs, gen


def test_deferred_pairs_join_at_the_next_sandwich_as_updates_would():
    # a pair deferred to the sandwich (its Wᵀy from the sandwich's pass) gives the operator of update():
    # plain pairs, a pair that needs damping (negative curvature), a pair that is skipped (NaN), past the memory
    from constrained_optim.jacobian import Jacobian
    n, m = 9, 3
    pairs, gen = _pairs_damped_and_skipped(n, seed=12)
    eager, lazy = LBFGS(n, F64, CPU, memory=3), LBFGS(n, F64, CPU, memory=3)
    J = Jacobian.from_dense(torch.randn(m, n, generator=gen, dtype=F64))
    for s, y in pairs:
        g = torch.randn(n, generator=gen, dtype=F64)
        eager.update(s, y)
        lazy.defer(s, y)
        first, second = eager.sandwich(J, g), lazy.sandwich(J, g)
        assert lazy._pending is None and lazy.order == eager.order and lazy._updates == eager._updates
        assert torch.allclose(second.M, first.M, rtol=1e-12, atol=1e-12)
        assert torch.allclose(second.JHg, first.JHg, rtol=1e-12, atol=1e-12)
        w = torch.randn(m, generator=gen, dtype=F64)
        assert torch.allclose(second.direction(0.7, w), first.direction(0.7, w), rtol=1e-12, atol=1e-12)
    assert eager.updates == 8                    # of 9: the NaN pair was skipped, the others kept (one damped)
    assert torch.allclose(_matrix(lazy, n), _matrix(eager, n), rtol=1e-12, atol=1e-12)
    # a pair still deferred is settled by any other use
    lazy.defer(*pairs[0])
    eager.update(*pairs[0])
    assert torch.allclose(_matrix(lazy, n), _matrix(eager, n), rtol=1e-12, atol=1e-12)
    assert lazy.state_dict()["slots"].tolist() == lazy.order


@pytest.mark.parametrize("through", ["defer", "update"])
def test_lbfgs_keeps_the_upper_triangle_of_sy_and_jg(through):
    """The recursion reads ``R``, the upper triangle of ``SᵀY`` in the order of the pairs: the new pair's row
    (``sᵀyᵢ`` of older pairs) is not computed (no product with s in the sandwich's pass) and stays zero, through
    slots reused past the memory; what lies below the diagonal does not change ``H``. The sandwich also hands out
    ``J ∇f`` from its pass, which the certificate's multiplier fit uses."""
    from constrained_optim.jacobian import Jacobian
    n, m = 9, 3
    pairs, gen = _pairs_damped_and_skipped(n, seed=16)
    H = LBFGS(n, F64, CPU, memory=3)
    J = Jacobian.from_dense(torch.randn(m, n, generator=gen, dtype=F64))
    for s, y in pairs:
        getattr(H, through)(s, y)
        g = torch.randn(n, generator=gen, dtype=F64)
        sandwich = H.sandwich(J, g)
        assert torch.allclose(sandwich.Jg, J.to_dense() @ g, rtol=1e-12, atol=1e-12)
        SY = H.state_dict()["SY"]
        assert torch.equal(SY, SY.triu())
    before = _matrix(H, n)
    slots = H._slots
    lower = torch.ones(len(slots), len(slots), dtype=torch.bool).tril(-1)
    block = H._SY[slots[:, None], slots]
    H._SY[slots[:, None], slots] = torch.where(lower, torch.full_like(block, float("nan")), block)
    assert torch.equal(_matrix(H, n), before)



@pytest.mark.parametrize("through", ["defer", "update"])
def test_pairs_computed_in_their_buffer_rows_give_the_same_operator(through):
    """``pair_rows`` hands out the rows where the next pair is stored (no copy); filled there and given to defer or
    update, the pairs (plain, damped, skipped as NaN) give the operator of pairs passed as their own tensors, and a
    skipped pair does not stay in the rows (a NaN there would reach every product)."""
    from constrained_optim.jacobian import Jacobian
    n, m = 9, 2
    pairs, gen = _pairs_damped_and_skipped(n, seed=14)
    reference, rows = LBFGS(n, F64, CPU, memory=3), LBFGS(n, F64, CPU, memory=3)
    J = Jacobian.from_dense(torch.randn(m, n, generator=gen, dtype=F64))
    for s, y in pairs:
        s_row, y_row = rows.pair_rows()
        assert s_row.data_ptr() == rows._W[2 * rows._free_slot()].data_ptr()
        s_row.copy_(s)
        y_row.copy_(y)
        getattr(reference, through)(s, y)
        getattr(rows, through)(s_row, y_row)
        g = torch.randn(n, generator=gen, dtype=F64)
        first, second = reference.sandwich(J, g), rows.sandwich(J, g)
        assert torch.isfinite(rows._W).all()
        assert torch.allclose(second.M, first.M, rtol=1e-12, atol=1e-12)
        assert torch.allclose(second.JHg, first.JHg, rtol=1e-12, atol=1e-12)
    assert rows.updates == reference.updates == 8
    assert torch.allclose(_matrix(rows, n), _matrix(reference, n), rtol=1e-12, atol=1e-12)
    dense = DenseBFGS(n, F64, CPU)
    s_row, y_row = dense.pair_rows()
    assert s_row.shape == y_row.shape == (n,) and s_row.data_ptr() != y_row.data_ptr()


def test_direction_of_the_sandwich_is_minus_h_times_the_lagrangian_gradient():
    """``direction(μ, w) = −H (μ g + Jᵀw)`` with H as ``apply`` gives it, for a Jacobian with bound rows, through pairs
    past the memory (the slots are reused in a ring); the rows of the slot that holds no pair in use are not read (a
    NaN written there does not reach the direction)."""
    from constrained_optim.jacobian import Jacobian
    n = 12
    gen = torch.Generator().manual_seed(21)
    _, pairs = _pairs(n, 9, seed=21)
    H = LBFGS(n, F64, CPU, memory=4)
    J = Jacobian([torch.randn(2, n, generator=gen, dtype=F64)], torch.tensor([0, 2]), torch.tensor([1, 3]),
                 torch.tensor([4, 4]), torch.tensor([1.0, -1.0], dtype=F64))
    dense = J.to_dense()
    for k, (s, y) in enumerate(pairs):
        H.defer(s, y)
        g = torch.randn(n, generator=gen, dtype=F64)
        sandwich = H.sandwich(J, g)
        w = torch.randn(4, generator=gen, dtype=F64)
        expected = -H.apply(0.7 * g + dense.T @ w)
        free = [slot for slot in range(H.memory + 1) if slot not in H.order]
        if k >= H.memory:          # past the memory: one slot holds the dropped pair
            assert len(free) == 1
            H._W[2 * free[0]:2 * free[0] + 2] = float("nan")
        assert torch.allclose(sandwich.direction(0.7, w), expected, rtol=1e-11, atol=1e-12)
        if free:
            H._W[2 * free[0]:2 * free[0] + 2] = 0.0    # (rows not in use hold zeros or an accepted pair)


def _lagrangian_pairs(n, m, points, seed, g_offset=0.0):
    """Gradients ``g_k``, Jacobians ``J_k`` at ``points`` points and the pairs of the change of ``μ f + wᵀc`` between
    neighbours, ``y = μ (g₁ − g₀) + (J₁ − J₀)ᵀ w``, with ``s = M y`` (M SPD: positive curvature, no damping);
    ``g_offset`` adds a large common part to every gradient (it cancels in y)."""
    from constrained_optim.jacobian import Jacobian
    gen = torch.Generator().manual_seed(seed)
    M = _spd(n, gen, 0.5, 2.0)
    common = g_offset * torch.randn(n, generator=gen, dtype=F64)
    gs = [common + torch.randn(n, generator=gen, dtype=F64) for _ in range(points)]
    Js = [Jacobian.from_dense(torch.randn(m, n, generator=gen, dtype=F64)) for _ in range(points)]
    mu, ws = 0.3, [torch.randn(m, generator=gen, dtype=F64) for _ in range(points)]
    ys = [mu * (gs[k] - gs[k - 1]) + (Js[k].to_dense() - Js[k - 1].to_dense()).T @ ws[k] for k in range(1, points)]
    return mu, gs, Js, ws, [(M @ y, y) for y in ys]


def _run_lagrangian_pairs(mu, gs, Js, ws, pairs, at=lambda g, J, k: (g, J), between=lambda H, k: None):
    """An operator given the pairs by plain ``defer`` and one given each pair's ``GradientChange``, both sandwiched
    at every point k with ``at(g_k, J_k, k)`` (then ``between(H, k)`` on each); returns both and, per point, the two
    sandwiches' ``(J H Jᵀ, J H g, direction(0.7, w))``."""
    from constrained_optim.hessian import GradientChange
    n = gs[0].numel()
    plain, changed = LBFGS(n, F64, CPU, memory=3), LBFGS(n, F64, CPU, memory=3)

    def data(sandwich, k):
        return sandwich.M, sandwich.JHg, sandwich.direction(0.7, ws[k])
    sandwiches = [(data(plain.sandwich(Js[0], gs[0]), 0), data(changed.sandwich(Js[0], gs[0]), 0))]
    point = [at(gs[k], Js[k], k) for k in range(len(gs))]
    for k, (s, y) in enumerate(pairs, start=1):
        plain.defer(s, y)
        changed.defer(s.clone(), y.clone(), GradientChange(mu, gs[k - 1], Js[k - 1], gs[k], Js[k], ws[k]))
        g, J = point[k]
        sandwiches.append((data(plain.sandwich(J, g), k), data(changed.sandwich(J, g), k)))
        between(plain, k)
        between(changed, k)
    return plain, changed, sandwiches


def test_deferred_change_of_gradients_takes_wty_from_the_two_sandwiches(monkeypatch):
    """With the ``GradientChange`` of its y, a deferred pair's ``Wᵀy`` is formed from the products of the sandwich
    before and the one after (``μ (Wᵀg₁ − Wᵀg₀) + (J₁W − J₀W)ᵀ w``, no product with y in the pass): the operator, the
    QP data and the directions are those of the pairs multiplied directly, past the memory (slots reused)."""
    used = []
    original = LBFGS._change_products
    monkeypatch.setattr(LBFGS, "_change_products", lambda self, *a: used.append(1) or original(self, *a))
    n, m = 11, 3
    mu, gs, Js, ws, pairs = _lagrangian_pairs(n, m, points=8, seed=31)
    plain, changed, sandwiches = _run_lagrangian_pairs(mu, gs, Js, ws, pairs)
    assert len(used) == len(pairs) - 1          # every pair but the first (nothing stored to take products from)
    assert changed.order == plain.order and changed.updates == plain.updates == len(pairs)
    for first, second in sandwiches:
        for a, b in zip(first, second):
            assert torch.allclose(b, a, rtol=1e-11, atol=1e-12)
    assert torch.allclose(_matrix(changed, n), _matrix(plain, n), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case", ["cancellation", "another gradient", "another Jacobian"])
def test_deferred_change_of_gradients_falls_back_to_the_product_with_y(case, monkeypatch):
    """The difference of products is not used where it would cancel: gradients 10⁹ times larger than their changes
    (its rounding would be ~10⁹ times that of a direct product); nor where the sandwich is not at the change's
    point (at every other point, a gradient or a Jacobian equal to the change's but not the same tensors): then y
    is multiplied in the pass, bit for bit as without the change."""
    from constrained_optim.jacobian import Jacobian
    used = []
    original = LBFGS._change_products
    monkeypatch.setattr(LBFGS, "_change_products", lambda self, *a: used.append(1) or original(self, *a))
    n, m = 11, 3
    offset, at = {"cancellation": (1e9, lambda g, J, k: (g, J)),
                  "another gradient": (0.0, lambda g, J, k: (g.clone() if k % 2 else g, J)),
                  "another Jacobian": (0.0, lambda g, J, k: (g, Jacobian.from_dense(J.to_dense()) if k % 2 else J)),
                  }[case]
    mu, gs, Js, ws, pairs = _lagrangian_pairs(n, m, points=6, seed=32, g_offset=offset)
    plain, changed, sandwiches = _run_lagrangian_pairs(mu, gs, Js, ws, pairs, at)
    assert not used
    for first, second in sandwiches:
        assert all(torch.equal(b, a) for a, b in zip(first, second))
    assert torch.equal(_matrix(changed, n), _matrix(plain, n))


def test_deferred_change_of_gradients_needs_the_rows_the_last_sandwich_multiplied(monkeypatch):
    """A pair stored between two sandwiches (by ``update``) changes rows of W that the last sandwich's products do
    not cover: the next deferred pair's y is multiplied in the pass; the other pairs take the difference."""
    used = []
    original = LBFGS._change_products
    monkeypatch.setattr(LBFGS, "_change_products", lambda self, *a: used.append(1) or original(self, *a))
    n, m = 11, 3
    mu, gs, Js, ws, pairs = _lagrangian_pairs(n, m, points=6, seed=33)
    extra = pairs[0]
    plain, changed, sandwiches = _run_lagrangian_pairs(
        mu, gs, Js, ws, pairs, between=lambda H, k: H.update(extra[0].clone(), extra[1].clone()) if k == 2 else None)
    assert len(used) == len(pairs) - 2          # not the first pair, nor the one after the update
    for first, second in sandwiches:
        for a, b in zip(first, second):
            assert torch.allclose(b, a, rtol=1e-11, atol=1e-12)
    assert torch.allclose(_matrix(changed, n), _matrix(plain, n), rtol=1e-11, atol=1e-12)


def test_deferred_change_of_gradients_keeps_no_point_alive(monkeypatch):
    """The change holds its points by weak reference: a pair deferred at the end of a run (never joined) does not
    keep the previous point's Jacobian (at large n and m the largest object of a run) alive; once that point is gone,
    the pair joins by the product with y, as without the change."""
    import gc
    import weakref
    from constrained_optim.hessian import GradientChange
    used = []
    original = LBFGS._change_products
    monkeypatch.setattr(LBFGS, "_change_products", lambda self, *a: used.append(1) or original(self, *a))
    n, m = 11, 3
    mu, gs, Js, ws, pairs = _lagrangian_pairs(n, m, points=3, seed=34)
    plain, changed = LBFGS(n, F64, CPU, memory=3), LBFGS(n, F64, CPU, memory=3)
    for H in (plain, changed):
        H.update(*pairs[0])
        H.sandwich(Js[1], gs[1])
    plain.defer(*pairs[1])
    changed.defer(pairs[1][0].clone(), pairs[1][1].clone(), GradientChange(mu, gs[1], Js[1], gs[2], Js[2], ws[2]))
    gone = weakref.ref(Js[1])
    Js[1] = gs[1] = None
    gc.collect()
    assert gone() is None
    first, second = plain.sandwich(Js[2], gs[2]), changed.sandwich(Js[2], gs[2])
    assert not used
    assert torch.equal(second.M, first.M) and torch.equal(_matrix(changed, n), _matrix(plain, n))
