#!/usr/bin/env python
"""Minimal ℓ2 adversarial perturbations of many images: one BatchedSQP batch vs one image at a time.

A small MLP z(x) ∈ R¹⁰ (64-32-10, tanh, float64, full-batch Adam with a fixed seed for a few seconds) is
trained on scikit-learn's ``load_digits`` (pixels scaled to [0, 1]). For each of the first N correctly
classified test images x (label y) the smallest perturbation that changes its decision solves

    minimize   ½ ‖x' − x‖²                                 (smooth; same minimizer as ‖x' − x‖₂)
    subject to z_y(x') − max_{j≠y} z_j(x') ≤ 0               (misclassified; one nonsmooth row)
               −x' ≤ 0,  x' − 1 ≤ 0                          (a valid image; 128 rows, shape (64, 2))

from x' = x (infeasible: x is classified correctly); the reported radius is ‖x' − x‖₂. The problem is
nonconvex, so each solver returns a local minimizer; started at the same point, the batched and the
single-problem solvers should find the same one. Solved

* batched: one ``co.BatchedSQP`` with B = N (the variable is an (N, 64) tensor; f has shape (N,), the margin
  constraint (N,), the box (N, 64, 2)),
* one at a time: ``co.ConstrainedSQP`` (through ``co.minimize``) on each image with the same rows,
* with ``--b1`` also ``co.BatchedSQP`` with B = 1 on each image (the batched code, alone).

``--no-box`` drops the box (one constraint row: the QPs have size 1 instead of 129), which shows the regime
where per-iteration overhead rather than QP arithmetic dominates.

Printed: wall time of each way and the ratio, the number certified (status CONVERGED), the largest
|r_batch − r_single| over images that both certified (the bar is 1e-4), the median radius, and a check that
every certified batch answer is misclassified (margin ≤ 1e-8) and in the box.

    python benchmarks/robustness_batch_bench.py            # N = 256
    python benchmarks/robustness_batch_bench.py --quick    # N = 16
    python benchmarks/robustness_batch_bench.py --b1       # adds the B = 1 runs
    python benchmarks/robustness_batch_bench.py --no-box   # without the box constraint
    python benchmarks/robustness_batch_bench.py --device cuda   # the solves on a GPU (the network is trained
                                                                # on the CPU, then moved)

Runs with one intra-op thread (``torch.set_num_threads(1)``); on a GPU the times are taken after
``torch.cuda.synchronize``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

import constrained_optim as co  # noqa: E402

MAX_ITER = 500
AGREEMENT = 1e-4


def train(seed: int = 0, steps: int = 400) -> dict:
    """The trained network (frozen) and the test images, float64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = order[:1400], order[1400:]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    start = time.perf_counter()
    for _ in range(steps):
        adam.zero_grad()
        torch.nn.functional.cross_entropy(net(X[train_idx]), y[train_idx]).backward()
        adam.step()
    seconds = time.perf_counter() - start
    net.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(X[test_idx]).argmax(1) == y[test_idx]).double().mean())
    return {"net": net, "X": X[test_idx], "y": y[test_idx], "accuracy": accuracy, "seconds": seconds}


def margin(net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """z_y(x) − max_{j≠y} z_j(x) for x (..., 64) and labels of shape (...): positive iff classified as y."""
    z = net(x)
    z_y = z.gather(-1, label[..., None])[..., 0]
    others = z.masked_fill(torch.nn.functional.one_hot(label, 10).bool(), float("-inf"))
    return z_y - others.amax(-1)


def box_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., 64, 2): −x ≤ 0 and x − 1 ≤ 0 per pixel."""
    return torch.stack([-x, x - 1.0], dim=-1)


def constraints(net, x_adv: torch.Tensor, label: torch.Tensor, box: bool) -> list:
    """Misclassified (one row) and, with ``box``, 0 <= x' <= 1 (128 rows), for one image or a batch."""
    rows = [co.ineq(lambda: margin(net, x_adv, label), name="misclassified")]
    return rows + [co.ineq(lambda: box_rows(x_adv), name="box")] if box else rows


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve_batched(net, X: torch.Tensor, y: torch.Tensor, box: bool = True, **options) -> dict:
    """All images as one BatchedSQP batch. Returns radii (on the CPU), statuses, x' and the time."""
    x_adv = X.clone().requires_grad_(True)
    opt = co.BatchedSQP([x_adv], constraints(net, x_adv, y, box), **options)
    _synchronize(X.device)
    start = time.perf_counter()
    for _ in range(MAX_ITER + 1):          # the first step only evaluates and certifies the start
        opt.step(lambda: 0.5 * (x_adv - X).pow(2).sum(-1))
        if bool(opt.finished.all()):
            break
    _synchronize(X.device)
    seconds = time.perf_counter() - start
    return {"radius": (x_adv.detach() - X).norm(dim=-1).cpu(), "status": opt.status, "x": x_adv.detach(),
            "seconds": seconds, "iterations": opt.iterations.clone(), "nfev": opt.nfev}


def solve_single(net, x: torch.Tensor, label: torch.Tensor, box: bool, batched: bool) -> tuple[float, co.Status]:
    """One image: ConstrainedSQP through co.minimize, or BatchedSQP with B = 1 (``batched``)."""
    if batched:
        out = solve_batched(net, x[None], label[None], box)
        return float(out["radius"][0]), out["status"][0]
    x_adv = x.clone().requires_grad_(True)
    result = co.minimize(lambda: 0.5 * (x_adv - x).pow(2).sum(), [x_adv], constraints(net, x_adv, label, box),
                         max_iter=MAX_ITER)
    return float((x_adv.detach() - x).norm()), result.status


def one_at_a_time(net, X, y, box: bool, batched: bool) -> dict:
    _synchronize(X.device)
    start = time.perf_counter()
    runs = [solve_single(net, X[i], y[i], box, batched) for i in range(len(y))]
    _synchronize(X.device)
    seconds = time.perf_counter() - start
    return {"radius": torch.tensor([r for r, _ in runs], dtype=torch.float64), "status": [s for _, s in runs],
            "seconds": seconds}


def summarize(name: str, run: dict, reference: dict | None) -> dict:
    converged = torch.tensor([s is co.Status.CONVERGED for s in run["status"]])
    others = sorted({s.name for s in run["status"]} - {"CONVERGED"})
    row = {"name": name, "seconds": run["seconds"], "converged": int(converged.sum()), "count": len(converged),
           "status": run["status"], "radius": run["radius"], "certified": converged,
           "others": ", ".join(f"{sum(s.name == o for s in run['status'])} {o}" for o in others)}
    if reference is not None:
        both = converged & torch.tensor([s is co.Status.CONVERGED for s in reference["status"]])
        gap = (run["radius"] - reference["radius"]).abs()[both]
        row.update(both=int(both.sum()), max_gap=float(gap.max()) if both.any() else float("nan"),
                   ratio=run["seconds"] / reference["seconds"])
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images instead of 256")
    parser.add_argument("--b1", action="store_true", help="also solve each image with BatchedSQP, B = 1")
    parser.add_argument("--no-box", dest="box", action="store_false", help="drop the box constraint")
    parser.add_argument("--device", default="cpu", help="where the problems are solved (default cpu; e.g. cuda)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    count = 16 if args.quick else 256
    data = train()
    net = data["net"].to(device)
    with torch.no_grad():
        right = (net(data["X"].to(device)).argmax(1).cpu() == data["y"]).nonzero().reshape(-1)[:count]
    X, y = data["X"][right].to(device), data["y"][right].to(device)
    print(f"command: python {' '.join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))}")
    print(f"MLP 64-32-10 tanh, trained {data['seconds']:.1f} s, test accuracy {data['accuracy']:.3f}; "
          f"{len(y)} correctly classified test images; box {'as 128 rows' if args.box else 'dropped'}; "
          f"torch {torch.__version__}, 1 thread, float64, device {device}")

    batch = solve_batched(net, X, y, args.box)
    rows = [summarize(f"BatchedSQP, B = {len(y)}", batch, None)]
    single = one_at_a_time(net, X, y, args.box, batched=False)
    rows.append(summarize("ConstrainedSQP, one at a time", single, batch))
    if args.b1:
        rows.append(summarize("BatchedSQP, B = 1, one at a time", one_at_a_time(net, X, y, args.box, batched=True),
                              batch))

    everywhere = torch.stack([row["certified"] for row in rows]).all(0)
    print(f"\n{'solver':<34} {'certified':>10} {'wall time':>10} {'time/batch':>10} {'median radius':>14} "
          f"{'max |r - r_batch|':>18}")
    for row in rows:
        row["median"] = float(row["radius"][everywhere].median()) if everywhere.any() else float("nan")
        ratio = f"{row['ratio']:.1f}x" if "ratio" in row else "1.0x"
        gap = f"{row['max_gap']:.1e} ({row['both']})" if "max_gap" in row else "-"
        print(f"{row['name']:<34} {row['converged']:>4}/{row['count']:<5} {row['seconds']:>9.1f}s {ratio:>10} "
              f"{row['median']:>14.6f} {gap:>18}")
    print(f"(median over the {int(everywhere.sum())} images certified in every run; max |r - r_batch| over the images "
          "certified by both, their number in brackets)")
    for row in rows:
        if row["others"]:
            print(f"{row['name']}, not certified: {row['others']}")

    certified = torch.tensor([s is co.Status.CONVERGED for s in batch["status"]])
    with torch.no_grad():
        wrong = margin(net, batch["x"], y) <= 1e-8
    in_box = ((batch["x"] >= -1e-8) & (batch["x"] <= 1 + 1e-8)).all(-1) | (not args.box)
    valid = bool((wrong & in_box).cpu()[certified].all())
    its = batch["iterations"].double()
    print(f"\nbatch: {batch['nfev']} closure calls, iterations per image median {its.median():.0f}, max "
          f"{its.max():.0f}; every certified batch answer misclassified{' and in the box' if args.box else ''}: "
          f"{valid}")
    for row in rows[1:]:
        both = [i for i in range(len(y)) if batch["status"][i] is co.Status.CONVERGED
                and row["status"][i] is co.Status.CONVERGED]
        apart = [(i, float(batch["radius"][i]), float(row["radius"][i])) for i in both
                 if abs(float(batch["radius"][i] - row["radius"][i])) > AGREEMENT]
        print(f"{row['name']}: {len(both) - len(apart)} of {len(both)} images certified by both within "
              f"{AGREEMENT:g}" + "".join(f"; image {i}: r_batch {rb:.6f}, r {r:.6f}" for i, rb, r in apart[:5]))
    agree = all(row.get("max_gap", 0.0) <= AGREEMENT for row in rows)
    return {"rows": [{k: v for k, v in row.items() if k not in ("status", "radius", "certified")} for row in rows],
            "valid": valid, "agree": agree}


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["valid"] and outcome["agree"] else 1)
