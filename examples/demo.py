"""constrained_optim in two minutes.

1. Fit ``torch.nn.Linear`` by least squares with the weights in the unit ball and a zero bias,
   in the ordinary torch.optim closure loop, until the KKT certificate holds:

       minimize   mean((X w + b − y)²)   subject to   ‖w‖₂ − 1 ≤ 0,   b = 0.

   The answer is checked against the closed form: with b = 0 this is a trust-region problem, solved by
   w(λ) = (XᵀX + λ N I)⁻¹ Xᵀy with λ ≥ 0 such that ‖w(λ)‖ = 1 (when the unconstrained fit lies outside).

2. Solve Hock–Schittkowski problem 71 with ``co.minimize``:

       minimize   x₁x₄(x₁ + x₂ + x₃) + x₃
       subject to x₁x₂x₃x₄ ≥ 25,   x₁² + x₂² + x₃² + x₄² = 40,   1 ≤ x ≤ 5,

   whose optimum is f* = 17.0140173 at x* ≈ (1, 4.7430, 3.8211, 1.3794).

Exits with status 1 if a certificate does not converge or an answer is off.

    python examples/demo.py
"""
import sys

import torch

import constrained_optim as co


def closed_form_ball_least_squares(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_w mean((X w − y)²) s.t. ‖w‖ ≤ 1, by bisection on the multiplier λ (float64)."""
    X, y = X.double(), y.double().reshape(-1)
    N, n = X.shape
    A, r = X.T @ X / N, X.T @ y / N

    def w_of(lam: float) -> torch.Tensor:
        return torch.linalg.solve(A + lam * torch.eye(n, dtype=X.dtype), r)

    if float(w_of(0.0).norm()) <= 1.0:
        return w_of(0.0)
    low, high = 0.0, 1.0
    while float(w_of(high).norm()) > 1.0:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if float(w_of(mid).norm()) > 1.0 else (low, mid)
    return w_of(high)


def fit_linear_model() -> bool:
    print("== 1. nn.Linear, least squares, ‖w‖ ≤ 1 and b = 0, closure loop ==")
    torch.manual_seed(0)
    # float64: the SQP certifies to relative stationarity 1e-8 there; float32 parameters work too, with
    # tolerances ≈ 1.2e-5 that their rounding may not reach (then the status says STALLED_FEASIBLE)
    X = torch.randn(200, 8, dtype=torch.float64)
    w_true = torch.randn(1, 8, dtype=torch.float64)
    y = X @ w_true.T + 0.5 + 0.05 * torch.randn(200, 1, dtype=torch.float64)
    model = torch.nn.Linear(8, 1).double()

    constraints = [
        co.ineq(lambda: model.weight.norm() - 1.0, name="unit_norm"),   # value <= 0
        co.eq(lambda: model.bias.sum(), name="zero_bias"),              # value == 0
    ]
    opt = co.ConstrainedSQP(model.parameters(), constraints=constraints)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss

    for _ in range(200):
        opt.step(closure)               # one outer SQP iteration (calls the closure as often as needed)
        if opt.certificate.converged:   # stationarity, complementarity and feasibility within tolerance
            break
    cert = opt.certificate
    print(cert)
    print(f"  multipliers: unit_norm={float(cert.multipliers['unit_norm']):.6g}, "
          f"zero_bias={float(cert.multipliers['zero_bias']):.6g}")

    w_star = closed_form_ball_least_squares(X, y)
    error = float((model.weight.detach().double().reshape(-1) - w_star).abs().max())
    print(f"  ‖w‖ = {float(model.weight.detach().norm()):.6f}, b = {float(model.bias.detach()):.2e}, "
          f"max |w − w_closed_form| = {error:.2e}")
    return cert.converged and error < 1e-6


def hock_schittkowski_71() -> bool:
    print("\n== 2. co.minimize on Hock-Schittkowski 71 (float64) ==")
    x = torch.tensor([1.0, 5.0, 5.0, 1.0], dtype=torch.float64, requires_grad=True)
    constraints = [
        co.ineq(lambda: 25.0 - x.prod(), name="product"),
        co.eq(lambda: (x ** 2).sum() - 40.0, name="sphere"),
        co.ineq(lambda: 1.0 - x, name="lower"),      # four scalar constraints from one tensor
        co.ineq(lambda: x - 5.0, name="upper"),
    ]
    res = co.minimize(lambda: x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2], [x], constraints, max_iter=200)
    print(res)
    print(f"  x = {[round(v, 6) for v in x.tolist()]}")
    f_star = 17.0140172891564
    print(f"  |f − f*| = {abs(res.fun - f_star):.2e}")
    try:
        from scipy.optimize import minimize as scipy_minimize   # optional cross-check
    except ImportError:
        pass
    else:
        sp = scipy_minimize(
            lambda v: v[0] * v[3] * (v[0] + v[1] + v[2]) + v[2], [1.0, 5.0, 5.0, 1.0], method="SLSQP",
            bounds=[(1, 5)] * 4,
            constraints=[{"type": "ineq", "fun": lambda v: v.prod() - 25.0},
                         {"type": "eq", "fun": lambda v: (v ** 2).sum() - 40.0}])
        print(f"  scipy SLSQP: f = {sp.fun:.10f} ({sp.nit} iterations)")
    return res.success and abs(res.fun - f_star) < 1e-6


def main() -> int:
    ok = fit_linear_model()
    ok = hock_schittkowski_71() and ok
    print("\ndemo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
