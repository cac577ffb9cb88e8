"""The nonsmooth research examples run in CI: ``main(["--quick"])`` of each returns 0 (each checks its own
answer against an independent oracle: eigenvalue against an LP and a dual bound, robust_pca against ADMM,
tv_denoising against the bounded least-squares dual). The oracles themselves are checked here on cases
with closed-form answers, without the library."""
import importlib
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", ["eigenvalue", "robust_pca", "tv_denoising"])
def test_example_quick(name):
    assert _example(name).main(["--quick"]) == 0


@pytest.mark.parametrize("quick", [True, False])
def test_eigenvalue_lp_recovers_the_planted_optimum(quick):
    eigenvalue = _example("eigenvalue")
    m, k = eigenvalue.SIZES[quick]
    q, d0, d, x_star, t_star = eigenvalue.planted_data(m, k)
    t, x = eigenvalue.lp_oracle(d0, d)
    assert t == pytest.approx(t_star, abs=1e-12)
    np.testing.assert_allclose(x, x_star, atol=1e-9)
    # k eigenvalues of A(x*) coalesce at t*, the (k+1)-th is below
    values = np.linalg.eigvalsh(q @ np.diag(d0 + x_star @ d) @ q.T)
    np.testing.assert_allclose(values[-k:], t_star, atol=1e-12)
    assert values[-k - 1] < t_star - 0.1


def test_eigenvalue_dual_bound_is_a_lower_bound():
    eigenvalue = _example("eigenvalue")
    problem, radius = eigenvalue.build_noncommuting(True)
    a = problem.model.a.numpy()
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(a.shape[0] - 1)
    bound = eigenvalue.dual_lower_bound(a, radius, radius * x0 / np.linalg.norm(x0))
    for _ in range(200):
        x = rng.standard_normal(a.shape[0] - 1)
        x *= radius * rng.uniform() ** (1 / x.size) / np.linalg.norm(x)      # uniform in the ball
        assert np.linalg.eigvalsh(a[0] + np.tensordot(x, a[1:], 1))[-1] >= bound - 1e-12


def test_robust_pca_admm_on_a_diagonal_matrix():
    # M diagonal: pinching L to its diagonal lowers ‖L‖_* and does not raise ‖M − L‖₁, so the problem
    # separates into min |l| + λ|mᵢ − l| per diagonal entry: f* = min(1, λ) Σ|mᵢ|
    robust_pca = _example("robust_pca")
    m = np.diag([3.0, -1.5, 0.7, 2.2, -0.4])
    lam = 1 / np.sqrt(5)
    upper, lower, low_rank, _ = robust_pca.admm_oracle(m, lam)
    assert upper == pytest.approx(lam * np.abs(m).sum(), abs=1e-10)
    assert lower <= upper + 1e-12
    assert upper - lower <= 1e-10


def test_robust_pca_admm_bracket_and_feasible_points():
    robust_pca = _example("robust_pca")
    upper, lower, low_rank, _ = robust_pca.oracle(True)
    n, rank, _ = robust_pca.SIZES[True]
    m, lam = robust_pca.data(n, rank), 1 / np.sqrt(n)
    assert lower <= upper and upper - lower <= 1e-10 * upper
    for candidate in (np.zeros_like(m), m, m / 2, low_rank + 1e-3):
        value = np.linalg.svd(candidate, compute_uv=False).sum() + lam * np.abs(m - candidate).sum()
        assert value >= lower - 1e-12


def test_tv_dual_oracle_closed_forms():
    tv = _example("tv_denoising")
    y = tv.signal(30)
    # λ → 0: ‖x* − y‖∞ = ‖Dᵀu*‖∞ <= 2λ (lsq_linear needs lower < upper, so not λ = 0 itself)
    primal, dual, x_star = tv.dual_oracle(y, 1e-9)
    np.testing.assert_allclose(x_star, y, atol=2e-9)
    assert primal <= 1e-9 * np.abs(np.diff(y)).sum() + 1e-15
    # λ >= max |cumsum(y − ȳ)|: x* is the constant ȳ (u = cumsum(y − ȳ) is dual feasible, Dᵀu = y − ȳ)
    lam = np.abs(np.cumsum(y - y.mean())[:-1]).max() * 1.01
    primal, dual, x_star = tv.dual_oracle(y, lam)
    np.testing.assert_allclose(x_star, y.mean(), atol=1e-10)
    assert primal == pytest.approx(0.5 * np.sum((y - y.mean()) ** 2), rel=1e-12)
    assert dual == pytest.approx(primal, rel=1e-12)


def test_tv_oracle_keeps_the_mean():
    tv = _example("tv_denoising")
    primal, dual, x_star = tv.oracle(True)
    y = tv.signal(tv.SIZES[True][0])
    assert abs(x_star.sum() - y.sum()) <= 1e-10
    assert abs(primal - dual) <= 1e-10 * primal
