"""Helpers shared by the tests of the first-order optimizers (AugmentedLagrangian, Penalty)."""
import torch

import constrained_optim as co


def lbfgs_inner(groups):
    """An accurate inner solver for deterministic problems (what a script would pick)."""
    return torch.optim.LBFGS(groups, lr=1.0, max_iter=100, history_size=20, tolerance_grad=1e-12,
                             tolerance_change=1e-15, line_search_fn="strong_wolfe")


def make_closure(opt, objective, backward=True):
    """The torch.optim closure of ``objective``; with ``backward=False`` it returns the loss un-differentiated."""
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective()
        if backward:
            loss.backward()
        return loss
    return closure


A3 = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)


def qp3(dtype=torch.float64, start=0.0):
    """min ‖x − a‖² + 0.1 Σx⁴  s.t.  Σx <= 1 (active),  x₀ − x₁ = −0.2: strictly convex, LICQ, λ_budget > 0."""
    a = A3.to(dtype)
    x = torch.full((3,), start, dtype=dtype, requires_grad=True)
    cons = [co.ineq(lambda: x.sum() - 1.0, name="budget"), co.eq(lambda: x[0] - x[1] + 0.2, name="link")]
    return x, (lambda: ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum()), cons


def qp3_reference():
    """The certified ConstrainedSQP solution of :func:`qp3`: (x*, result)."""
    x, f, cons = qp3()
    res = co.minimize(f, [x], cons, method="sqp")
    assert res.success
    return x.detach().clone(), res
