#!/usr/bin/env python
"""Compare ``constrained_optim.minimize(method="sqp")`` with scipy SLSQP on the
known-solution problem library (``tests/problems.py``).

One row per problem: iterations, function evaluations, wall time, final
objective, relative error vs the known optimum, violation and status, for both
solvers side by side (both float64, both measured in this run), then a summary.

A problem counts as solved when  |f - f_opt| / max(1, |f_opt|) <= 1e-6  and
violation <= 1e-6 (evaluated independently at the returned point).

Usage:
    python benchmarks/sqp_bench.py                   # all problems, dense BFGS
    python benchmarks/sqp_bench.py --quick           # small subset
    python benchmarks/sqp_bench.py --memory 10       # L-BFGS with 10 pairs
    python benchmarks/sqp_bench.py --problems hs071,svm_primal_m20
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))                        # this checkout's package
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))

import torch  # noqa: E402

import problems as PL  # noqa: E402

SOLVED_F = 1e-6
SOLVED_V = 1e-6


def run_co(prob, memory, max_iter, time_limit):
    import constrained_optim as co

    x, objective, cons = PL.make_torch_problem(prob, torch.float64)
    options = {}
    if memory is not None:
        options["memory"] = memory
    if time_limit is not None:
        options["time_limit"] = time_limit
    t0 = time.perf_counter()
    res = co.minimize(objective, [x], cons, method="sqp", max_iter=max_iter, **options)
    elapsed = time.perf_counter() - t0
    fx, viol = PL.evaluate(prob, x)  # independent evaluation at the returned point
    status = getattr(res.status, "name", str(res.status))
    return {"fun": fx, "nit": int(res.nit), "nfev": int(res.nfev), "time": elapsed, "violation": viol,
            "success": bool(res.success), "status": status,
            "reported_fun": float(res.fun), "reported_violation": float(res.violation)}


def run_slsqp(prob, max_iter):
    r = PL.slsqp_solve(prob, maxiter=max_iter)
    r["status"] = str(r["status"])
    return r


def solved(prob, r):
    return (r is not None and "error" not in r and math.isfinite(r["fun"])
            and PL.rel_error(prob, r["fun"]) <= SOLVED_F and r["violation"] <= SOLVED_V)


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # report and carry on with the next problem
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def _cells(prob, r):
    if r is None:
        return ["-"] * 8
    if "error" in r:
        return ["error", "", "", "", "", "", r["error"][:48], "NO"]
    ok = "yes" if solved(prob, r) else "NO"
    succ = "T" if r.get("success") else "F"
    return [str(r["nit"]), str(r["nfev"]), f"{r['time']:.3f}", f"{r['fun']:.10g}",
            f"{PL.rel_error(prob, r['fun']):.1e}", f"{r['violation']:.1e}", f"{r['status']}/{succ}", ok]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=str, default=None, help="comma-separated problem names")
    ap.add_argument("--quick", action="store_true", help="run a small representative subset")
    ap.add_argument("--memory", type=int, default=None, help="use L-BFGS with this many pairs")
    ap.add_argument("--max-iter", type=int, default=None,
                    help="iteration limit for both solvers (default: 1000, more for degenerate/nonsmooth)")
    ap.add_argument("--time-limit", type=float, default=None, help="per-problem time limit for co.minimize (s)")
    ap.add_argument("--no-scipy", action="store_true", help="skip the SLSQP column")
    ap.add_argument("--list", action="store_true", help="list the problems and exit")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of solver errors")
    args = ap.parse_args(argv)

    print("$ python " + shlex.join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)))
    torch.set_num_threads(1)

    if args.problems:
        names = [s.strip() for s in args.problems.split(",") if s.strip()]
        unknown = [s for s in names if s not in PL.PROBLEMS_BY_NAME]
        if unknown:
            ap.error(f"unknown problem(s): {', '.join(unknown)}; use --list")
        probs = [PL.PROBLEMS_BY_NAME[s] for s in names]
    elif args.quick:
        probs = [PL.PROBLEMS_BY_NAME[s] for s in PL.QUICK]
    else:
        probs = list(PL.ALL_PROBLEMS)

    if args.list:
        for p in probs:
            print(f"{p.name:16s} n={p.n:3d} ineq={p.n_ineq:3d} eq={p.n_eq:3d} f_opt={p.f_opt:.12g}  {p.source}")
        return 0

    mode = "dense BFGS" if args.memory is None else f"L-BFGS (memory={args.memory})"
    print(f"constrained_optim sqp [{mode}] vs scipy SLSQP (exact autograd gradients), float64, "
          f"torch {torch.__version__}, torch threads=1")
    print(f"solved: rel. objective error <= {SOLVED_F:g} and violation <= {SOLVED_V:g}; "
          "status column: status/success")

    head = ["problem", "n", "mi", "me"]
    sub = ["nit", "nfev", "time", "f", "relerr", "viol", "status", "ok"]
    cols = head + [f"co:{s}" for s in sub] + ([] if args.no_scipy else [f"sp:{s}" for s in sub])
    rows = []
    totals = {"co": [0, 0.0, 0], "sp": [0, 0.0, 0]}  # solved, time, errors
    # warm-up (imports, torch.func tracing caches) so the first row's timings are not inflated
    warm = PL.PROBLEMS_BY_NAME["hs035"]
    _safe(run_co, warm, args.memory, 5, None)
    if not args.no_scipy:
        _safe(run_slsqp, warm, 5)
    wall0 = time.perf_counter()
    for p in probs:
        max_iter = args.max_iter if args.max_iter is not None else PL.max_iter_for(p)
        rc = _safe(run_co, p, args.memory, max_iter, args.time_limit)
        rs = None if args.no_scipy else _safe(run_slsqp, p, max_iter)
        for key, r in (("co", rc), ("sp", rs)):
            if r is None:
                continue
            if "error" in r:
                totals[key][2] += 1
                if args.verbose:
                    print(f"[{key} {p.name}] {r['trace']}", file=sys.stderr)
            else:
                totals[key][0] += solved(p, r)
                totals[key][1] += r["time"]
        row = [p.name, str(p.n), str(p.n_ineq), str(p.n_eq)] + _cells(p, rc) + ([] if args.no_scipy else _cells(p, rs))
        rows.append(row)
        print("  done " + p.name, file=sys.stderr, flush=True)

    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(line(cols))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    n = len(probs)
    summary = (f"SUMMARY ({n} problems, {mode}): co.minimize solved {totals['co'][0]}/{n} "
               f"(errors {totals['co'][2]}, solver time {totals['co'][1]:.2f} s)")
    if not args.no_scipy:
        summary += (f"; scipy SLSQP solved {totals['sp'][0]}/{n} "
                    f"(errors {totals['sp'][2]}, solver time {totals['sp'][1]:.2f} s)")
    summary += f"; total wall {time.perf_counter() - wall0:.2f} s"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
