#!/usr/bin/env python
"""ConstrainedSQP vs PyGRANSO 1.2.0 on examples 1–6, side by side in one run.

For each problem (``build(quick)`` of examples/svm.py, robustness.py, orthogonality.py, eigenvalue.py,
robust_pca.py, tv_denoising.py) both solvers start from the same point with the same tolerances
(stationarity 1e-8, violation 1e-8, float64, CPU) and the same iteration limit. Reported per solver:
iterations, function evaluations, wall time, final objective, its relative gap to the example's oracle,
max violation (measured here, by the same code, at the returned point) and the solver's own status.
The speed-up is PyGRANSO's time over ours. A second line gives our time to PyGRANSO's answer: the first
iteration of our run whose objective and violation are no worse than PyGRANSO's final ones (violations below
1e-8 count as equal), a fair time where one solver certifies and the other stops earlier without a certificate.

PyGRANSO is an optional benchmark dependency (never a library dependency):

    pip install --no-deps pygranso==1.2.0 && pip install osqp

It imports ``gurobipy`` at load time and uses numpy's removed ``Inf``; this script installs a stand-in
``gurobipy`` module and the ``Inf`` alias before importing it (PyGRANSO's default QP solver, OSQP, is used).

Usage:
    python benchmarks/vs_pygranso.py --quick            # small instances
    python benchmarks/vs_pygranso.py                    # the examples' full instances (PyGRANSO takes minutes)
    python benchmarks/vs_pygranso.py --problems svm,tv_denoising --time-limit 600
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import shlex
import sys
import time
import types

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)                                          # this checkout's package
sys.path.insert(0, os.path.join(_ROOT, "examples"))

import constrained_optim as co  # noqa: E402
from constrained_optim.constraints import canonical  # noqa: E402

PROBLEMS = ["svm", "robustness", "orthogonality", "eigenvalue", "robust_pca", "tv_denoising"]
TOL = 1e-8


def _import_pygranso():
    import numpy as np
    import numpy.core.numeric as numeric
    for module in (np, numeric):
        if not hasattr(module, "Inf"):
            module.Inf = np.inf
    if "gurobipy" not in sys.modules:
        stand_in = types.ModuleType("gurobipy")
        stand_in.GRB = types.SimpleNamespace()
        sys.modules["gurobipy"] = stand_in
    from pygranso.pygranso import pygranso
    from pygranso.pygransoStruct import pygransoStruct
    return pygranso, pygransoStruct


@contextlib.contextmanager
def _quiet():
    """Silence OSQP's C-level prints ("Polishing not needed ...") during PyGRANSO runs."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(null)
        os.close(saved)


def _warm_up() -> None:
    """One tiny solve with each solver, so that one-off start-up costs are not timed."""
    from _common import Problem

    class Variables(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    model = Variables()

    def reset():
        with torch.no_grad():
            model.x.zero_()
    problem = Problem("warm-up", model, lambda: ((model.x - 1) ** 2).sum(), [co.ineq(lambda: model.x.sum() - 1)],
                      reset=reset)
    run_ours(problem, 50)
    run_pygranso(problem, 50, 60.0)


def _violation(constraints) -> float:
    with torch.no_grad():
        worst = 0.0
        for con in constraints:
            c = con.fn().detach().reshape(-1)
            v = c.clamp(min=0) if con.kind == "ineq" else c.abs()
            worst = max(worst, float(v.max()) if v.numel() else 0.0)
    return worst


def _gap(f: float, f_opt: float | None) -> float:
    return math.nan if f_opt is None else abs(f - f_opt) / max(1.0, abs(f_opt))


def run_ours(problem, max_iter: int) -> dict:
    problem.reset()
    params = list(problem.model.parameters())
    options = dict(problem.options)
    options.setdefault("max_iter", max_iter)
    trace = []          # (seconds, objective, violation) after every iteration

    def record(cert):
        trace.append((time.perf_counter() - start, cert.objective, cert.violation))
    start = time.perf_counter()
    res = co.minimize(problem.objective, params, problem.constraints, callback=record, **options)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        f = float(problem.objective())
    return dict(nit=res.nit, nfev=res.nfev, time=seconds, fun=f, violation=_violation(canonical(problem.constraints)),
                status=res.status.name, trace=trace)


def _time_to_match(trace, fun: float, violation: float) -> float:
    """Our first time at an objective and violation no worse than (fun, violation) (inf: never)."""
    return next((t for t, f, v in trace if f <= fun + 1e-12 * abs(fun) and v <= max(violation, TOL)), math.inf)


def run_pygranso(problem, max_iter: int, time_limit: float) -> dict:
    pygranso, Struct = _import_pygranso()
    problem.reset()
    # PyGRANSO draws random directions from torch's global generator when its line search fails: seeded here,
    # its run does not depend on what ran before (unseeded, orthogonality took 91 iterations in one run and
    # hit the time limit after 275 in another)
    torch.manual_seed(0)
    model = problem.model
    constraints = canonical(problem.constraints)

    def combined(X):
        f = problem.objective()
        ci, ce = Struct(), Struct()
        n_ci = n_ce = 0
        for con in constraints:
            value = con.values()
            if con.kind == "ineq":
                setattr(ci, f"c{n_ci}", value)
                n_ci += 1
            else:
                setattr(ce, f"c{n_ce}", value)
                n_ce += 1
        return f, (ci if n_ci else None), (ce if n_ce else None)

    for p in model.parameters():        # PyGRANSO flattens parameters with view(): it needs contiguous ones
        p.data = p.data.contiguous()
    opts = Struct()
    opts.torch_device = torch.device("cpu")
    opts.double_precision = True
    opts.x0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().reshape(-1, 1).clone()
    opts.opt_tol = TOL
    opts.viol_ineq_tol = TOL
    opts.viol_eq_tol = TOL
    opts.maxit = max_iter
    opts.maxclocktime = time_limit
    opts.print_level = 0
    with _quiet():
        start = time.perf_counter()
        soln = pygranso(var_spec=model, combined_fn=combined, user_opts=opts)
        seconds = time.perf_counter() - start
    # evaluate PyGRANSO's best (feasible, lowest) point with our own code
    x = soln.best.x if hasattr(soln, "best") else soln.final.x
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(x.reshape(-1).to(torch.float64), model.parameters())
        f = float(problem.objective())
    return dict(nit=int(soln.iters), nfev=int(soln.fn_evals), time=seconds, fun=f, violation=_violation(constraints),
                status=f"code {soln.termination_code}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the examples' small instances")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=900.0, help="PyGRANSO's clock limit per problem (s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print(f"torch {torch.__version__}, threads {args.threads}, float64, tolerances {TOL:g}, max_iter {args.max_iter}\n")
    header = (f"{'problem':<14}{'solver':<10}{'iters':>7}{'fevals':>8}{'time s':>10}{'objective':>18}"
              f"{'rel gap':>10}{'violation':>11}  status")
    _warm_up()
    print(header)
    speedups, matched = [], []
    for name in args.problems.split(","):
        problem = importlib.import_module(name).build(quick=args.quick)
        ours = run_ours(problem, args.max_iter)
        theirs = run_pygranso(problem, args.max_iter, args.time_limit)
        for solver, r in (("ours", ours), ("pygranso", theirs)):
            print(f"{name:<14}{solver:<10}{r['nit']:>7}{r['nfev']:>8}{r['time']:>10.3f}{r['fun']:>18.10g}"
                  f"{_gap(r['fun'], problem.f_opt):>10.2e}{r['violation']:>11.2e}  {r['status']}")
        speedups.append((name, theirs["time"] / max(ours["time"], 1e-9)))
        matched.append((name, _time_to_match(ours["trace"], theirs["fun"], theirs["violation"]), theirs["time"]))
        sys.stdout.flush()
    print("\nspeed-up (PyGRANSO time / ours): " + ", ".join(f"{n} {s:.1f}×" for n, s in speedups))
    print("our time to PyGRANSO's final objective and violation (speed-up): " + ", ".join(
        f"{n} {t:.3g} s ({theirs / t:.1f}×)" if math.isfinite(t) else f"{n} never" for n, t, theirs in matched))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
