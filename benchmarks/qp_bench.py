"""Benchmark solve_box_qp (builtin) against qpth's PDIPM on SQP-dual-type box QPs.

Problems: Q = J Jᵀ + 1e-8 I with J random m x 2m (or rank m/2: rank-deficient), bounds [0, 1].
Prints time per batch, worst KKT residual (see constrained_optim.qp), share solved and the
throughput ratio qpth time / builtin time. qpth cases whose predicted time (scaled by B m³ from the
largest qpth case measured so far) exceeds ``--qpth-budget`` seconds are skipped and listed at the
end; the load average is printed before and after (timings on a busy machine are not comparable).

    python benchmarks/qp_bench.py [--quick] [--device cpu] [--dtype float64] [--threads N]
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

import torch  # noqa: E402

from constrained_optim.qp import solve_box_qp  # noqa: E402


def make_problem(B: int, m: int, rank_deficient: bool, device, dtype, gen):
    cols = m // 2 if rank_deficient else 2 * m
    J = torch.randn(B, m, max(cols, 1), generator=gen, dtype=torch.float64)
    Q = J @ J.mT + 1e-8 * torch.eye(m, dtype=torch.float64)
    q = torch.randn(B, m, generator=gen, dtype=torch.float64) * m**0.5
    return Q.to(device, dtype), q.to(device, dtype)


def timed(fn, repeats: int, budget: float = float("inf")):
    """Mean time of ``repeats`` calls after one warm-up call (fewer calls if they exceed ``budget`` s)."""
    start = time.perf_counter()
    out = fn()  # warm-up
    first = time.perf_counter() - start
    if first > budget:
        return first, out, 1
    if budget != float("inf"):
        repeats = max(1, min(repeats, int(budget / max(first, 1e-9))))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out, repeats


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset (CI smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--qpth-budget", type=float, default=120.0,
                        help="skip qpth cases predicted to take longer than this (s); it also caps repeats")
    parser.add_argument("--no-qpth", action="store_true", help="builtin solver only")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print("command:", " ".join([sys.executable] + sys.argv))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    has_qpth = importlib.util.find_spec("qpth") is not None and not args.no_qpth
    batches, sizes = ((1, 16), (5, 20)) if args.quick else ((1, 16, 256), (5, 20, 50, 200))
    gen = torch.Generator().manual_seed(0)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
          f"qpth={'yes' if has_qpth else 'no'}; {load()}")
    header = (f"{'B':>4} {'m':>4} {'rank':>5} | {'builtin ms':>11} {'resid':>8} {'solved':>7} {'iters':>5} |"
              f" {'qpth ms':>10} {'resid':>8} {'solved':>7} | {'speedup':>8}")
    print(header)
    print("-" * len(header))
    skipped = []
    qpth_unit = None  # seconds per B m^3 of the largest qpth case measured so far
    qpth_size = 0
    for B in batches:
        for m in sizes:
            for rank_deficient in (False, True):
                Q, q = make_problem(B, m, rank_deficient, device, dtype, gen)
                rank = "def" if rank_deficient else "full"
                repeats = max(1, min(50, int(2e6 / (B * m * m + 1e4))))
                t_ours, ours, _ = timed(lambda: solve_box_qp(Q, q, 0.0, 1.0), repeats)
                row = (
                    f"{B:>4} {m:>4} {rank:>5} | {t_ours * 1e3:>11.3f} {ours.residual.max().item():>8.1e} "
                    f"{ours.solved.float().mean().item():>7.0%} {ours.iterations.max().item():>5d} |"
                )
                size = B * m**3
                predicted = qpth_unit * size if qpth_unit is not None else 0.0
                if has_qpth and predicted <= args.qpth_budget:
                    t_theirs, theirs, _ = timed(
                        lambda: solve_box_qp(Q, q, 0.0, 1.0, backend="qpth", tol=1e-12, max_iter=20),
                        repeats, args.qpth_budget / 4,
                    )
                    if size >= qpth_size:
                        qpth_unit, qpth_size = t_theirs / size, size
                    row += (
                        f" {t_theirs * 1e3:>10.2f} {theirs.residual.max().item():>8.1e} "
                        f"{theirs.solved.float().mean().item():>7.0%} | {t_theirs / t_ours:>7.1f}x"
                    )
                else:
                    if has_qpth:
                        skipped.append(f"B={B} m={m} {rank} (qpth predicted {predicted:.0f} s)")
                    row += f" {'-':>10} {'-':>8} {'-':>7} | {'-':>8}"
                print(row, flush=True)
    if skipped:
        print("skipped (over --qpth-budget):", "; ".join(skipped))
    print(load())


if __name__ == "__main__":
    main()
