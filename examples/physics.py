"""Hard physical constraints on a small network: fit u_θ(t) to noisy samples on [0, 1] while it satisfies
boundary conditions, a conservation law and an ODE residual exactly (to 1e-8), with ConstrainedSQP, against a
soft quadratic penalty trained by Adam (co.Penalty).

Ground truth (unknown to the fit) and data, σ = 0.05, tᵢ uniform on [0, 1]:

    u*(t) = sin(πt) + ½ sin(2πt),   yᵢ = u*(tᵢ) + σ εᵢ,   f(t) = u*'' = −π² sin(πt) − 2π² sin(2πt).

Model: u_θ = MLP 1-16-16-1 with tanh, float64 (321 parameters). Problem:

    minimize_θ   (1/N) Σᵢ (u_θ(tᵢ) − yᵢ)²
    subject to   u_θ(0) = 0,  u_θ(1) = 0                                      ("boundary", 2 rows)
                 Σ_j ½ (t_{j+1} − t_j) (u_θ(t_j) + u_θ(t_{j+1})) − 2/π = 0   ("mass": ∫₀¹ u = 2/π,
                                                                      trapezoid rule on 101 points)
                 (u_θ''(τ_k) − f(τ_k)) / π² = 0,  τ_k ∈ COLLOCATION           ("ode", u'' by autograd)

* ``co.minimize`` (ConstrainedSQP) from the network's initialisation; it reports its KKT certificate. A
  network's least-squares fit does not become stationary to 1e-8 in a few hundred BFGS iterations (the
  stationarity stalls around 1e-5..1e-4, as for unconstrained BFGS on this network), so the run ends at its
  iteration limit; what it does deliver is a point feasible to 1e-8 (``minimize`` returns the best feasible
  iterate if the last one is not).
* ``co.Penalty`` with a fixed ρ (``schedule``): Adam on the soft-constrained loss f + ρ/2 ‖c‖², ρ = 100, the
  usual physics-informed training, from the same initialisation, lr cosine-annealed: feasible only to
  about |λ|/ρ, and a larger ρ makes the fit worse for Adam (measured: ρ growing to 10⁴ by co.Penalty's
  adaptive rule gave violation 5e-6 but a data loss 5× the SQP's after 2000 steps).

Reported: data loss, max constraint violation per constraint, the error max_t |u_θ − u*| on a grid, the
certificate. 321 parameters fit 40 noisy samples: a data loss below that of u* itself means the fit follows
the noise, so the error to u* is shown for information and not checked (the longer full run overfits more).
Exits with status 1 unless the SQP answer is CONVERGED, or feasible to ``FEAS_TOL`` with a loss at most
``LOSS_TOL`` (relative) above the penalty's.

    python examples/physics.py            # full: 1000 SQP iterations, 6000 Adam steps
    python examples/physics.py --quick    # CI: 250 SQP iterations, 2000 Adam steps
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import constrained_optim as co          # noqa: E402
from _common import parse               # noqa: E402

DTYPE = torch.float64
N_DATA, NOISE = 40, 0.05
COLLOCATION = (0.5,)
FEAS_TOL = 1e-8
LOSS_TOL = 0.05          # the SQP's loss may exceed the (infeasible) penalty fit's by at most 5 %
LR = 1e-2
RHO = 100.0              # the soft penalty's fixed ρ (larger ρ: smaller violation, worse fit for Adam)
# L-BFGS (10 pairs) rather than the dense BFGS default. Measured on this problem (data seeds 0-3, 300
# iterations): with the dense matrix, once the iterates are feasible the line search accepts only steps
# t ≈ 1e-5..1e-3 along the SQP direction (11-15 closure calls per iteration) and the violation drifts back
# up (last iterates 3.5e-8..1.4e-6; a limitation of the library, reported); with L-BFGS 4-12 calls per
# iteration, last iterates at 1.1e-9..4e-8 in three seeds (1.6e-6 in the fourth) and a lower loss in three.
# Either way ``minimize`` returns the best iterate feasible to 1e-8 when the last one is not.
SQP_OPTIONS = dict(memory=10)


def u_true(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * t) + 0.5 * torch.sin(2 * math.pi * t)


def rhs(t: torch.Tensor) -> torch.Tensor:
    return -math.pi ** 2 * torch.sin(math.pi * t) - 2 * math.pi ** 2 * torch.sin(2 * math.pi * t)


class Field(torch.nn.Module):
    """u_θ: R → R, evaluated on a vector of times."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                       torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t[:, None]).squeeze(-1)

    def second_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """u_θ''(t) by autograd (each u(t_k) depends on t_k only), keeping the graph to θ."""
        t = t.clone().requires_grad_(True)
        du = torch.autograd.grad(self(t).sum(), t, create_graph=True)[0]
        return torch.autograd.grad(du.sum(), t, create_graph=True)[0]


def problem(model: Field, t_data, y):
    ends = torch.tensor([0.0, 1.0], dtype=DTYPE)
    grid = torch.linspace(0.0, 1.0, 101, dtype=DTYPE)
    tau = torch.tensor(COLLOCATION, dtype=DTYPE)
    constraints = [
        co.eq(lambda: model(ends), name="boundary"),
        co.eq(lambda: torch.trapezoid(model(grid), grid) - 2 / math.pi, name="mass"),
    ]
    if COLLOCATION:
        constraints.append(co.eq(lambda: (model.second_derivative(tau) - rhs(tau)) / math.pi ** 2, name="ode"))
    return (lambda: (model(t_data) - y).square().mean()), constraints


@torch.no_grad()
def summary(model: Field, objective, constraints) -> dict:
    with torch.enable_grad():     # u'' needs autograd
        residuals = {c.name: float(c.fn().detach().abs().max()) for c in constraints}
    grid = torch.linspace(0.0, 1.0, 1001, dtype=DTYPE)
    return dict(loss=float(objective()), violation=max(residuals.values()), residuals=residuals,
                error=float((model(grid) - u_true(grid)).abs().max()))


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    sqp_iterations, adam_steps = (250, 2000) if args.quick else (1000, 6000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # 321 parameters: one thread is faster than two (no parallel overhead)
    try:
        return run(sqp_iterations, adam_steps)
    finally:
        torch.set_num_threads(threads)


def run(sqp_iterations: int, adam_steps: int, seed: int = 0) -> int:
    torch.manual_seed(seed)
    t_data = torch.rand(N_DATA, dtype=DTYPE)
    y = u_true(t_data) + NOISE * torch.randn(N_DATA, dtype=DTYPE)
    init = Field().to(DTYPE)
    print(f"{N_DATA} samples, noise σ = {NOISE}; MLP 1-16-16-1 tanh, float64; equality constraints: "
          f"u(0) = u(1) = 0, trapezoid ∫u = 2/π, u''(τ) = f(τ) at τ ∈ {COLLOCATION}")

    # ---- ConstrainedSQP (certified; a feasible answer at the iteration limit)
    sqp_model = copy.deepcopy(init)
    objective, constraints = problem(sqp_model, t_data, y)
    start = time.perf_counter()
    res = co.minimize(objective, sqp_model.parameters(), constraints, max_iter=sqp_iterations, **SQP_OPTIONS)
    sqp_time = time.perf_counter() - start
    print("\nConstrainedSQP:")
    print(res.certificate)
    print(f"  returned: {res.returned}, {res.nit} iterations, {res.nfev} closure calls; multipliers: "
          + ", ".join(f"{k} {[round(v, 6) for v in m.tolist()]}" for k, m in res.multipliers.items()))
    sqp = summary(sqp_model, objective, constraints)

    # ---- soft constraints: Adam on f + ρ/2 ‖c‖² with a fixed ρ, the usual training loop
    pen_model = copy.deepcopy(init)
    objective_p, constraints_p = problem(pen_model, t_data, y)
    opt = co.Penalty(pen_model.parameters(), constraints_p, kind="quadratic", lr=LR, schedule=lambda step: RHO)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, adam_steps)

    def closure():
        opt.zero_grad()
        loss = objective_p()
        loss.backward()
        return loss

    start = time.perf_counter()
    for _ in range(adam_steps):
        opt.step(closure)
        sched.step()
    pen_time = time.perf_counter() - start
    print(f"\nPenalty (quadratic, ρ = {RHO:g}, Adam, {adam_steps} steps), certificate of its final point:")
    print(opt.certify(closure))
    pen = summary(pen_model, objective_p, constraints_p)

    print(f"\n{'method':26}{'data loss':>12}{'boundary':>11}{'mass':>11}{'ode':>11}{'max |u − u*|':>14}{'time':>8}")
    for name, s, t in (("ConstrainedSQP", sqp, sqp_time), ("Penalty + Adam", pen, pen_time)):
        r = s["residuals"]
        print(f"{name:26}{s['loss']:>12.6g}{r['boundary']:>11.1e}{r['mass']:>11.1e}{r['ode']:>11.1e}"
              f"{s['error']:>14.4f}{t:>7.1f}s")
    noise_floor = float((u_true(t_data) - y).square().mean())
    print(f"(loss of the true function on the data: {noise_floor:.6g})")

    feasible = sqp["violation"] <= FEAS_TOL
    close = sqp["loss"] <= (1 + LOSS_TOL) * pen["loss"]
    print(f"\nSQP: status {res.status.name}, max violation {sqp['violation']:.1e} (required ≤ {FEAS_TOL:g}), "
          f"loss {sqp['loss']:.6g} vs penalty {pen['loss']:.6g} (allowed ≤ {1 + LOSS_TOL:g}×)")
    ok = res.success or (feasible and close)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
