#!/usr/bin/env python
"""Fairness-constrained logistic regression with minibatches: augmented Lagrangian vs penalty methods.

Problem (synthetic data, group attribute a ∈ {0, 1}, logistic model z = Xw + b):

    minimize    mean BCE(z, y)
    subject to  mean_{i: a_i = 1} sigmoid(z_i) <= 0.3     (positive-prediction rate of group 1, smooth surrogate)
                ‖w‖₂ <= r                                  (norm bound)

About 80 % of group 1 is labelled positive and a model with only the norm bound predicts a rate of about
0.6, so both constraints are active at the optimum.
Every minibatch method trains with Adam steps (lr 1e-2, cosine-annealed to 0 by torch's CosineAnnealingLR,
set on our optimizers exactly as on Adam) on batches of 256 for the same number of epochs; the
rate constraint is evaluated on the batch's group-1 rows (a stochastic constraint). Reported at the end,
on the full training set: loss, the rate surrogate, the hard rate (fraction of group 1 with z > 0), the
norm, the max violation and test accuracy; the reference optimum is ConstrainedSQP on the full batch
(float64, certified). Methods:

    sqp (full batch)       co.ConstrainedSQP, the certified optimum of the full-data problem
    alm                    co.AugmentedLagrangian(Adam), multipliers updated once per epoch
    penalty                co.Penalty(kind="quadratic", Adam), adaptive ρ, checked once per epoch
    adam+penalty ρ=…       plain Adam on loss + ρ Σ max(0, c)² with a fixed ρ (what users do by hand)
    cooper-lagrangian      Cooper's Lagrangian formulation (simultaneous GDA), if cooper-optim is installed
    cooper-alm             Cooper's augmented Lagrangian (alternating primal-dual), if installed

A second table times one training step (closure, backward, update) on an MLP of 1.1M parameters, batch 1024,
for plain Adam and for co.AugmentedLagrangian, measured interleaved in the same run: with a norm constraint
on the first layer only (the plain drop-in: the closure calls backward, the optimizer adds one VJP), and
with the batch rate constraint added, either reusing the closure's forward pass (closure without backward,
one backward for everything) or computing its own forward pass (which doubles the model work).

Usage:
    python benchmarks/fairness_bench.py              # 5 seeds, 60 epochs
    python benchmarks/fairness_bench.py --quick      # 1 seed, fewer timing repeats
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import constrained_optim as co  # noqa: E402

RATE = 0.3
RADIUS = 0.5
BATCH = 256
LR = 1e-2


# ------------------------------------------------------------------------------------------------ data
def make_data(seed: int, n: int = 12000, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=gen) < 0.4).float()
    beta = torch.linspace(-1.0, 1.5, d)
    X = torch.randn(n, d, generator=gen) + 0.8 * a[:, None] * beta / beta.norm()
    y = (torch.rand(n, generator=gen) < torch.sigmoid(X @ beta + 1.2 * a - 0.5)).float()
    split = 2 * n // 3
    return (X[:split], y[:split], a[:split]), (X[split:], y[split:], a[split:])


class Logistic(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = torch.nn.Linear(d, 1)

    def forward(self, X):
        return self.linear(X).squeeze(-1)


def rate_of(z, a):
    """Smooth positive-prediction rate of group 1 (mean predicted probability)."""
    group = a > 0.5
    return torch.sigmoid(z[group]).mean() if bool(group.any()) else z.sum() * 0.0


def evaluate(model, train, test) -> dict:
    (X, y, a), (Xt, yt, _) = train, test
    with torch.no_grad():
        z = model(X)
        loss = float(F.binary_cross_entropy_with_logits(z, y))
        rate = float(rate_of(z, a))
        hard = float((z[a > 0.5] > 0).float().mean())
        norm = float(model.linear.weight.norm())
        acc = float(((model(Xt) > 0).float() == yt).float().mean())
    return dict(loss=loss, rate=rate, hard_rate=hard, norm=norm,
                violation=max(rate - RATE, norm - RADIUS, 0.0), accuracy=acc)


def batches(train, epochs: int, seed: int):
    X, y, a = train
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0] - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            yield X[idx], y[idx], a[idx]


# ------------------------------------------------------------------------------------------- methods
def run_sqp(train, d):
    X, y, a = (t.double() for t in train)
    model = Logistic(d).double()
    w = model.linear.weight
    cons = [co.ineq(lambda: rate_of(model(X), a) - RATE, name="rate"),
            co.ineq(lambda: w.norm() - RADIUS, name="norm")]
    res = co.minimize(lambda: F.binary_cross_entropy_with_logits(model(X), y), model.parameters(), cons)
    return model.float(), res


def run_ours(kind: str, train, d, epochs, seed):
    torch.manual_seed(seed)
    model = Logistic(d)
    w = model.linear.weight
    batch = {}
    cons = [co.ineq(lambda: rate_of(batch["z"], batch["a"]) - RATE, name="rate"),
            co.ineq(lambda: w.norm() - RADIUS, name="norm")]
    steps_per_epoch = train[0].shape[0] // BATCH
    if kind == "alm":
        opt = co.AugmentedLagrangian(model.parameters(), cons, lr=LR, update_every=steps_per_epoch)
    else:
        opt = co.Penalty(model.parameters(), cons, kind="quadratic", lr=LR, update_every=steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for Xb, yb, ab in batches(train, epochs, seed):
        def closure():
            # no backward here: the optimizer runs ONE backward on loss + wᵀc (the rate reuses z)
            batch["z"], batch["a"] = model(Xb), ab
            return F.binary_cross_entropy_with_logits(batch["z"], yb)
        opt.step(closure)
        schedule.step()
    return model, opt


def run_adam_penalty(rho: float, train, d, epochs, seed):
    torch.manual_seed(seed)
    model = Logistic(d)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (train[0].shape[0] // BATCH))
    for Xb, yb, ab in batches(train, epochs, seed):
        opt.zero_grad()
        z = model(Xb)
        viol = torch.stack([(rate_of(z, ab) - RATE).clamp(min=0), (model.linear.weight.norm() - RADIUS).clamp(min=0)])
        loss = F.binary_cross_entropy_with_logits(z, yb) + rho * viol.square().sum()
        loss.backward()
        opt.step()
        schedule.step()
    return model


def run_cooper(formulation: str, train, d, epochs, seed):
    import cooper

    torch.manual_seed(seed)
    model = Logistic(d)
    steps_per_epoch = train[0].shape[0] // BATCH

    class Fairness(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            form = (cooper.formulations.Lagrangian if formulation == "lagrangian"
                    else cooper.formulations.AugmentedLagrangian)
            extra = {} if formulation == "lagrangian" else {
                "penalty_coefficient": cooper.penalty_coefficients.DensePenaltyCoefficient(init=torch.ones(2))}
            self.constraint = cooper.Constraint(cooper.ConstraintType.INEQUALITY, formulation_type=form,
                                                multiplier=cooper.multipliers.DenseMultiplier(num_constraints=2),
                                                **extra)

        def compute_cmp_state(self, model, Xb, yb, ab):
            z = model(Xb)
            c = torch.stack([rate_of(z, ab) - RATE, model.linear.weight.norm() - RADIUS])
            return cooper.CMPState(loss=F.binary_cross_entropy_with_logits(z, yb),
                                   observed_constraints={self.constraint: cooper.ConstraintState(violation=c)})

    cmp = Fairness()
    primal = torch.optim.Adam(model.parameters(), lr=LR)
    # dual step: the multiplier moves by (lr × violation) per step; lr = 1/steps_per_epoch matches the
    # multiplier step of our ALM (ρ = 1 once per epoch, on the epoch-mean violation)
    dual = torch.optim.SGD(cmp.dual_parameters(), lr=1.0 / steps_per_epoch, maximize=True)
    cls = (cooper.optim.SimultaneousOptimizer if formulation == "lagrangian"
           else cooper.optim.AlternatingPrimalDualOptimizer)
    opt = cls(cmp=cmp, primal_optimizers=primal, dual_optimizers=dual)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(primal, epochs * steps_per_epoch)
    for Xb, yb, ab in batches(train, epochs, seed):
        opt.roll(compute_cmp_state_kwargs=dict(model=model, Xb=Xb, yb=yb, ab=ab))
        schedule.step()
    return model


# -------------------------------------------------------------------------------------- step timing
def time_steps(repeats: int, steps: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    d, n = 64, 1024
    X, a = torch.randn(n, d), (torch.rand(n) < 0.4).float()
    y = (torch.rand(n) < 0.5).float()

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 1))

    def adam_setup():
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def one():
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(X).squeeze(-1), y).backward()
            opt.step()
        return one

    def alm_setup(rate_mode: str | None):
        """rate_mode None: norm constraint only, closure calls backward (the plain drop-in);
        "fused": + the batch rate, which reuses the closure's forward (closure without backward);
        "recompute": + the batch rate computed by its own forward pass (closure calls backward)."""
        model = mlp()
        cache = {}
        first = model[0].weight
        cons = [co.ineq(lambda: first.norm() - 30.0, name="norm")]
        if rate_mode == "fused":
            cons.append(co.ineq(lambda: rate_of(cache["z"], a) - RATE, name="rate"))
        elif rate_mode == "recompute":
            cons.append(co.ineq(lambda: rate_of(model(X).squeeze(-1), a) - RATE, name="rate"))
        opt = co.AugmentedLagrangian(model.parameters(), cons, lr=1e-4)

        def closure():
            opt.zero_grad()
            cache["z"] = model(X).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(cache["z"], y)
            if rate_mode != "fused":
                loss.backward()
            return loss
        return lambda: opt.step(closure)

    runners = {"adam": adam_setup(), "alm: norm": alm_setup(None),
               "alm: norm + rate, fused": alm_setup("fused"),
               "alm: norm + rate, own forward": alm_setup("recompute")}
    for run in runners.values():      # warm-up
        for _ in range(5):
            run()
    samples = {name: [] for name in runners}
    for _ in range(repeats):          # interleaved, so load changes hit every method alike
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            samples[name].append((time.perf_counter() - start) / steps)
    return [(name, statistics.median(ts)) for name, ts in samples.items()]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer timing repeats")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 5)
    epochs = args.epochs or 60
    torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print(f"torch {torch.__version__}, threads {args.threads}, seeds {seeds}, epochs {epochs}, batch {BATCH}, "
          f"lr {LR}, constraints: rate <= {RATE}, ‖w‖ <= {RADIUS}\n")
    have_cooper = importlib.util.find_spec("cooper") is not None

    rows = {}
    for seed in range(seeds):
        train, test = make_data(seed)
        d = train[0].shape[1]
        model, res = run_sqp(train, d)
        rows.setdefault("sqp (full batch)", []).append(evaluate(model, train, test) | {"status": res.status.name})
        for kind in ("alm", "penalty"):
            model, _ = run_ours(kind, train, d, epochs, seed)
            rows.setdefault(kind, []).append(evaluate(model, train, test))
        for rho in (1.0, 10.0, 100.0):
            model = run_adam_penalty(rho, train, d, epochs, seed)
            rows.setdefault(f"adam+penalty rho={rho:g}", []).append(evaluate(model, train, test))
        if have_cooper:
            for form in ("lagrangian", "alm"):
                model = run_cooper(form, train, d, epochs, seed)
                rows.setdefault(f"cooper-{form}", []).append(evaluate(model, train, test))

    optimum = statistics.mean(r["loss"] for r in rows["sqp (full batch)"])
    print(f"{'method':<24}{'loss':>9}{'Δloss':>10}{'rate':>8}{'hard rate':>11}{'‖w‖':>8}{'max viol':>10}{'test acc':>10}")
    for name, rs in rows.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("loss", "rate", "hard_rate", "norm", "accuracy")}
        worst = max(r["violation"] for r in rs)
        print(f"{name:<24}{mean['loss']:>9.4f}{mean['loss'] - optimum:>+10.4f}{mean['rate']:>8.4f}"
              f"{mean['hard_rate']:>11.3f}{mean['norm']:>8.4f}{worst:>10.2e}{mean['accuracy']:>10.4f}")
    if not have_cooper:
        print("(cooper-optim not installed: pip install --no-deps cooper-optim to add its two rows)")
    statuses = {r["status"] for r in rows["sqp (full batch)"]}
    print(f"\nloss, rates, norm and accuracy: means over {seeds} seed(s); max viol: worst seed, full training set; "
          f"Δloss vs the certified full-batch optimum (SQP status {sorted(statuses)})\n")

    repeats, steps = (5, 10) if args.quick else (15, 20)
    timings = time_steps(repeats, steps)
    base = timings[0][1]
    print(f"step time, MLP 64-1024-1024-1 (1.1M parameters), batch 1024, float32, median of {repeats}×{steps} steps, "
          "interleaved:")
    print(f"{'optimizer':<32}{'ms/step':>10}{'ratio':>8}")
    for name, t in timings:
        print(f"{name:<32}{1e3 * t:>10.3f}{t / base:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
