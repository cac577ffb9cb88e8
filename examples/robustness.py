"""Minimal adversarial perturbations of a small MLP on the digits, in the ℓ2, ℓ∞ and ℓ1 norms.

A network z(x) ∈ R¹⁰ (64-32-10 with softplus activations, trained for about a second of full-batch Adam
with a fixed seed on scikit-learn's ``load_digits``, pixels scaled to [0, 1]) classifies a test image x of
label y correctly. The smallest perturbation that changes its decision is

    minimize   ‖x' − x‖_p
    subject to z_y(x') − max_{j≠y} z_j(x') ≤ 0      (misclassified; one nonsmooth row)
               0 ≤ x' ≤ 1                           (a valid image; ``co.Box``, 128 rows)

solved by ``co.ConstrainedSQP`` from x' = x (infeasible: x is classified correctly). The max over the
other classes is nonsmooth, which the SQP handles. The activation is softplus rather than ReLU so that it
is the only nonsmoothness: a ReLU network is piecewise linear, and the ℓ1 and ℓ∞ problems, piecewise
linear programs then, can put the answer exactly on a kink (a hidden pre-activation of 1e-16), where the
run reaches the right radius but stops STALLED_FEASIBLE without a certificate. The objectives are
smooth reformulations with the same minimizer (the norms themselves are nonsmooth at 0 and, for ∞ and 1,
along every tie or zero coordinate):

    p = 2:  ½‖x' − x‖²                                          (n = 64 variables)
    p = ∞:  t          s.t.  −t ≤ x' − x ≤ t     (t ∈ R, 128 more rows;   n = 65)
    p = 1:  Σᵢ sᵢ      s.t.  −s ≤ x' − x ≤ s     (s ∈ R⁶⁴, 128 more rows; n = 128)

The problem is nonconvex (the SQP returns a local minimizer) and has no closed form. The oracle is
therefore an independent upper bound: for every training image x_o that the network classifies, like
its label, as a class other than y, bisection on τ ∈ [0, 1] finds a misclassified point x + τ(x_o − x)
(convex combinations of images stay in the box), whose distance τ‖x_o − x‖_p bounds the minimal radius;
the bound is the smallest over the training set. The script checks, with its own arithmetic, that the
returned x' is misclassified (margin ≤ 1e-8: on the decision boundary) and in the box (to 1e-8), that
the certificate converged and that the radius is no larger than the bound.

Constraint folding: the box is also written as one folded row, ``co.ineq(lambda: torch.cat([−x', x' − 1]),
fold="l2")``, i.e. ‖max(−x', x' − 1, 0)‖₂ ≤ 0. That keeps the QPs small (for p = 2, m = 2 rows instead
of 129; the epigraph rows of p = ∞ and 1 stay unfolded), but the folded function is nonsmooth where it
is zero and its gradient vanishes on the feasible side, so once pixels rest on their bounds no
multiplier exists for it at the solution: the iterates approach the answer from outside the box, the
certificate needs gradient sampling, and the runs are much slower than with the 128 smooth rows. The
folded runs are timed and compared (radius, status) but, having a time limit, are not required to
certify; when they do, their point must pass the same checks. Measured on the full instance (2-core machine, one thread): the 15 unfolded runs certify in 6–26 iterations and at
most 3 s each; folded, p = 2 certifies in 217–435 iterations (2–6 s), p = ∞ never within 30 s (each
certificate there fits multipliers to several sampled gradients over 130 rows), p = 1 in 4 of 5; the
certified folded radii agree with the unfolded ones to 7e-10.

Quick: 2 test images, p = 2 and ∞ (the folded box for p = 2 only). Full: 5 images, p = 2, ∞ and 1, each
unfolded and folded (the folded runs stop after 10 s quick, 30 s full).

    python examples/robustness.py [--quick]

Exits with status 1 if an unfolded run is not certified, or a certified run returns a point that is
not misclassified, not in the box, or farther than the bound.

These problems are small (n ≤ 128): with other work on the machine, one thread (``OMP_NUM_THREADS=1``)
is several times faster than torch's default of one per core.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import constrained_optim as co  # noqa: E402
from _common import Problem, parse, report  # noqa: E402

FEASIBILITY_TOL = 1e-8
NORMS = {"2": 2.0, "inf": math.inf, "1": 1.0}


@functools.lru_cache(maxsize=None)
def train_classifier(seed: int = 0, steps: int = 500) -> dict:
    """The trained network (parameters frozen) and the train / test split of the digits, float64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = permutation[:1400], permutation[1400:]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Softplus(), torch.nn.Linear(32, 10)).double()
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        adam.zero_grad()
        torch.nn.functional.cross_entropy(net(X[train]), y[train]).backward()
        adam.step()
    net.requires_grad_(False)
    with torch.no_grad():
        accuracy = {name: float((net(X[i]).argmax(1) == y[i]).double().mean()) for name, i in
                    (("train", train), ("test", test))}
    return {"net": net, "X_train": X[train], "y_train": y[train], "X_test": X[test], "y_test": y[test],
            "accuracy": accuracy}


def margin(net: torch.nn.Module, x: torch.Tensor, label: int) -> torch.Tensor:
    """z_y(x) − max_{j≠y} z_j(x) for x of shape (..., 64): positive iff x is classified as ``label``."""
    z = net(x)
    others = torch.cat([z[..., :label], z[..., label + 1:]], dim=-1)
    return z[..., label] - others.amax(dim=-1)


def correctly_classified(count: int) -> list[int]:
    """Indices of the first ``count`` test images that the network classifies correctly."""
    data = train_classifier()
    with torch.no_grad():
        right = (data["net"](data["X_test"]).argmax(1) == data["y_test"]).nonzero().reshape(-1)
    return right[:count].tolist()


@torch.no_grad()
def bisection_upper_bound(x: torch.Tensor, label: int, steps: int = 60) -> dict[str, float]:
    """Per p, the smallest ‖x_τ − x‖_p over the misclassified points x_τ = x + τ(x_o − x) found by bisection
    on τ towards every training image x_o of another class that the network assigns to that class."""
    data = train_classifier()
    net, X, y = data["net"], data["X_train"], data["y_train"]
    targets = X[(y != label) & (net(X).argmax(1) == y)]
    low = torch.zeros(len(targets), dtype=X.dtype)     # margin(x + low (x_o − x)) > 0 (x is right)
    high = torch.ones(len(targets), dtype=X.dtype)     # margin(x + high (x_o − x)) <= 0 (x_o is another class)
    direction = targets - x
    for _ in range(steps):
        mid = 0.5 * (low + high)
        wrong = margin(net, x + mid[:, None] * direction, label) <= 0
        low, high = torch.where(wrong, low, mid), torch.where(wrong, mid, high)
    steps_taken = high[:, None] * direction
    if not bool((margin(net, x + steps_taken, label) <= 0).all()):    # the bisection keeps this invariant
        raise RuntimeError("bisection upper bound: an end point is not misclassified")
    return {key: float(torch.linalg.vector_norm(steps_taken, ord=p, dim=1).min()) for key, p in NORMS.items()}


class Perturbation(torch.nn.Module):
    """The variables: ``x_adv`` (the perturbed image x') and, for p = ∞ / 1, the epigraph variable
    ``bound`` (t ∈ R / s ∈ R⁶⁴). The start is x' = x, bound = 0."""

    def __init__(self, x: torch.Tensor, p: str):
        super().__init__()
        self.register_buffer("x", x.clone())
        self.x_adv = torch.nn.Parameter(x.clone())
        if p != "2":
            self.bound = torch.nn.Parameter(torch.zeros(1 if p == "inf" else x.numel(), dtype=x.dtype))

    def reset(self) -> None:
        with torch.no_grad():
            self.x_adv.copy_(self.x)
            if hasattr(self, "bound"):
                self.bound.zero_()


def build(quick: bool, image: int = 0, p: str = "2", fold: bool = False) -> Problem:
    """The minimal-ℓp perturbation of the ``image``-th correctly classified test image (p = "2", "inf" or
    "1"), with the box as 128 rows (``co.Box``) or, with ``fold=True``, as one ``fold="l2"`` row.

    ``quick`` does not change the problem (the examples' signature; the instance count is main's).
    f_opt is None (no closed form); ``problem.upper_bound`` holds the bisection bound of the radius.
    """
    if p not in NORMS:
        raise ValueError(f"p must be one of {list(NORMS)}, got {p!r}")
    data = train_classifier()
    net = data["net"]
    index = correctly_classified(image + 1)[image]
    x, label = data["X_test"][index], int(data["y_test"][index])
    model = Perturbation(x, p)
    delta = lambda: model.x_adv - model.x                                              # noqa: E731

    constraints = [co.ineq(lambda: margin(net, model.x_adv, label), name="misclassified")]
    if p == "2":
        objective = lambda: 0.5 * delta().pow(2).sum()                                 # noqa: E731
    else:
        objective = lambda: model.bound.sum()                                          # noqa: E731
        constraints.append(co.ineq(lambda: torch.cat([delta() - model.bound, -delta() - model.bound]),
                                   name=f"l{p}_epigraph"))
    if fold:
        constraints.append(co.ineq(lambda: torch.cat([-model.x_adv, model.x_adv - 1.0]), name="box", fold="l2"))
    else:
        constraints.append(co.Box(model.x_adv, lower=0.0, upper=1.0, name="box"))
    problem = Problem(name=f"adversarial_l{p}_{'folded' if fold else 'box'}_{image}", model=model,
                      objective=objective, constraints=constraints, f_opt=None,
                      oracle="none (nonconvex); the radius is checked against a bisection upper bound",
                      reset=model.reset, options={"max_iter": 1000})
    problem.label = label
    problem.p = p
    problem.radius = lambda: float(torch.linalg.vector_norm(delta().detach(), ord=NORMS[p]))
    problem.margin = lambda: float(margin(net, model.x_adv.detach(), label))
    problem.upper_bound = bisection_upper_bound(x, label)[p]
    return problem


def attack(problem: Problem, time_limit: float | None = None) -> tuple[co.OptimizeResult, float]:
    problem.reset()
    start = time.perf_counter()
    result = co.minimize(problem.objective, problem.model.parameters(), problem.constraints,
                         time_limit=time_limit, **problem.options)
    return result, time.perf_counter() - start


def check(problem: Problem, result: co.OptimizeResult, require_certificate: bool) -> tuple[bool, str]:
    """Our own feasibility and bound checks of a certified answer. A run that need not certify and did
    not (the folded box, stopped by its time limit) claims no answer: it passes, and the verdict says so."""
    if not result.success and not require_certificate:
        return True, f"no answer claimed ({result.status.name})"
    x_adv = problem.model.x_adv.detach()
    box = max(float((-x_adv).max()), float((x_adv - 1.0).max()), 0.0)
    radius = problem.radius()
    checks = {"certified": result.success or not require_certificate,
              "misclassified": problem.margin() <= FEASIBILITY_TOL,
              "in the box": box <= FEASIBILITY_TOL,
              "below the bound": radius <= problem.upper_bound * (1 + 1e-12)}
    failed = [name for name, ok in checks.items() if not ok]
    return not failed, ("FAILED: not " + ", not ".join(failed)) if failed else "ok"


def main(argv=None) -> int:
    args = parse(__doc__.splitlines()[0], argv)
    data = train_classifier()
    count, norms = (2, ("2", "inf")) if args.quick else (5, ("2", "inf", "1"))
    fold_norms = ("2",) if args.quick else norms
    fold_time_limit = 10.0 if args.quick else 30.0
    print(f"== minimal adversarial perturbations, digits MLP 64-32-10 (train accuracy "
          f"{data['accuracy']['train']:.3f}, test {data['accuracy']['test']:.3f}), {count} test images ==")
    code, rows = 0, []
    for image in range(count):
        for p in norms:
            for fold in (False, True) if p in fold_norms else (False,):
                problem = build(args.quick, image=image, p=p, fold=fold)
                print(f"\n-- image {image} (label {problem.label}), p = {p}, box "
                      f"{'folded (l2)' if fold else 'as 128 rows'} --")
                result, elapsed = attack(problem, time_limit=fold_time_limit if fold else None)
                print(f"{result.nit} iterations, {result.nfev} evaluations, {elapsed:.2f} s")
                report(problem, result, require_certificate=not fold)
                ok, verdict = check(problem, result, require_certificate=not fold)
                print(f"radius {problem.radius():.8f}, bisection upper bound {problem.upper_bound:.6f}, "
                      f"margin {problem.margin():.1e}: {verdict}")
                code |= 0 if ok else 1
                rows.append((image, p, "l2-folded" if fold else "rows", result.status.name, result.nit, elapsed,
                             problem.radius(), problem.upper_bound))

    print("\nimage  p    box        status            iter    time     radius      bound")
    for image, p, box, status, nit, elapsed, radius, bound in rows:
        print(f"{image:>5}  {p:<4} {box:<10} {status:<17} {nit:>5} {elapsed:>7.2f}s {radius:>10.6f} {bound:>10.4f}")
    unfolded = {(r[0], r[1]): r[6] for r in rows if r[2] == "rows"}
    for label, statuses in (("certified", ("CONVERGED",)), ("all", None)):
        differences = [abs(r[6] - unfolded[r[0], r[1]]) / unfolded[r[0], r[1]] for r in rows
                       if r[2] != "rows" and (statuses is None or r[3] in statuses)]
        if differences:
            print(f"folded vs unfolded radii, {label} folded runs ({len(differences)}): largest relative "
                  f"difference {max(differences):.1e}")
    print("OK" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
