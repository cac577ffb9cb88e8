"""The example scripts examples/svm.py, examples/robustness.py and examples/orthogonality.py.

Each quick instance must solve and pass its own checks (``main(["--quick"]) == 0``), and each
``build(quick=True)`` must describe the problem its docstring states, with ``f_opt`` (or, for the
adversarial problem, which has none, the upper bound) recomputed here by a different route.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
import scipy.optimize
import torch

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    """Import examples/<name>.py under a private module name (examples/ is not a package)."""
    if _EXAMPLES not in sys.path:
        sys.path.insert(0, _EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(_EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


svm, robustness, orthogonality = _load("svm"), _load("robustness"), _load("orthogonality")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("module", [svm, robustness, orthogonality], ids=["svm", "robustness", "orthogonality"])
def test_quick_main_succeeds(module, capsys):
    assert module.main(["--quick"]) == 0
    assert "OK" in capsys.readouterr().out


def _check_problem(problem, n_variables: int):
    assert isinstance(problem, orthogonality.Problem)    # the one class of examples/_common.py
    params = list(problem.model.parameters())
    assert all(p.dtype == torch.float64 and p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == n_variables
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    problem.reset()
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert problem.objective().shape == ()


def test_svm_build_matches_scipy_primal():
    problem = svm.build(quick=True)
    X, y = problem.data
    N, d = X.shape
    _check_problem(problem, d + 1 + N)
    assert len(problem.constraints) == 2 and sum(c.values().numel() for c in problem.constraints) == 2 * N
    # the primal QP in (w, b, ξ) by SciPy SLSQP (an active-set method in float64, unlike libsvm), from the
    # feasible point w = 0, b = 0, ξ = 1
    Xn, yn = X.numpy(), y.numpy()

    def fun(v):
        return 0.5 * v[:d] @ v[:d] + svm.C * v[d + 1:].sum()

    def jac(v):
        return np.concatenate([v[:d], [0.0], np.full(N, svm.C)])

    margin_jac = np.hstack([yn[:, None] * Xn, yn[:, None], np.eye(N)])
    constraints = [{"type": "ineq", "fun": lambda v: margin_jac @ v - 1.0, "jac": lambda v: margin_jac}]
    bounds = [(None, None)] * (d + 1) + [(0.0, None)] * N
    start = np.concatenate([np.zeros(d + 1), np.ones(N)])
    result = scipy.optimize.minimize(fun, start, jac=jac, bounds=bounds, constraints=constraints, method="SLSQP",
                                     options={"ftol": 1e-12, "maxiter": 1000})
    assert result.success, result.message
    assert abs(result.fun - problem.f_opt) <= 1e-8 * max(1.0, abs(problem.f_opt))
    assert problem.svc["polished"] is not None      # the float64 polish was accepted


def test_orthogonality_build_matches_numpy_eigh():
    problem = orthogonality.build(quick=True)
    A = problem.A.numpy()
    n, k = problem.model.V.shape
    assert (n, k) == (8, 2)
    _check_problem(problem, n * k)
    values, vectors = np.linalg.eigh(A)
    assert abs(problem.f_opt + values[-k:].sum()) <= 1e-12 * max(1.0, abs(problem.f_opt))
    # the value is attained: V = the top-k eigenvectors is feasible and reaches f_opt
    with torch.no_grad():
        problem.model.V.copy_(torch.from_numpy(vectors[:, -k:]))
        assert abs(float(problem.objective()) - problem.f_opt) <= 1e-12 * max(1.0, abs(problem.f_opt))
        assert float(problem.constraints[0].as_constraint()[0].values().abs().max()) <= 1e-12
    problem.reset()
    V = problem.model.V.detach()
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=V.dtype), atol=1e-12)    # the start is feasible


@pytest.mark.parametrize("p", ["2", "inf"])
def test_robustness_build_and_bound(p):
    problem = robustness.build(quick=True, image=0, p=p)
    _check_problem(problem, 64 if p == "2" else 65)
    assert problem.f_opt is None
    problem.reset()
    assert problem.radius() == 0.0 and problem.margin() > 0     # the start x' = x is classified correctly
    # the bisection bound can be no larger than the distance to the nearest training image that the
    # network assigns, like its label, to another class (τ = 1), computed here by cdist
    data = robustness.train_classifier()
    X, y, net = data["X_train"], data["y_train"], data["net"]
    with torch.no_grad():
        others = X[(y != problem.label) & (net(X).argmax(1) == y)]
    x = problem.model.x.reshape(1, -1)
    nearest = float(torch.cdist(x, others, p=2.0 if p == "2" else float("inf")).min())
    assert 0 < problem.upper_bound <= nearest * (1 + 1e-12)
