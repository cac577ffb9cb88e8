"""What the example scripts share: a problem description that both the examples and
``benchmarks/vs_pygranso.py`` can solve, and a check that fails loudly.

An example module exposes ``build(quick: bool) -> Problem`` and ``main(argv=None) -> int``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

import constrained_optim as co


@dataclass
class Problem:
    """A deterministic problem ``min objective() s.t. constraints`` over ``model.parameters()``.

    Attributes:
        name: short name for tables.
        model: a float64 ``torch.nn.Module`` whose parameters are the variables (so that solvers that work
            on modules, PyGRANSO's ``nn_model`` mode included, see the same variables).
        objective: zero-argument callable returning the scalar objective at the current parameters.
        constraints: ``co.ineq`` / ``co.eq`` constraints and ``co`` sets, functions of the parameters.
        f_opt: the known optimum or an independent oracle's value (None when there is none).
        oracle: where ``f_opt`` comes from (closed form, SciPy, scikit-learn, ...).
        reset: restores the starting point (benchmarks solve the same problem several times).
        options: options for ``co.minimize`` that this problem needs (e.g. ``max_iter``).
    """

    name: str
    model: torch.nn.Module
    objective: Callable[[], torch.Tensor]
    constraints: list
    f_opt: float | None = None
    oracle: str = ""
    reset: Callable[[], None] = lambda: None
    options: dict = field(default_factory=dict)


def parse(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the small instance CI runs")
    return parser.parse_args(argv)


def report(problem: Problem, result: co.OptimizeResult, rel_tol: float = 1e-6, require_certificate: bool = True) -> int:
    """Print the certificate and the comparison with the known optimum; return the exit code (0: the
    answer is right: within ``rel_tol`` of ``f_opt`` and, if ``require_certificate``, certified)."""
    print(result.certificate)
    ok = result.success or not require_certificate
    if problem.f_opt is not None:
        rel = abs(result.fun - problem.f_opt) / max(1.0, abs(problem.f_opt))
        print(f"objective {result.fun:.10g}, known optimum {problem.f_opt:.10g} ({problem.oracle}), "
              f"relative gap {rel:.2e} (allowed {rel_tol:g})")
        ok = ok and rel <= rel_tol
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def single_threaded(run: Callable, *args):
    """``run(*args)`` with one intra-op thread, restoring the setting afterwards. The examples' problems are
    small: on a loaded 2-core machine two threads made one 30 × 30 eigenvalue evaluation 75 ms instead of
    0.3 ms (measured), so one thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(*args)
    finally:
        torch.set_num_threads(threads)
