"""Benchmark solve_box_qp (builtin) against qpth's PDIPM on SQP-dual-type box QPs.

Problems: Q = J Jᵀ + 1e-8 I with J random m x 2m (or rank m/2: rank-deficient), bounds [0, 1].
Prints time per batch, worst KKT residual (see constrained_optim.qp) and the throughput ratio.

    python benchmarks/qp_bench.py [--quick] [--device cpu] [--dtype float64]
"""

import argparse
import importlib.util
import sys
import time

import torch

from constrained_optim.qp import solve_box_qp


def make_problem(B: int, m: int, rank_deficient: bool, device, dtype, gen):
    cols = m // 2 if rank_deficient else 2 * m
    J = torch.randn(B, m, max(cols, 1), generator=gen, dtype=torch.float64)
    Q = J @ J.mT + 1e-8 * torch.eye(m, dtype=torch.float64)
    q = torch.randn(B, m, generator=gen, dtype=torch.float64) * m**0.5
    return Q.to(device, dtype), q.to(device, dtype)


def timed(fn, repeats: int):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset (CI smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--qpth-budget", type=float, default=120.0, help="skip qpth cases slower than this (s)")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable] + sys.argv))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    has_qpth = importlib.util.find_spec("qpth") is not None
    batches, sizes = ((1, 16), (5, 20)) if args.quick else ((1, 16, 256), (5, 20, 50, 200))
    gen = torch.Generator().manual_seed(0)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} qpth={'yes' if has_qpth else 'not installed'}")
    header = f"{'B':>4} {'m':>4} {'rank':>5} | {'builtin ms':>11} {'resid':>8} {'solved':>7} | {'qpth ms':>9} {'resid':>8} {'solved':>7} | {'speedup':>7}"
    print(header)
    print("-" * len(header))
    skipped = []
    for B in batches:
        for m in sizes:
            for rank_deficient in (False, True):
                Q, q = make_problem(B, m, rank_deficient, device, dtype, gen)
                repeats = max(1, min(50, int(2e6 / (B * m * m + 1e4))))
                t_ours, ours = timed(lambda: solve_box_qp(Q, q, 0.0, 1.0), repeats)
                row = (
                    f"{B:>4} {m:>4} {'def' if rank_deficient else 'full':>5} | {t_ours * 1e3:>11.3f} "
                    f"{ours.residual.max().item():>8.1e} {ours.solved.float().mean().item():>7.0%} |"
                )
                if has_qpth and not (B * m**3 > 256 * 200**3 // 2 and args.quick):
                    start = time.perf_counter()
                    theirs = solve_box_qp(Q, q, 0.0, 1.0, backend="qpth", tol=1e-12, max_iter=20)
                    once = time.perf_counter() - start
                    if once * 2 > args.qpth_budget:
                        t_theirs = once
                    else:
                        t_theirs, theirs = timed(
                            lambda: solve_box_qp(Q, q, 0.0, 1.0, backend="qpth", tol=1e-12, max_iter=20),
                            max(1, min(repeats, int(args.qpth_budget / 4 / max(once, 1e-6)))),
                        )
                    row += (
                        f" {t_theirs * 1e3:>9.2f} {theirs.residual.max().item():>8.1e} "
                        f"{theirs.solved.float().mean().item():>7.0%} | {t_theirs / t_ours:>6.1f}x"
                    )
                else:
                    row += f" {'-':>9} {'-':>8} {'-':>7} | {'-':>7}"
                print(row, flush=True)
    if skipped:
        print("skipped:", ", ".join(skipped))


if __name__ == "__main__":
    main()
