#!/usr/bin/env python
"""Per-iteration overhead of ``ConstrainedSQP(memory=k)`` against the autodiff floor, for large n.

Problem (one per (n, m), seeded): a two-layer tanh network ``h(z) = w₂ᵀ tanh(W₁ z + b₁) + b₂`` with all
its weights in one flat parameter x ∈ Rⁿ, fitted to N random samples by least squares, subject to m
smooth constraints: m − 1 random linear rows ``G x <= h`` (rows of norm 1; h chosen so that about half of
them are violated at the start) and the norm bound ``‖x‖² <= R²``:

    minimize  (1/N) Σ_j (h(z_j) − t_j)²   s.t.  G x − h <= 0,   ‖x‖² − R² <= 0.

The floor is what any method that uses first derivatives of everything pays per point: one closure call
(loss and gradient) plus the constraint values and one batched constraint Jacobian
(``ConstraintValues.structured_jacobian``). It is timed in the same process as the SQP, right before every
timed SQP iteration (median of ``--repeats`` runs each time), so that both see the same machine load; the loss
and Jacobian parts of the floor are shown once (median of 3). The SQP is timed over ``--iters`` steady-state
iterations (after the starting evaluation and ``--skip`` iterations); with t_i the time of iteration i, e_i its
closure calls and F_i the floor timed right before it, it reports

    floor      = mean of F_i
    ratio/it   = Σ t_i / Σ F_i
    ratio/eval = Σ t_i / Σ e_i F_i

(paired sums: iterations and floors averaged alike. Until 2026-12-07 the ratios divided the mean of t_i by the
median of F_i, which on a machine whose noise only ever slows a run down counted the iterations' slow outliers and
not the floor's: three runs at n = 10⁶, m = 1 gave 1.49, 1.55, 1.65 that way and 1.46, 1.42, 1.49 paired.)
    own/it     = time per SQP iteration − time spent inside its closure calls (the optimizer's own arithmetic, with
                 the constraint values and Jacobians it evaluates): measured within each timed iteration, so it
                 does not depend on the floor's separate timing (on a shared machine the loss's own time moves
                 by ±20% between runs)

Every (n, m) case runs in a fresh subprocess, which reports its peak resident memory (``ru_maxrss``)
after setting up the problem (data and parameters), after the floor, and at the end.

Usage:
    python benchmarks/scale_bench.py                        # n = 1e4, 1e5, 1e6; m = 1, 16, 64; memory 10
    python benchmarks/scale_bench.py --quick                # n = 1e4, 1e5; m = 1, 16
    python benchmarks/scale_bench.py --n 1000000 --m 64 --memory 20 --dtype float32
    python benchmarks/scale_bench.py --device cuda          # data and parameters on a GPU

On a GPU every timing starts and ends with ``torch.cuda.synchronize`` (the work is queued asynchronously) and
the status column adds the device's peak allocated memory (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

_INPUTS = 64           # d, input size of the network


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(n_target: int, m: int, samples: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """The network, data and constraints (drawn on the CPU, then moved to ``device``: the same problem on every
    device); returns (x, loss function, constraints)."""
    import constrained_optim as co

    gen = torch.Generator().manual_seed(seed)
    d = _INPUTS
    hidden = max(1, round((n_target - 1) / (d + 2)))
    n = hidden * (d + 2) + 1
    Z = torch.randn(samples, d, generator=gen, dtype=dtype)
    t = torch.sin(Z[:, 0]) + 0.1 * torch.randn(samples, generator=gen, dtype=dtype)
    x0 = torch.randn(n, generator=gen, dtype=dtype) / d ** 0.5
    G = torch.randn(m - 1, n, generator=gen, dtype=dtype)
    G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
    h = (G @ x0).detach() + 0.1 * torch.randn(m - 1, generator=gen, dtype=dtype)
    radius2 = 0.5 * float(x0.dot(x0))
    Z, t, G, h = (v.to(device) for v in (Z, t, G, h))
    x = x0.to(device).requires_grad_()

    def loss_fn():
        W1 = x[:hidden * d].view(hidden, d)
        b1 = x[hidden * d:hidden * (d + 1)]
        w2 = x[hidden * (d + 1):hidden * (d + 2)]
        out = torch.tanh(torch.addmm(b1, Z, W1.T)) @ w2 + x[-1]
        return ((out - t) ** 2).mean()

    constraints = [co.ineq(lambda: x.dot(x) - radius2, name="norm")]
    if m > 1:
        constraints.insert(0, co.ineq(lambda: x @ G.T - h, name="linear"))
    return x, loss_fn, constraints


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(args) -> dict:
    import constrained_optim as co
    from constrained_optim._flat import FlatParams
    from constrained_optim.constraints import canonical, evaluate

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    x, loss_fn, constraints = build(args.n, args.m, args.samples, dtype, device=device)
    rss_data = _rss_mib()
    opt = co.ConstrainedSQP([x], constraints, memory=args.memory)

    inside = [0.0]          # seconds spent in the closure

    def closure():
        _synchronize(device)
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        _synchronize(device)
        inside[0] += time.perf_counter() - start
        return loss

    flat, canon = FlatParams([x]), canonical(constraints)

    def floor():
        closure()
        evaluate(canon, flat).structured_jacobian()

    def floor_parts():
        floor()
        return (_median_time(closure, 3, device),
                _median_time(lambda: evaluate(canon, flat).structured_jacobian(), 3, device))

    loss_time, jacobian_time = floor_parts()
    rss_floor = _rss_mib()

    opt.step(closure)                                   # the starting point: evaluation and certificate
    for _ in range(args.skip):
        opt.step(closure)
    floors, times, evals, own = [], [], [], []
    for _ in range(args.iters):                         # the floor timed right before each timed iteration
        floors.append(_median_time(floor, args.repeats, device))
        _synchronize(device)
        nfev, t0, inside[0] = opt.nfev, time.perf_counter(), 0.0
        opt.step(closure)
        _synchronize(device)
        times.append(time.perf_counter() - t0)
        own.append(times[-1] - inside[0])
        evals.append(opt.nfev - nfev)
        if opt.certificate.status.terminal:
            break
    return {"n": x.numel(), "m": args.m, "iters": len(times), "floor": statistics.mean(floors), "loss": loss_time,
            "jacobian": jacobian_time, "iter": statistics.mean(times), "evals": statistics.mean(evals),
            "ratio_it": sum(times) / sum(floors), "ratio_eval": sum(times) / sum(e * f for e, f in zip(evals, floors)),
            "own": statistics.mean(own),
            "rss_data": rss_data, "rss_floor": rss_floor, "rss_peak": _rss_mib(),
            "status": opt.certificate.status.name, "iteration": opt.certificate.iteration,
            "device_peak": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def _child(args, n: int, m: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", "--n", str(n), "--m", str(m),
           "--memory", str(args.memory), "--dtype", args.dtype, "--samples", str(args.samples),
           "--iters", str(args.iters), "--skip", str(args.skip), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"n": n, "m": m, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=None, help="numbers of variables (approximate)")
    parser.add_argument("--m", type=int, nargs="+", default=None, help="numbers of constraint rows")
    parser.add_argument("--memory", type=int, default=10, help="L-BFGS pairs k (default 10)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--samples", type=int, default=256, help="training samples N of the network (256)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per case (10)")
    parser.add_argument("--skip", type=int, default=10, help="untimed iterations after the start (10)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each floor timing (1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--device", default="cpu", help="where data and parameters live (default cpu; e.g. cuda)")
    parser.add_argument("--quick", action="store_true", help="n = 1e4, 1e5 and m = 1, 16 only")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(argparse.Namespace(**{**vars(args), "n": args.n[0], "m": args.m[0]}))))
        return
    ns = args.n or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    ms = args.m or ([1, 16] if args.quick else [1, 16, 64])
    print(f"ConstrainedSQP(memory={args.memory}), {args.dtype}, device {args.device}, {args.threads} thread(s), "
          f"network fit to N={args.samples} samples; times in seconds, memory in MiB (peak RSS of the case's process)")
    header = (f"{'n':>9} {'m':>3} | {'floor':>7} {'(loss':>7} {'+ jac)':>7} | {'SQP it':>7} {'evals':>5} "
              f"{'ratio/it':>8} {'ratio/ev':>8} {'own/it':>7} | {'RSS data':>8} {'floor':>7} {'peak':>7} | status")
    print(header)
    print("-" * len(header))
    for n in ns:
        for m in ms:
            r = _child(args, n, m)
            if "error" in r:
                print(f"{r['n']:>9} {r['m']:>3} | error: {r['error']}")
                continue
            print(f"{r['n']:>9} {r['m']:>3} | {r['floor']:7.4f} {r['loss']:7.4f} {r['jacobian']:7.4f} | "
                  f"{r['iter']:7.4f} {r['evals']:5.2f} {r['ratio_it']:8.2f} {r['ratio_eval']:8.2f} {r['own']:7.4f} | "
                  f"{r['rss_data']:8.0f} {r['rss_floor']:7.0f} {r['rss_peak']:7.0f} | "
                  f"{r['status'].lower()} ({r['iters']} timed, it {r['iteration']})"
                  + (f", device peak {r['device_peak']:.0f} MiB" if r["device_peak"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
