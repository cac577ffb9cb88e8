"""Weak Wolfe line search (constrained_optim/linesearch.py) on 1-D functions φ(t), with d = 1."""
import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from constrained_optim.linesearch import Outcome, weak_wolfe

C1, C2 = 1e-4, 0.5


def _evaluator(phi, dphi, log=None):
    """``evaluate(t)`` in the form weak_wolfe expects; the trial object is (t, φ(t))."""
    def evaluate(t):
        value = phi(t)
        if log is not None:
            log.append(t)
        return value, (lambda within_noise=False: dphi(t)), (t, value)
    return evaluate


def _sign(v):
    return (v > 0) - (v < 0)


def _check_wolfe(res, phi, dphi, phi0, g0, c1=C1, c2=C2):
    t = res.t
    assert t > 0 and math.isfinite(t)
    assert phi(t) <= phi0 + c1 * t * g0
    assert dphi(t) >= c2 * g0
    assert res.trial == (t, phi(t))


def test_quadratic_accepts_unit_step_when_wolfe():
    phi, dphi = (lambda t: (t - 3.0) ** 2), (lambda t: 2.0 * (t - 3.0))
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.WOLFE
    assert res.t == 1.0 or res.t == 2.0 or res.t == 4.0
    _check_wolfe(res, phi, dphi, phi(0.0), dphi(0.0))


def test_quadratic_needs_expansion():
    phi, dphi = (lambda t: (t - 100.0) ** 2), (lambda t: 2.0 * (t - 100.0))
    log = []
    res = weak_wolfe(_evaluator(phi, dphi, log), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.WOLFE
    assert res.t > 1.0 and log[:3] == [1.0, 2.0, 4.0]
    _check_wolfe(res, phi, dphi, phi(0.0), dphi(0.0))


def test_quadratic_needs_bisection():
    phi, dphi = (lambda t: (t - 0.01) ** 2), (lambda t: 2.0 * (t - 0.01))
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.WOLFE and res.t < 1.0
    _check_wolfe(res, phi, dphi, phi(0.0), dphi(0.0))


def test_absolute_value_kink():
    phi, dphi = (lambda t: abs(t - 2.0)), (lambda t: float(_sign(t - 2.0)))
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.WOLFE
    _check_wolfe(res, phi, dphi, phi(0.0), dphi(0.0))


@settings(max_examples=100, deadline=None)
@given(a=st.floats(1e-3, 1e3), b=st.floats(1e-4, 1e3), c=st.floats(-1e3, 1e3))   # b <= 2^10: bracketed
def test_quadratics_property(a, b, c):
    phi = lambda t: a * (t - b) ** 2 + c          # noqa: E731
    dphi = lambda t: 2.0 * a * (t - b)            # noqa: E731
    phi0, g0 = phi(0.0), dphi(0.0)
    res = weak_wolfe(_evaluator(phi, dphi), phi0, g0)
    assert res.outcome is Outcome.WOLFE
    _check_wolfe(res, phi, dphi, phi0, g0)


@settings(max_examples=100, deadline=None)
@given(k=st.floats(0.1, 10), b=st.floats(1e-3, 1e3), slope_right=st.floats(0.0, 10),
       c1=st.sampled_from([1e-4, 0.1]), c2=st.sampled_from([0.5, 0.9]))
def test_nonsmooth_piecewise_linear_property(k, b, slope_right, c1, c2):
    # φ(t) = -k t for t <= b, then -k b + slope_right (t - b): a kink at b, the minimum there (or a plateau)
    phi = lambda t: -k * t if t <= b else -k * b + slope_right * (t - b)       # noqa: E731
    dphi = lambda t: -k if t < b else slope_right                                # noqa: E731
    phi0, g0 = phi(0.0), dphi(0.0)
    res = weak_wolfe(_evaluator(phi, dphi), phi0, g0, c1=c1, c2=c2)
    if res.outcome is Outcome.WOLFE:
        _check_wolfe(res, phi, dphi, phi0, g0, c1, c2)
    else:
        # a kink at b > 2^10 (the expansion limit) is never bracketed
        assert res.outcome is Outcome.EXPANSION_LIMIT and b > 512
        assert phi(res.t) <= phi0 + c1 * res.t * g0


@settings(max_examples=60, deadline=None)
@given(k=st.floats(0.1, 10), b=st.floats(1e-3, 100))
def test_nonsmooth_abs_property(k, b):
    phi = lambda t: k * abs(t - b)                 # noqa: E731
    dphi = lambda t: k * _sign(t - b)              # noqa: E731
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.WOLFE
    _check_wolfe(res, phi, dphi, phi(0.0), dphi(0.0))


def test_unbounded_below_gives_expansion_limit():
    phi, dphi = (lambda t: -t), (lambda t: -1.0)
    res = weak_wolfe(_evaluator(phi, dphi), 0.0, -1.0, max_expansions=10)
    assert res.outcome is Outcome.EXPANSION_LIMIT
    assert res.t == 2.0 ** 10 and res.trial == (res.t, -res.t)
    assert res.evaluations == 11


def test_unbounded_below_respects_max_expansions():
    res = weak_wolfe(_evaluator(lambda t: -t * t, lambda t: -2.0 * t - 1.0), 0.0, -1.0, max_expansions=3)
    assert res.outcome is Outcome.EXPANSION_LIMIT and res.t == 8.0


def test_non_descent_gives_failed():
    # the caller claims g0 < 0 but φ increases: no decrease anywhere
    phi, dphi = (lambda t: t), (lambda t: 1.0)
    res = weak_wolfe(_evaluator(phi, dphi), 0.0, -1.0)
    assert res.outcome is Outcome.FAILED
    assert res.t == 0.0 and res.trial is None
    assert res.evaluations <= 50


def test_nan_everywhere_gives_failed():
    log = []
    res = weak_wolfe(_evaluator(lambda t: math.nan, lambda t: math.nan, log), 1.0, -1.0)
    assert res.outcome is Outcome.FAILED
    assert res.t == 0.0 and res.trial is None
    assert all(t > 0 for t in log)


def test_max_evaluations_respected():
    log = []
    res = weak_wolfe(_evaluator(lambda t: math.inf, lambda t: math.nan, log), 1.0, -1.0, max_evaluations=7)
    assert res.outcome is Outcome.FAILED and len(log) == res.evaluations <= 7


def test_nan_beyond_a_bound_returns_a_finite_point():
    # φ is NaN for t > 0.3 (like log of a negative number), decreasing before
    phi = lambda t: math.nan if t > 0.3 else -t        # noqa: E731
    dphi = lambda t: math.nan if t > 0.3 else -1.0     # noqa: E731
    res = weak_wolfe(_evaluator(phi, dphi), 0.0, -1.0)
    assert res.outcome in (Outcome.WOLFE, Outcome.DECREASE_ONLY)
    assert 0 < res.t <= 0.3 and math.isfinite(phi(res.t))
    assert math.isfinite(res.trial[1])


def test_nonfinite_slope_is_treated_as_too_long():
    # φ finite but its slope NaN beyond 0.5: the search must not accept such a point
    phi = lambda t: (t - 2.0) ** 2                           # noqa: E731
    dphi = lambda t: math.nan if t > 0.5 else 2.0 * (t - 2.0)  # noqa: E731
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.DECREASE_ONLY
    assert 0 < res.t <= 0.5 and math.isfinite(dphi(res.t))


@settings(max_examples=60, deadline=None)
@given(bound=st.floats(1e-6, 10), a=st.floats(0.1, 10), b=st.floats(0.1, 100))
def test_never_returns_a_nonfinite_point(bound, a, b):
    phi = lambda t: math.nan if t > bound else a * (t - b) ** 2      # noqa: E731
    dphi = lambda t: math.nan if t > bound else 2 * a * (t - b)      # noqa: E731
    assume(bound > 0)
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0))
    assert math.isfinite(res.t)
    if res.outcome is Outcome.FAILED:
        assert res.trial is None and res.t == 0.0
    else:
        assert res.t <= bound and math.isfinite(res.trial[1])
        assert res.trial[1] <= phi(0.0) + C1 * res.t * dphi(0.0)



def _rounded_up(offset):
    """φ(t) = 1 + 1e-18 (t − 1)² + offset for t > 0, with the exact slope 2e-18 (t − 1): an offset of one ulp of 1
    (2.2e-16) is how a constraint's rounding lifts φ at every trial point, hiding the decrease (1e-18) from the
    values."""
    return (lambda t: 1.0 + 1e-18 * (t - 1.0) ** 2 + (offset if t > 0 else 0.0)), (lambda t: 2e-18 * (t - 1.0))


def test_decrease_below_rounding_is_accepted_by_slopes():
    phi, dphi = _rounded_up(2.2e-16)
    phi0, g0 = phi(0.0), dphi(0.0)
    assert weak_wolfe(_evaluator(phi, dphi), phi0, g0).outcome is Outcome.FAILED
    res = weak_wolfe(_evaluator(phi, dphi), phi0, g0, noise=1e-15)
    assert res.outcome is Outcome.WOLFE and res.t == 1.0


def test_noise_does_not_accept_a_step_whose_slope_says_too_long():
    """Within the noise, a step past the minimizer along d (slope > (2c₁ − 1) g₀: no sufficient decrease on the
    quadratic model) is not taken: t = 3 is rejected, its midpoint 1.5 taken."""
    phi, dphi = _rounded_up(2.2e-16)
    log = []
    res = weak_wolfe(_evaluator(phi, dphi, log), phi(0.0), dphi(0.0), noise=1e-15, t0=3.0)
    assert log == [3.0, 1.5] and res.outcome is Outcome.WOLFE and res.t == 1.5


def test_noise_does_not_accept_an_increase_above_it():
    phi, dphi = _rounded_up(1e-12)
    res = weak_wolfe(_evaluator(phi, dphi), phi(0.0), dphi(0.0), noise=1e-15)
    assert res.outcome is Outcome.FAILED


def _x_below(t_x, g0=-1e-20):
    """φ along d from x where steps t < t_x round to x itself: φ(t) = φ(0) = 1 and slope g₀ there (x again), and
    above t_x a rise of 1e-9 (the step fails). c₁ t g₀ (≤ 1e-24) is below the rounding of φ(0) = 1, so x itself
    passes the decrease test in floating point."""
    return (lambda t: 1.0 if t < t_x else 1.0 + 1e-9), (lambda t: g0)


def test_search_ends_at_the_resolution_of_the_step():
    t_x = 2.0 ** -10
    phi, dphi = _x_below(t_x)
    # without the resolution the search bisects on below t_x and returns x itself as its point (t < t_x)
    log = []
    res = weak_wolfe(_evaluator(phi, dphi, log), phi(0.0), dphi(0.0))
    assert res.outcome is Outcome.DECREASE_ONLY and res.t < t_x and len(log) == 50
    # with it, the search ends before the first trial below t_x, asked for t_x once
    asked, log = [], []
    res = weak_wolfe(_evaluator(phi, dphi, log), phi(0.0), dphi(0.0), resolution=lambda: asked.append(1) or t_x)
    assert res.outcome is Outcome.FAILED and res.trial is None
    assert log == [2.0 ** -k for k in range(11)] and asked == [1]
    # points of decrease above t_x are searched as before (the bracket closes on the largest)
    phi2 = lambda t: 1.0 - 1e-9 if 0.3 < t < 0.6 else phi(t)  # noqa: E731
    res = weak_wolfe(_evaluator(phi2, dphi), phi2(0.0), dphi(0.0), resolution=lambda: t_x)
    assert res.outcome is Outcome.DECREASE_ONLY and 0.5999 < res.t < 0.6


def test_step_resolution_is_where_the_step_rounds_to_x():
    import torch

    from constrained_optim.linesearch import step_resolution
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        # powers of two (the spacing halves below them) and random entries, steps of both signs
        x = torch.cat([torch.tensor([1.0, 2.0, -4.0, 0.5]), torch.randn(60, generator=gen)]).to(dtype).double()
        d = torch.randn(64, generator=gen, dtype=torch.float64) * torch.rand(64, generator=gen, dtype=torch.float64)
        d[:4] = torch.tensor([-1.0, -1.0, 1.0, -0.25], dtype=torch.float64)
        t_x = float(step_resolution(x, d, eps))
        for t in (0.999 * t_x, 0.5 * t_x, 1e-3 * t_x):
            assert torch.equal((x + t * d).to(dtype).double(), x)
        assert not torch.equal((x + 4.01 * t_x * d).to(dtype).double(), x)   # within a factor 4 of the bound
    x, d = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.5, 0.0], [0.5, 1.0]],
                                                                                     dtype=torch.float64)
    assert step_resolution(x, d, 1e-7).tolist() == [0.25 * 1e-7 / 0.5, 0.0]   # a zero entry that moves: 0
    assert float(step_resolution(x[0], torch.zeros(2, dtype=torch.float64), 1e-7)) == math.inf
