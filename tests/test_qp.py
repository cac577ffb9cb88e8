"""Tests for constrained_optim.qp: KKT accuracy, exact oracles, batching, statuses, validation."""

import itertools

import numpy as np
import pytest
from conftest import require_qpth
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrained_optim.qp import QPResult, QPStatus, solve_box_qp, solve_qp

F64 = torch.float64
FAST = settings(max_examples=15, deadline=None)


def objective(Q, p, z):
    return 0.5 * z @ Q @ z + p @ z


def random_psd(rng, n, rank, scales=None):
    J = rng.standard_normal((n, rank))
    Q = J @ J.T
    if scales is not None:
        Q = scales[:, None] * Q * scales[None, :]
    return Q


def box_oracle(Q, p, lo, up):
    """Exact minimum by enumerating, per variable, {at lower, at upper, free} (n <= 5)."""
    n = len(p)
    best = np.inf
    for choice in itertools.product(range(3), repeat=n):
        fixed = np.array([c < 2 for c in choice])
        if any(c == 0 and not np.isfinite(lo[i]) or c == 1 and not np.isfinite(up[i]) for i, c in enumerate(choice)):
            continue
        z = np.where(np.array(choice) == 0, lo, np.where(np.array(choice) == 1, up, 0.0))
        z = np.where(fixed, z, 0.0)
        free = ~fixed
        if free.any():
            rhs = -(p[free] + Q[np.ix_(free, fixed)] @ z[fixed])
            sol = np.linalg.lstsq(Q[np.ix_(free, free)], rhs, rcond=None)[0]
            if np.abs(Q[np.ix_(free, free)] @ sol - rhs).max() > 1e-9 * (1 + np.abs(rhs).max()):
                continue
            z[free] = sol
        if (z < lo - 1e-9).any() or (z > up + 1e-9).any():
            continue
        g = Q @ z + p
        at_lo = np.array([c == 0 for c in choice])
        at_up = np.array([c == 1 for c in choice])
        if (g[at_lo] < -1e-9).any() or (g[at_up] > 1e-9).any():
            continue
        best = min(best, objective(Q, p, z))
    return best


@st.composite
def box_problems(draw, max_n=5):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, max_n))
    rank = draw(st.integers(0, n))
    scaled = draw(st.booleans())
    scales = 10.0 ** rng.uniform(-4, 4, n) if scaled else None
    Q = random_psd(rng, n, rank, scales)
    kind = rng.integers(0, 3, n)  # 0: [0,1] / [-1, 1], 1: [0, inf), 2: free
    lo = np.where(kind == 2, -np.inf, np.where(rng.random(n) < 0.5, 0.0, -1.0))
    up = np.where(kind == 0, 1.0, np.inf)
    if scales is not None:
        lo, up = lo / scales, up / scales
    # variables with an infinite bound need curvature there to keep the problem bounded
    Q = Q + np.diag(np.where(kind > 0, 1.0 if scales is None else scales**2, 0.0))
    p = rng.standard_normal(n) * (1.0 if scales is None else scales)
    return Q, p, lo, up


def assert_box_matches_oracle(Q, p, lo, up, dtype=F64):
    r = solve_box_qp(*(torch.tensor(x, dtype=dtype) for x in (Q, p, lo, up)))
    assert r.status.item() == QPStatus.SOLVED
    z = r.z.double().numpy()
    ref = box_oracle(Q, p, lo, up)
    assert abs(objective(Q, p, z) - ref) <= 1e-8 * (1 + abs(ref))
    return r


@FAST
@given(box_problems())
def test_box_qp_matches_enumeration_oracle(problem):
    r = assert_box_matches_oracle(*problem)
    assert r.residual.item() <= 1e-9


@st.composite
def constructed_qps(draw, max_n=12):
    """QPs with a known solution: pick z*, an active set, multipliers (some zero: degenerate), then p."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(0, 2 * n))
    k = draw(st.integers(0, max(0, n - 1)))
    rank = draw(st.integers(0, n))
    Q = random_psd(rng, n, rank)
    G, A = rng.standard_normal((m, n)), rng.standard_normal((k, n))
    z = rng.standard_normal(n)
    active = rng.random(m) < 0.5
    h = G @ z + np.where(active, 0.0, rng.random(m) + 0.1)
    lam = np.where(active & (rng.random(m) < 0.7), rng.random(m), 0.0)
    nu = rng.standard_normal(k)
    p = -(Q @ z + G.T @ lam + A.T @ nu)
    return Q, p, G, h, A, A @ z, z


@FAST
@given(constructed_qps())
def test_general_qp_known_solution(problem):
    Q, p, G, h, A, b, z_star = problem
    r = solve_qp(*(torch.tensor(x) for x in (Q, p, G, h, A, b)))
    if np.linalg.matrix_rank(Q) == Q.shape[0]:
        assert r.status.item() == QPStatus.SOLVED, r
    else:
        # a singular Q with degenerate multipliers can make the optimal set a whole face (an LP with
        # p parallel to an active row); the interior point method then loses strict complementarity and
        # may stop at a residual of ~1e-10 with MAX_ITER (found by hypothesis: 2 of ~40 seeds), which
        # is an honest status; the point must still be optimal
        assert r.status.item() in (QPStatus.SOLVED, QPStatus.MAX_ITER), r
    assert r.residual.item() <= 1e-9
    ref = objective(Q, p, z_star)
    assert abs(objective(Q, p, r.z.numpy()) - ref) <= 1e-8 * (1 + abs(ref) + np.abs(p).max())
    assert (r.lam >= 0).all()


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.sampled_from([torch.float32, torch.float64]))
def test_box_known_solution_batched(seed, n, dtype):
    rng = np.random.default_rng(seed)
    B = 3
    Q = np.stack([random_psd(rng, n, rng.integers(0, n + 1)) for _ in range(B)])
    if dtype == torch.float32:  # rounding p would make a singular problem with free variables unbounded
        Q = Q + np.eye(n)
    lo, up = np.zeros((B, n)), np.ones((B, n))
    up[:, : n // 3] = np.inf
    lo[:, : n // 5] = -np.inf
    z = np.clip(rng.standard_normal((B, n)), lo, up)
    at = rng.random((B, n)) < 0.5
    z = np.where(at & np.isfinite(lo), lo, z)
    mul = np.where(at & np.isfinite(lo) & (rng.random((B, n)) < 0.7), rng.random((B, n)), 0.0)
    p = -(np.einsum("bij,bj->bi", Q, z) - mul)
    Qt, pt, lot, upt = (torch.tensor(x).to(dtype) for x in (Q, p, lo, up))
    r = solve_box_qp(Qt, pt, lot, upt)
    assert r.z.dtype == dtype and r.residual.dtype == F64
    assert r.solved.all()
    assert (r.residual <= 1e-9).all()
    Qd, pd = Qt.double().numpy(), pt.double().numpy()
    for i in range(B):
        ref = objective(Qd[i], pd[i], z[i])
        got = objective(Qd[i], pd[i], r.z[i].double().numpy())
        assert got <= ref + (1e-8 if dtype == F64 else 1e-4) * (1 + abs(ref) + np.abs(pd[i]).sum())


def test_float32_is_float64_answer_rounded():
    rng = np.random.default_rng(1)
    Q = torch.tensor(random_psd(rng, 6, 6) + np.eye(6), dtype=torch.float32)
    p = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.float32)
    r32 = solve_box_qp(Q, p, 0.0, 1.0)
    r64 = solve_box_qp(Q.double(), p.double(), 0.0, 1.0)
    assert r32.z.dtype == torch.float32 and r32.lam.dtype == torch.float32
    assert torch.equal(r32.z, r64.z.float())
    G = torch.cat([torch.eye(6), -torch.eye(6)])
    h = torch.ones(12)
    g32 = solve_qp(Q, p, G, h)
    g64 = solve_qp(Q.double(), p.double(), G.double(), h.double())
    torch.testing.assert_close(g32.z, g64.z.float(), rtol=2e-7, atol=2e-7)


def test_broadcast_shared_Q_matches_per_problem():
    rng = np.random.default_rng(2)
    Q = torch.tensor(random_psd(rng, 5, 3))
    p = torch.tensor(rng.standard_normal((2, 3, 5)))
    r = solve_box_qp(Q, p, -1.0, torch.ones(5))
    assert r.z.shape == (2, 3, 5) and r.lam.shape == (2, 3, 10) and r.status.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        one = solve_box_qp(Q, p[i, j], -1.0, 1.0)
        assert abs(objective(Q, p[i, j], one.z) - objective(Q, p[i, j], r.z[i, j])) < 1e-10



def test_sqp_dual_badly_scaled_singular():
    rng = np.random.default_rng(3)
    for m in (1, 3, 10, 40):
        J = rng.standard_normal((m, max(1, m // 2)))
        J[:, 0] *= 1e4
        J[0] *= 1e-4
        M = torch.tensor(np.stack([J @ J.T, J @ J.T * 1e-8]))
        q = torch.tensor(rng.standard_normal((2, m)))
        lo = torch.zeros(m, dtype=F64)
        lo[: m // 2] = -1.0
        r = solve_box_qp(M, q, lo, 1.0)
        assert r.solved.all() and (r.residual <= 1e-9).all()


@pytest.mark.parametrize("tiny", [1e-16, 1e-14, 0.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_row_of_rounding_size_is_not_scaled_up(seed, tiny):
    # Q = J Jᵀ of the SQP's dual where one row of J vanishes at x up to rounding (hs108: ∇(x₉² − 1) at x₉ ≈ 1e-15),
    # with an O(1) linear term: equilibrating that row by 1/√Q_ii (≈ 1e16) made its linear term the scale of every
    # residual, and z = 0 was returned as SOLVED with the true minimum below
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((6, 4))
    J[1] *= tiny
    Q, p = J @ J.T, rng.standard_normal(6)
    p[1] = 1.0
    lo, up = np.zeros(6), np.ones(6)
    ref = box_oracle(Q, p, lo, up)
    assert ref < -1e-3
    assert_box_matches_oracle(Q, p, lo, up)
    eye = np.eye(6)
    r = solve_qp(*(torch.tensor(a) for a in (Q, p, np.r_[-eye, eye], np.r_[-lo, up])))
    assert r.solved.all() and abs(objective(Q, p, r.z.numpy()) - ref) <= 1e-8 * (1 + abs(ref))


def test_infinite_bounds_mixes():
    rng = np.random.default_rng(4)
    n = 8
    J = rng.standard_normal((n, 4))
    Q = torch.tensor(J @ J.T + np.diag(rng.random(n) ** 2 + 0.1))
    p = torch.tensor(rng.standard_normal(n))
    lo = torch.tensor([0.0, 0.0, 0.0, 0.0, -np.inf, -np.inf, -np.inf, -np.inf])
    r = solve_box_qp(Q, p, lo, torch.inf)
    assert r.solved and r.residual <= 1e-9
    assert (r.z[:4] >= 0).all() and (r.lam[4:8] == 0).all() and (r.lam[8:] == 0).all()
    g = Q @ r.z + p
    torch.testing.assert_close(g[4:], torch.zeros(4, dtype=F64), atol=1e-10, rtol=0)
    r = solve_box_qp(Q, p, -torch.inf, torch.inf)  # unconstrained
    torch.testing.assert_close(r.z, torch.linalg.solve(Q, -p))


def test_simplex_gram_matrix():
    rng = np.random.default_rng(5)
    n = 120
    Gm = rng.standard_normal((6, n))
    Q = torch.tensor(Gm.T @ Gm)  # rank 6
    p = torch.zeros(n, dtype=F64)
    r = solve_qp(Q, p, -torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64), torch.ones(1, n, dtype=F64), torch.ones(1, dtype=F64))
    assert r.solved and r.residual <= 1e-9
    assert abs(r.z.sum() - 1) < 1e-12 and (r.z >= -1e-12).all()
    # nonnegative least-squares cross-check of the min-norm point of the convex hull (scipy nnls on
    # the augmented system ||Gm w||^2 + big (sum w - 1)^2)
    scipy_opt = pytest.importorskip("scipy.optimize")
    big = 1e4
    w, _ = scipy_opt.nnls(np.vstack([Gm, big * np.ones((1, n))]), np.r_[np.zeros(6), big])
    assert objective(Q.numpy(), p.numpy(), r.z.numpy()) <= objective(Q.numpy(), p.numpy(), w / w.sum()) + 1e-8


def test_infeasible_problems():
    Q = torch.eye(2, dtype=F64).expand(3, 2, 2)
    p = torch.zeros(3, 2, dtype=F64)
    lo = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], dtype=F64)
    r = solve_box_qp(Q, p, lo, 1.0)
    assert r.status.tolist() == [QPStatus.SOLVED, QPStatus.INFEASIBLE, QPStatus.SOLVED]
    assert r.z.isfinite().all()
    # contradictory inequalities (z1 <= 0, z1 >= 1) and contradictory equalities
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    h = torch.tensor([[0.0, -1.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    r = solve_qp(Q, p, G, h)
    assert r.status.tolist() == [QPStatus.INFEASIBLE, QPStatus.SOLVED, QPStatus.SOLVED]
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    b = torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 1.0]], dtype=F64)
    r = solve_qp(Q, p, A=A, b=b)
    assert r.status.tolist() == [QPStatus.INFEASIBLE, QPStatus.SOLVED, QPStatus.SOLVED]
    torch.testing.assert_close(r.z[1], torch.tensor([0.5, 0.5], dtype=F64))


def test_nan_and_singular_elements_do_not_affect_others():
    rng = np.random.default_rng(6)
    m = 6
    J = rng.standard_normal((4, m, m))
    M = torch.tensor(J @ J.transpose(0, 2, 1))
    M[2] = 0.0  # singular (zero) matrix: an LP over the box
    q = torch.tensor(rng.standard_normal((4, m)))
    alone = [solve_box_qp(M[i], q[i], 0.0, 1.0) for i in range(4)]
    M[1, 0, 0] = torch.nan
    r = solve_box_qp(M, q, 0.0, 1.0)
    assert r.status[1] == QPStatus.NUMERICAL
    assert r.z.isfinite().all() and r.lam.isfinite().all()
    for i in (0, 2, 3):
        assert r.status[i] == QPStatus.SOLVED
        torch.testing.assert_close(r.z[i], alone[i].z, atol=1e-12, rtol=0)
    G = torch.tensor(rng.standard_normal((4, 3, m)))
    G[3, 1, 2] = torch.inf
    g = solve_qp(M, q, G, torch.ones(4, 3, dtype=F64))
    assert g.status[3] == QPStatus.NUMERICAL and g.z.isfinite().all()
    assert g.solved[0]  # element 2 is an unbounded LP (Q = 0, 3 rows in R^6)
    assert not g.solved[2]


def test_warm_start():
    rng = np.random.default_rng(7)
    m = 30
    J = rng.standard_normal((8, m, m))
    M = torch.tensor(J @ J.transpose(0, 2, 1))
    q = torch.tensor(rng.standard_normal((8, m)))
    cold = solve_box_qp(M, q, 0.0, 1.0)
    warm = solve_box_qp(M, q + 1e-6, 0.0, 1.0, warm_start=cold)
    assert warm.solved.all() and (warm.iterations <= cold.iterations).all()
    assert (warm.iterations == 1).all()
    G = torch.tensor(rng.standard_normal((10, m)))
    cold = solve_qp(M, q, G, torch.ones(10, dtype=F64))
    warm = solve_qp(M, q, G, torch.ones(10, dtype=F64), warm_start=cold)
    assert warm.solved.all() and (warm.iterations == 0).all()
    torch.testing.assert_close(warm.z, cold.z, atol=1e-9, rtol=0)



def test_warm_start_of_a_large_batch_solves_the_running_elements_alone(monkeypatch):
    """A warm start that is right for most of a batch of 64 (the active-set iterations then go on with the running
    elements only) gives each element the answer it gets alone."""
    import constrained_optim.qp._box as box
    rng = np.random.default_rng(8)
    B, m = 64, 12
    J = rng.standard_normal((B, m, m))
    M = torch.tensor(J @ J.transpose(0, 2, 1))
    q = torch.tensor(rng.standard_normal((B, m)))
    cold = solve_box_qp(M, q, 0.0, 1.0)
    shift = torch.zeros(B, m, dtype=F64)
    shift[::8] = torch.tensor(rng.standard_normal((B // 8, m)))   # 8 of the 64 change their active set
    sizes = []
    real = box._reduced_solve

    def spy(S, *args):
        sizes.append(len(S.Q))
        return real(S, *args)
    monkeypatch.setattr(box, "_reduced_solve", spy)
    warm = solve_box_qp(M, q + shift, 0.0, 1.0, warm_start=cold)
    assert sizes[0] == B and any(0 < size <= B // 2 for size in sizes[1:])
    assert warm.solved.all() and (warm.iterations[1::8] == 1).all() and (warm.iterations[::8] > 1).any()
    for b in range(B):
        alone = solve_box_qp(M[b], q[b] + shift[b], 0.0, 1.0)
        torch.testing.assert_close(warm.z[b], alone.z, atol=1e-9, rtol=0)

def test_result_structure_and_unconstrained():
    Q = torch.eye(3, dtype=F64) * 2
    p = torch.tensor([2.0, -4.0, 0.0], dtype=F64)
    r = solve_qp(Q, p)
    assert isinstance(r, QPResult)
    torch.testing.assert_close(r.z, torch.tensor([-1.0, 2.0, 0.0], dtype=F64))
    assert r.lam.shape == (0,) and r.nu.shape == (0,) and r.status.dtype == torch.int64
    assert r.iterations.dtype == torch.int64 and r.solved.dtype == torch.bool


def test_validation_errors():
    Q, p = torch.eye(2), torch.zeros(2)
    with pytest.raises(TypeError):
        solve_qp(Q.long(), p)
    with pytest.raises(TypeError):
        solve_box_qp(Q, [0.0, 0.0], 0.0, 1.0)
    with pytest.raises(ValueError):
        solve_qp(torch.eye(3), p)
    with pytest.raises(ValueError):
        solve_qp(Q, p, G=torch.ones(1, 3), h=torch.ones(1))
    with pytest.raises(ValueError):
        solve_qp(Q, p, G=torch.ones(1, 2))
    with pytest.raises(ValueError):
        solve_box_qp(Q, torch.zeros(3, 2), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError):
        solve_box_qp(Q, p, torch.zeros(3), 1.0)
    with pytest.raises(ValueError):
        solve_qp(Q, p.to("meta"))
    with pytest.raises(ValueError):
        solve_qp(Q, p, backend="nope")


@pytest.mark.qpth
def test_qpth_backend_matches_builtin():
    require_qpth()
    rng = np.random.default_rng(8)
    m = 6
    J = rng.standard_normal((4, m, m + 2))
    M = torch.tensor(J @ J.transpose(0, 2, 1))
    q = torch.tensor(rng.standard_normal((4, m)))
    lo = torch.zeros(4, m, dtype=F64)
    lo[1, :2] = -torch.inf
    ours = solve_box_qp(M, q, lo, 1.0)
    theirs = solve_box_qp(M, q, lo, 1.0, backend="qpth")
    assert theirs.lam.shape == ours.lam.shape
    torch.testing.assert_close(theirs.z, ours.z, atol=1e-6, rtol=0)
    G = torch.tensor(rng.standard_normal((3, m)))
    ours = solve_qp(M, q, G, torch.ones(3, dtype=F64))
    theirs = solve_qp(M, q, G, torch.ones(3, dtype=F64), backend="qpth")
    torch.testing.assert_close(theirs.z, ours.z, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# the box QPs an SQP method produces: rank-deficient M = J Jᵀ (more constraints than variables),
# and multiplier fits with one-sided / free variables and singular Q


def sqp_dual_batch(rng, B, m, r, scaled=False):
    """M = J Jᵀ (J: m x r, so rank r < m), q, bounds [0, 1] (inequalities) / [-1, 1] (equalities)."""
    J = rng.standard_normal((B, m, r))
    if scaled:  # rows and columns of J at very different scales
        J = J * 10.0 ** rng.uniform(-4, 4, (B, m, 1))
    M = J @ J.transpose(0, 2, 1)
    q = rng.standard_normal((B, m)) * np.sqrt(np.abs(np.diagonal(M, axis1=1, axis2=2)) + 1)
    lo = np.where(rng.random((B, m)) < 0.5, 0.0, -1.0)
    return M, q, lo, np.ones((B, m))


def multiplier_fit_batch(rng, B, m, r):
    """Q = J Jᵀ + diag(κ²) (κ = 0 on some rows: singular), p = J g (bounded below), lower in {0, -inf}."""
    J = rng.standard_normal((B, m, r))
    kappa = np.where(rng.random((B, m)) < 0.5, 0.0, rng.random((B, m)))
    Q = J @ J.transpose(0, 2, 1) + np.einsum("bi,ij->bij", kappa**2, np.eye(m))
    p = np.einsum("bij,bj->bi", J, rng.standard_normal((B, r)))
    lo = np.where(rng.random((B, m)) < 0.5, 0.0, -np.inf)
    return Q, p, lo, np.full((B, m), np.inf)


def assert_box_kkt(Q, p, lo, up, r, tol=1e-9):
    assert r.solved.all(), (r.status, r.residual)
    assert (r.residual <= tol).all()
    z = r.z.numpy()
    assert (z >= lo).all() and (z <= up).all()  # returned points are exactly feasible
    m = p.shape[-1]
    lam_l, lam_u = r.lam[..., :m].numpy(), r.lam[..., m:].numpy()
    assert (lam_l >= 0).all() and (lam_u >= 0).all()
    assert (lam_l[~np.isfinite(lo)] == 0).all() and (lam_u[~np.isfinite(up)] == 0).all()


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 5), st.booleans(), st.booleans())
def test_rank_deficient_box_qps_match_oracle(seed, B, m, fit, scaled):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(0, m)) if m > 1 else 0  # rank < m
    Q, p, lo, up = multiplier_fit_batch(rng, B, m, max(r, 1)) if fit else sqp_dual_batch(rng, B, m, max(r, 1), scaled)
    res = solve_box_qp(*(torch.tensor(x) for x in (Q, p, lo, up)))
    assert_box_kkt(Q, p, lo, up, res)
    for i in range(B):
        ref = box_oracle(Q[i], p[i], lo[i], up[i])
        got = objective(Q[i], p[i], res.z[i].numpy())
        assert got <= ref + 1e-8 * (1 + abs(ref) + np.abs(p[i]).sum())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 16, 64]), st.integers(6, 60), st.booleans())
def test_rank_deficient_box_qps_kkt(seed, B, m, fit):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, m))
    Q, p, lo, up = multiplier_fit_batch(rng, B, m, r) if fit else sqp_dual_batch(rng, B, m, r, bool(seed % 2))
    res = solve_box_qp(*(torch.tensor(x) for x in (Q, p, lo, up)))
    assert_box_kkt(Q, p, lo, up, res)


def test_sqp_shapes_many_constraints_few_variables():
    rng = np.random.default_rng(9)
    for B, m, r in ((1, 9, 2), (1, 40, 23), (4, 50, 25), (16, 10, 3), (2, 3, 1)):
        Q, p, lo, up = sqp_dual_batch(rng, B, m, r)
        assert_box_kkt(Q, p, lo, up, solve_box_qp(*(torch.tensor(x) for x in (Q, p, lo, up))), tol=1e-10)
        Q, p, lo, up = multiplier_fit_batch(rng, B, m, r)
        assert_box_kkt(Q, p, lo, up, solve_box_qp(*(torch.tensor(x) for x in (Q, p, lo, up))), tol=1e-10)


def test_fixed_variables_and_per_element_statuses():
    # lower == upper fixes a variable (the multiplier fit pins inactive constraints this way)
    rng = np.random.default_rng(10)
    m = 7
    J = rng.standard_normal((4, m, 3))
    Q = torch.tensor(J @ J.transpose(0, 2, 1))
    p = torch.tensor(rng.standard_normal((4, m)))
    lo = torch.zeros(4, m, dtype=F64)
    lo[:, 3:] = -torch.inf
    up = torch.full((4, m), torch.inf, dtype=F64)
    up[:, :2] = 0.0  # z_0 = z_1 = 0
    up[:, 5] = 2.0
    lo[:, 5] = 2.0  # z_5 = 2
    p[:, 3:] = 0.0
    Q[:, 3:, :] = 0.0
    Q[:, :, 3:] = 0.0
    Q[:, 3:, 3:] = torch.eye(m - 3, dtype=F64)
    p[2, 0] = torch.nan
    lo[3, 4] = 5.0
    up[3, 4] = 4.0
    r = solve_box_qp(Q, p, lo, up)
    assert r.status.tolist() == [QPStatus.SOLVED, QPStatus.SOLVED, QPStatus.NUMERICAL, QPStatus.INFEASIBLE]
    assert r.z.isfinite().all() and r.lam.isfinite().all()
    assert (r.z[:2, :2] == 0).all() and (r.z[:2, 5] == 2).all()
    for i in range(2):
        ref = box_oracle(Q[i].numpy(), p[i].numpy(), lo[i].numpy(), up[i].numpy())
        assert abs(objective(Q[i].numpy(), p[i].numpy(), r.z[i].numpy()) - ref) <= 1e-9 * (1 + abs(ref))


@pytest.mark.parametrize("seed", range(3))
def test_one_variable_box_qps_match_the_iterative_solver(seed):
    """A box QP in one variable with q > 0 is solved in closed form, z = clamp(−p/q, l, u): the same answer and
    multipliers as the iterative solver gives the same problem as the first coordinate of a decoupled pair (a
    diagonal Q of size 2, which the closed form does not take), with scales of q and p from 1e-6 to 1e6, infinite
    and equal bounds, minimisers inside, on and beyond the bounds."""
    gen = torch.Generator().manual_seed(seed)
    B = 600
    q = torch.rand(B, generator=gen, dtype=F64) * 10.0 ** torch.randint(-6, 7, (B,), generator=gen).to(F64)
    p = torch.randn(B, generator=gen, dtype=F64) * 10.0 ** torch.randint(-4, 5, (B,), generator=gen).to(F64)
    lo = torch.randn(B, generator=gen, dtype=F64)
    up = lo + 3 * torch.rand(B, generator=gen, dtype=F64)
    kind = torch.randint(0, 6, (B,), generator=gen)
    lo = torch.where((kind == 0) | (kind == 2), -torch.inf, lo)
    up = torch.where((kind == 1) | (kind == 2), torch.inf, torch.where(kind == 3, lo, up))
    lo[:3], up[:3], p[:3] = 1.0, 2.0, -q[:3] * torch.tensor([1.0, 2.0, 1.5], dtype=F64)  # minimiser on l, on u, inside
    one = solve_box_qp(q[:, None, None], p[:, None], lo[:, None], up[:, None])
    Q2 = torch.diag_embed(torch.stack([q, torch.ones_like(q)], -1))
    two = solve_box_qp(Q2, torch.stack([p, torch.zeros_like(p)], -1), torch.stack([lo, -torch.ones_like(lo)], -1),
                       torch.stack([up, torch.ones_like(up)], -1))
    assert bool(one.solved.all()) and bool(two.solved.all())
    assert float(one.residual.max()) <= 1e-14
    scale = torch.maximum(one.z[:, 0].abs(), torch.ones(B, dtype=F64))
    assert float(((one.z[:, 0] - two.z[:, 0]).abs() / scale).max()) <= 1e-12
    lam_scale = torch.maximum(one.lam.abs().amax(-1), torch.ones(B, dtype=F64))
    assert float(((one.lam[:, 0] - two.lam[:, 0]).abs() / lam_scale).max()) <= 1e-10    # at z >= l
    assert float(((one.lam[:, 1] - two.lam[:, 2]).abs() / lam_scale).max()) <= 1e-10    # at z <= u
    assert torch.allclose(one.z[:3, 0], torch.tensor([1.0, 2.0, 1.5], dtype=F64), rtol=1e-15, atol=0)


def test_one_variable_without_curvature_takes_the_iterative_solver():
    """q = 0 (a linear objective) or q < 0 has no closed-form minimiser of the parabola: the iterative solver answers
    (the bound that p points to; an unbounded direction is not SOLVED)."""
    r = solve_box_qp(torch.zeros(3, 1, 1, dtype=F64), torch.tensor([[2.0], [-1.0], [1.0]], dtype=F64),
                     torch.tensor([[-1.0], [-1.0], [-torch.inf]], dtype=F64), torch.tensor([[3.0], [0.5], [1.0]], dtype=F64))
    assert r.status.tolist() == [QPStatus.SOLVED, QPStatus.SOLVED, QPStatus.MAX_ITER]
    assert torch.allclose(r.z[:2, 0], torch.tensor([-1.0, 0.5], dtype=F64), atol=1e-9)


def test_one_variable_closed_form_answers_only_regular_batches():
    """The closed form answers a batch only when every element has q > 0 and l <= u and its answer checks out;
    otherwise the general path gives each element its status: NaN data NUMERICAL, an empty interval and a lower
    bound of +inf INFEASIBLE, a concave parabola (q < 0, whose stationary point is its maximum) the bound of least
    value. −p/q beyond the floating-point range (q = 1e-300, p = 1e10) stops at the bound it points to. The
    regular element gets the same answer either way."""
    Q = torch.tensor([2.0, 2.0, 2.0, 2.0, 1e-300, -2.0], dtype=F64)[:, None, None]
    p = torch.tensor([1.0, float("nan"), 1.0, 1.0, 1e10, 1.0], dtype=F64)[:, None]
    lo = torch.tensor([0.0, 0.0, 1.0, float("inf"), -1.0, -1.0], dtype=F64)[:, None]
    up = torch.tensor([1.0, 1.0, 0.0, float("inf"), 1.0, 1.0], dtype=F64)[:, None]
    mixed = solve_box_qp(Q, p, lo, up)
    S, N, I = QPStatus.SOLVED, QPStatus.NUMERICAL, QPStatus.INFEASIBLE
    assert mixed.status.tolist() == [S, N, I, I, S, S]
    assert mixed.z[[0, 4, 5], 0].tolist() == [0.0, -1.0, -1.0]
    assert torch.allclose(mixed.lam[[0, 4], 0], torch.tensor([1.0, 1e10], dtype=F64), rtol=1e-12, atol=0)
    for i in range(1, 6):           # each other element alone with the regular one
        pair = solve_box_qp(Q[[0, i]], p[[0, i]], lo[[0, i]], up[[0, i]])
        assert pair.status.tolist() == [S, mixed.status[i]] and pair.z[0].tolist() == mixed.z[0].tolist()
        if mixed.status[i] == S:
            assert pair.z[1].tolist() == mixed.z[i].tolist()
    regular = solve_box_qp(Q[:1], p[:1], lo[:1], up[:1])
    assert regular.status.tolist() == [S] and regular.iterations.tolist() == [0]     # the closed form
    assert regular.z.tolist() == mixed.z[:1].tolist() and regular.lam.tolist() == mixed.lam[:1].tolist()


def test_one_variable_closed_form_is_solved_only_within_tol():
    """SOLVED means a residual at most tol, for the closed form too: with tol = 0 the answers whose residual is
    rounding (7 of these 100 interior minimisers) go on to the general path, which does not call them solved."""
    gen = torch.Generator().manual_seed(0)
    q, p = torch.rand(100, generator=gen, dtype=F64) + 0.1, torch.randn(100, generator=gen, dtype=F64)
    r = solve_box_qp(q[:, None, None], p[:, None], -100.0, 100.0, tol=0.0)
    assert int((r.residual > 0).sum()) > 0
    assert bool((r.residual[r.solved] == 0).all())
    assert torch.allclose(r.z[:, 0], -p / q, rtol=1e-12, atol=1e-15)
