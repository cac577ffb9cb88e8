"""Known-solution constrained optimization problems for testing and benchmarking.

Every problem is stated in the form

    minimize   f(x)
    subject to ineq(x) <= 0   (elementwise; simple bounds are included here)
               eq(x)   == 0

with ``f``, ``ineq`` and ``eq`` written with torch operations so that they are
autograd-differentiable and work for float32 as well as float64 inputs.

Contents
--------
* Classic Hock-Schittkowski problems (W. Hock, K. Schittkowski, "Test Examples
  for Nonlinear Programming Codes", Lecture Notes in Economics and Mathematical
  Systems 187, Springer 1981; K. Schittkowski, "More Test Examples for Nonlinear
  Programming Codes", LNEMS 282, Springer 1987).  Names are ``hsNNN``.
* Equality-constrained convex quadratics (closed-form KKT solution).
* An inequality-constrained convex problem (quadratic objective, ball and linear
  constraints; reference value from a tight scipy solve, cached).
* The nonsmooth constrained Rosenbrock problem (Curtis, Mitchell & Overton,
  "A BFGS-SQP method for nonsmooth, nonconvex, constrained optimization and
  its evaluation using relative minimization profiles", Optim. Methods Softw.
  32(1), 2017) from several starting points.
* Trace maximization on the Stiefel manifold, min -tr(V^T A V) s.t. V^T V = I
  (optimum: minus the sum of the k largest eigenvalues of A, Ky Fan 1949).
* A soft-margin linear SVM in primal form (reference value from the dual QP).

Helpers: :data:`ALL_PROBLEMS`, :func:`get_problem`, :func:`make_torch_problem`,
:func:`slsqp_solve`, :func:`evaluate`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Problem",
    "ALL_PROBLEMS",
    "HS_PROBLEMS",
    "PROBLEMS_BY_NAME",
    "get_problem",
    "max_iter_for",
    "MAX_ITER_HINT",
    "QUICK",
    "make_torch_problem",
    "slsqp_solve",
    "evaluate",
    "violation",
    "rel_error",
]


@dataclass(frozen=True)
class Problem:
    name: str
    n: int
    x0: tuple[float, ...]
    f: Callable[[Tensor], Tensor]
    ineq: Optional[Callable[[Tensor], Tensor]]
    eq: Optional[Callable[[Tensor], Tensor]]
    f_opt: float
    x_opt: Optional[tuple[float, ...]]
    smooth: bool = True
    source: str = ""

    def __repr__(self) -> str:  # keeps pytest ids / tables readable
        return f"Problem({self.name}, n={self.n})"

    @property
    def n_ineq(self) -> int:
        return 0 if self.ineq is None else int(self.ineq(torch.tensor(self.x0, dtype=torch.float64)).numel())

    @property
    def n_eq(self) -> int:
        return 0 if self.eq is None else int(self.eq(torch.tensor(self.x0, dtype=torch.float64)).numel())


# ---------------------------------------------------------------------------
# small building blocks
# ---------------------------------------------------------------------------

def _vec(*terms: Tensor) -> Tensor:
    """Stack scalar tensors into a 1-D tensor."""
    return torch.stack(list(terms))


def _box(lo, hi) -> Callable[[Tensor], Tensor]:
    """Bound constraints lo <= x <= hi as ``lo - x <= 0`` and ``x - hi <= 0``.

    ``None`` or +-inf entries are skipped.  Lower bounds come first.
    """
    lo_idx = [i for i, v in enumerate(lo) if v is not None and math.isfinite(v)]
    hi_idx = [i for i, v in enumerate(hi) if v is not None and math.isfinite(v)]
    lo_val = [float(lo[i]) for i in lo_idx]
    hi_val = [float(hi[i]) for i in hi_idx]

    def g(x: Tensor) -> Tensor:
        parts = []
        if lo_idx:
            parts.append(torch.tensor(lo_val, dtype=x.dtype, device=x.device) - x[lo_idx])
        if hi_idx:
            parts.append(x[hi_idx] - torch.tensor(hi_val, dtype=x.dtype, device=x.device))
        return torch.cat(parts)

    return g


def _cat(*fns: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def g(x: Tensor) -> Tensor:
        return torch.cat([fn(x).reshape(-1) for fn in fns])

    return g


def _nonneg(n: int) -> Callable[[Tensor], Tensor]:
    return _box([0.0] * n, [None] * n)


HS_BOOK = "Hock & Schittkowski (1981), problem {}"
SCHITT_BOOK = "Schittkowski (1987), problem {}"
_RECOMP = ("f_opt/x_opt recomputed to full precision (SLSQP ftol 1e-16 + Newton on the KKT system of the "
           "active set, KKT residual < 1e-13, multipliers > 0)")


def _hs(num, n, x0, f, ineq=None, eq=None, *, f_opt, x_opt, note="", book=HS_BOOK) -> Problem:
    src = book.format(num) + (f"; {note}" if note else "")
    return Problem(
        name=f"hs{num:03d}",
        n=n,
        x0=tuple(float(v) for v in x0),
        f=f,
        ineq=ineq,
        eq=eq,
        f_opt=float(f_opt),
        x_opt=None if x_opt is None else tuple(float(v) for v in x_opt),
        smooth=True,
        source=src,
    )


# ---------------------------------------------------------------------------
# Hock-Schittkowski problems.  HS constraints g(x) >= 0 are written as -g <= 0.
# ---------------------------------------------------------------------------

def _build_hs() -> list[Problem]:
    P: list[Problem] = []
    s2 = math.sqrt(2.0)

    # HS1: bound-constrained Rosenbrock.
    P.append(_hs(1, 2, (-2.0, 1.0),
                 lambda x: 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2,
                 ineq=lambda x: _vec(-1.5 - x[1]),
                 f_opt=0.0, x_opt=(1.0, 1.0)))

    # HS6: equality, Rosenbrock-like.
    P.append(_hs(6, 2, (-1.2, 1.0),
                 lambda x: (1 - x[0]) ** 2,
                 eq=lambda x: _vec(10 * (x[1] - x[0] ** 2)),
                 f_opt=0.0, x_opt=(1.0, 1.0)))

    # HS7: nonconvex equality.
    P.append(_hs(7, 2, (2.0, 2.0),
                 lambda x: torch.log(1 + x[0] ** 2) - x[1],
                 eq=lambda x: _vec((1 + x[0] ** 2) ** 2 + x[1] ** 2 - 4),
                 f_opt=-math.sqrt(3.0), x_opt=(0.0, math.sqrt(3.0))))

    # HS9: periodic objective, linear equality; minima at (12k-3, 16k-4), all f=-0.5.
    P.append(_hs(9, 2, (0.0, 0.0),
                 lambda x: torch.sin(math.pi * x[0] / 12) * torch.cos(math.pi * x[1] / 16),
                 eq=lambda x: _vec(4 * x[0] - 3 * x[1]),
                 f_opt=-0.5, x_opt=(-3.0, -4.0),
                 note="infinitely many global minima (12k-3, 16k-4)"))

    # HS10: linear objective, nonconvex quadratic inequality.
    P.append(_hs(10, 2, (-10.0, 10.0),
                 lambda x: x[0] - x[1],
                 ineq=lambda x: _vec(3 * x[0] ** 2 - 2 * x[0] * x[1] + x[1] ** 2 - 1),
                 f_opt=-1.0, x_opt=(0.0, 1.0)))

    # HS11
    P.append(_hs(11, 2, (4.9, 0.1),
                 lambda x: (x[0] - 5) ** 2 + x[1] ** 2 - 25,
                 ineq=lambda x: _vec(x[0] ** 2 - x[1]),
                 f_opt=-8.498464223154677, x_opt=(1.23477282505, 1.52466392949),
                 note=_RECOMP))

    # HS12
    P.append(_hs(12, 2, (0.0, 0.0),
                 lambda x: 0.5 * x[0] ** 2 + x[1] ** 2 - x[0] * x[1] - 7 * x[0] - 7 * x[1],
                 ineq=lambda x: _vec(4 * x[0] ** 2 + x[1] ** 2 - 25),
                 f_opt=-30.0, x_opt=(2.0, 3.0)))

    # HS14: mixed.
    P.append(_hs(14, 2, (2.0, 2.0),
                 lambda x: (x[0] - 2) ** 2 + (x[1] - 1) ** 2,
                 ineq=lambda x: _vec(x[0] ** 2 / 4 + x[1] ** 2 - 1),
                 eq=lambda x: _vec(x[0] - 2 * x[1] + 1),
                 f_opt=9 - 23 * math.sqrt(7.0) / 8,
                 x_opt=((math.sqrt(7.0) - 1) / 2, (math.sqrt(7.0) + 1) / 4)))

    # HS15: Rosenbrock with nonconvex constraints and a bound.
    P.append(_hs(15, 2, (-2.0, 1.0),
                 lambda x: 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2,
                 ineq=_cat(lambda x: _vec(1 - x[0] * x[1], -x[0] - x[1] ** 2),
                           _box([None, None], [0.5, None])),
                 f_opt=306.5, x_opt=(0.5, 2.0)))

    # HS18
    P.append(_hs(18, 2, (2.0, 2.0),
                 lambda x: 0.01 * x[0] ** 2 + x[1] ** 2,
                 ineq=_cat(lambda x: _vec(25 - x[0] * x[1], 25 - x[0] ** 2 - x[1] ** 2),
                           _box([2.0, 0.0], [50.0, 50.0])),
                 f_opt=5.0, x_opt=(math.sqrt(250.0), math.sqrt(2.5))))

    # HS21: linear constraint + bounds, infeasible start.
    P.append(_hs(21, 2, (-1.0, -1.0),
                 lambda x: 0.01 * x[0] ** 2 + x[1] ** 2 - 100,
                 ineq=_cat(lambda x: _vec(10 - 10 * x[0] + x[1]),
                           _box([2.0, -50.0], [50.0, 50.0])),
                 f_opt=-99.96, x_opt=(2.0, 0.0)))

    # HS22
    P.append(_hs(22, 2, (2.0, 2.0),
                 lambda x: (x[0] - 2) ** 2 + (x[1] - 1) ** 2,
                 ineq=lambda x: _vec(x[0] + x[1] - 2, x[0] ** 2 - x[1]),
                 f_opt=1.0, x_opt=(1.0, 1.0)))

    # HS23: many nonconvex inequalities, several active at the solution.
    P.append(_hs(23, 2, (3.0, 1.0),
                 lambda x: x[0] ** 2 + x[1] ** 2,
                 ineq=_cat(lambda x: _vec(1 - x[0] - x[1],
                                          1 - x[0] ** 2 - x[1] ** 2,
                                          9 - 9 * x[0] ** 2 - x[1] ** 2,
                                          x[1] - x[0] ** 2,
                                          x[0] - x[1] ** 2),
                           _box([-50.0, -50.0], [50.0, 50.0])),
                 f_opt=2.0, x_opt=(1.0, 1.0)))

    # HS26: degenerate (singular Hessian at the solution).
    P.append(_hs(26, 3, (-2.6, 2.0, 2.0),
                 lambda x: (x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 4,
                 eq=lambda x: _vec((1 + x[1] ** 2) * x[0] + x[2] ** 4 - 3),
                 f_opt=0.0, x_opt=(1.0, 1.0, 1.0),
                 note="degenerate: f grows quartically near the solution"))

    # HS27
    P.append(_hs(27, 3, (2.0, 2.0, 2.0),
                 lambda x: 0.01 * (x[0] - 1) ** 2 + (x[1] - x[0] ** 2) ** 2,
                 eq=lambda x: _vec(x[0] + x[2] ** 2 + 1),
                 f_opt=0.04, x_opt=(-1.0, 1.0, 0.0)))

    # HS28: convex quadratic, one linear equality.
    P.append(_hs(28, 3, (-4.0, 1.0, 1.0),
                 lambda x: (x[0] + x[1]) ** 2 + (x[1] + x[2]) ** 2,
                 eq=lambda x: _vec(x[0] + 2 * x[1] + 3 * x[2] - 1),
                 f_opt=0.0, x_opt=(0.5, -0.5, 0.5)))

    # HS29: nonconvex objective, ellipsoid constraint.
    P.append(_hs(29, 3, (1.0, 1.0, 1.0),
                 lambda x: -x[0] * x[1] * x[2],
                 ineq=lambda x: _vec(x[0] ** 2 + 2 * x[1] ** 2 + 4 * x[2] ** 2 - 48),
                 f_opt=-16 * s2, x_opt=(4.0, 2 * s2, 2.0)))

    # HS32: mixed, degenerate start of active set (x = (0,0,1) has 3 active bounds).
    P.append(_hs(32, 3, (0.1, 0.7, 0.2),
                 lambda x: (x[0] + 3 * x[1] + x[2]) ** 2 + 4 * (x[0] - x[1]) ** 2,
                 ineq=_cat(lambda x: _vec(x[0] ** 3 - 6 * x[1] - 4 * x[2] + 3), _nonneg(3)),
                 eq=lambda x: _vec(1 - x[0] - x[1] - x[2]),
                 f_opt=1.0, x_opt=(0.0, 0.0, 1.0)))

    # HS34: linear objective, exponential constraints.
    P.append(_hs(34, 3, (0.0, 1.05, 2.9),
                 lambda x: -x[0],
                 ineq=_cat(lambda x: _vec(torch.exp(x[0]) - x[1], torch.exp(x[1]) - x[2]),
                           _box([0.0, 0.0, 0.0], [100.0, 100.0, 10.0])),
                 f_opt=-math.log(math.log(10.0)),
                 x_opt=(math.log(math.log(10.0)), math.log(10.0), 10.0)))

    # HS35 (Beale): convex QP.
    P.append(_hs(35, 3, (0.5, 0.5, 0.5),
                 lambda x: (9 - 8 * x[0] - 6 * x[1] - 4 * x[2] + 2 * x[0] ** 2 + 2 * x[1] ** 2
                            + x[2] ** 2 + 2 * x[0] * x[1] + 2 * x[0] * x[2]),
                 ineq=_cat(lambda x: _vec(x[0] + x[1] + 2 * x[2] - 3), _nonneg(3)),
                 f_opt=1.0 / 9.0, x_opt=(4.0 / 3.0, 7.0 / 9.0, 4.0 / 9.0)))

    # HS37: nonconvex objective, linear constraints.
    P.append(_hs(37, 3, (10.0, 10.0, 10.0),
                 lambda x: -x[0] * x[1] * x[2],
                 ineq=_cat(lambda x: _vec(x[0] + 2 * x[1] + 2 * x[2] - 72, -x[0] - 2 * x[1] - 2 * x[2]),
                           _box([0.0] * 3, [42.0] * 3)),
                 f_opt=-3456.0, x_opt=(24.0, 12.0, 12.0)))

    # HS39
    P.append(_hs(39, 4, (2.0, 2.0, 2.0, 2.0),
                 lambda x: -x[0],
                 eq=lambda x: _vec(x[1] - x[0] ** 3 - x[2] ** 2, x[0] ** 2 - x[1] - x[3] ** 2),
                 f_opt=-1.0, x_opt=(1.0, 1.0, 0.0, 0.0)))

    # HS40
    P.append(_hs(40, 4, (0.8, 0.8, 0.8, 0.8),
                 lambda x: -x[0] * x[1] * x[2] * x[3],
                 eq=lambda x: _vec(x[0] ** 3 + x[1] ** 2 - 1,
                                   x[0] ** 2 * x[3] - x[2],
                                   x[3] ** 2 - x[1]),
                 f_opt=-0.25,
                 x_opt=(2 ** (-1 / 3), 2 ** (-1 / 2), 2 ** (-11 / 12), 2 ** (-1 / 4))))

    # HS42
    P.append(_hs(42, 4, (1.0, 1.0, 1.0, 1.0),
                 lambda x: (x[0] - 1) ** 2 + (x[1] - 2) ** 2 + (x[2] - 3) ** 2 + (x[3] - 4) ** 2,
                 eq=lambda x: _vec(x[0] - 2, x[2] ** 2 + x[3] ** 2 - 2),
                 f_opt=28 - 10 * s2, x_opt=(2.0, 2.0, 0.6 * s2, 0.8 * s2)))

    # HS43: Rosen-Suzuki.
    P.append(_hs(43, 4, (0.0, 0.0, 0.0, 0.0),
                 lambda x: (x[0] ** 2 + x[1] ** 2 + 2 * x[2] ** 2 + x[3] ** 2
                            - 5 * x[0] - 5 * x[1] - 21 * x[2] + 7 * x[3]),
                 ineq=lambda x: _vec(
                     x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + x[3] ** 2 + x[0] - x[1] + x[2] - x[3] - 8,
                     x[0] ** 2 + 2 * x[1] ** 2 + x[2] ** 2 + 2 * x[3] ** 2 - x[0] - x[3] - 10,
                     2 * x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + 2 * x[0] - x[1] - x[3] - 5),
                 f_opt=-44.0, x_opt=(0.0, 1.0, 2.0, -1.0)))

    # HS44: indefinite bilinear objective over a polytope (several local minima).
    P.append(_hs(44, 4, (0.0, 0.0, 0.0, 0.0),
                 lambda x: (x[0] - x[1] - x[2] - x[0] * x[2] + x[0] * x[3]
                            + x[1] * x[2] - x[1] * x[3]),
                 ineq=_cat(lambda x: _vec(x[0] + 2 * x[1] - 8,
                                          4 * x[0] + x[1] - 12,
                                          3 * x[0] + 4 * x[1] - 12,
                                          2 * x[2] + x[3] - 8,
                                          x[2] + 2 * x[3] - 8,
                                          x[2] + x[3] - 5),
                           _nonneg(4)),
                 f_opt=-15.0, x_opt=(0.0, 3.0, 0.0, 4.0),
                 note="nonconvex, local minima at vertices"))

    # HS46: degenerate.
    P.append(_hs(46, 5, (0.5 * s2, 1.75, 0.5, 2.0, 2.0),
                 lambda x: (x[0] - x[1]) ** 2 + (x[2] - 1) ** 2 + (x[3] - 1) ** 4 + (x[4] - 1) ** 6,
                 eq=lambda x: _vec(x[0] ** 2 * x[3] + torch.sin(x[3] - x[4]) - 1,
                                   x[1] + x[2] ** 4 * x[3] ** 2 - 2),
                 f_opt=0.0, x_opt=(1.0,) * 5,
                 note="degenerate: quartic/sextic terms vanish at the solution"))

    # HS47
    P.append(_hs(47, 5, (2.0, s2, -1.0, 2 - s2, 0.5),
                 lambda x: ((x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 3
                            + (x[2] - x[3]) ** 4 + (x[3] - x[4]) ** 4),
                 eq=lambda x: _vec(x[0] + x[1] ** 2 + x[2] ** 3 - 3,
                                   x[1] - x[2] ** 2 + x[3] - 1,
                                   x[0] * x[4] - 1),
                 f_opt=0.0, x_opt=(1.0,) * 5))

    # HS48: convex QP, linear equalities.
    P.append(_hs(48, 5, (3.0, 5.0, -3.0, 2.0, -2.0),
                 lambda x: (x[0] - 1) ** 2 + (x[1] - x[2]) ** 2 + (x[3] - x[4]) ** 2,
                 eq=lambda x: _vec(x[0] + x[1] + x[2] + x[3] + x[4] - 5,
                                   x[2] - 2 * (x[3] + x[4]) + 3),
                 f_opt=0.0, x_opt=(1.0,) * 5))

    # HS49: degenerate, linear equalities.
    P.append(_hs(49, 5, (10.0, 7.0, 2.0, -3.0, 0.8),
                 lambda x: (x[0] - x[1]) ** 2 + (x[2] - 1) ** 2 + (x[3] - 1) ** 4 + (x[4] - 1) ** 6,
                 eq=lambda x: _vec(x[0] + x[1] + x[2] + 4 * x[3] - 7, x[2] + 5 * x[4] - 6),
                 f_opt=0.0, x_opt=(1.0,) * 5,
                 note="degenerate: quartic/sextic terms vanish at the solution"))

    # HS50
    P.append(_hs(50, 5, (35.0, -31.0, 11.0, 5.0, -5.0),
                 lambda x: ((x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 2
                            + (x[2] - x[3]) ** 4 + (x[3] - x[4]) ** 2),
                 eq=lambda x: _vec(x[0] + 2 * x[1] + 3 * x[2] - 6,
                                   x[1] + 2 * x[2] + 3 * x[3] - 6,
                                   x[2] + 2 * x[3] + 3 * x[4] - 6),
                 f_opt=0.0, x_opt=(1.0,) * 5))

    # HS51
    P.append(_hs(51, 5, (2.5, 0.5, 2.0, -1.0, 0.5),
                 lambda x: (x[0] - x[1]) ** 2 + (x[1] + x[2] - 2) ** 2 + (x[3] - 1) ** 2 + (x[4] - 1) ** 2,
                 eq=lambda x: _vec(x[0] + 3 * x[1] - 4, x[2] + x[3] - 2 * x[4], x[1] - x[4]),
                 f_opt=0.0, x_opt=(1.0,) * 5))

    # HS52
    P.append(_hs(52, 5, (2.0,) * 5,
                 lambda x: (4 * x[0] - x[1]) ** 2 + (x[1] + x[2] - 2) ** 2 + (x[3] - 1) ** 2 + (x[4] - 1) ** 2,
                 eq=lambda x: _vec(x[0] + 3 * x[1], x[2] + x[3] - 2 * x[4], x[1] - x[4]),
                 f_opt=1859.0 / 349.0,
                 x_opt=tuple(v / 349.0 for v in (-33.0, 11.0, 180.0, -158.0, 11.0))))

    # HS53: HS51 objective, HS52 constraints, bounds; infeasible start.
    P.append(_hs(53, 5, (2.0,) * 5,
                 lambda x: (x[0] - x[1]) ** 2 + (x[1] + x[2] - 2) ** 2 + (x[3] - 1) ** 2 + (x[4] - 1) ** 2,
                 ineq=_box([-10.0] * 5, [10.0] * 5),
                 eq=lambda x: _vec(x[0] + 3 * x[1], x[2] + x[3] - 2 * x[4], x[1] - x[4]),
                 f_opt=176.0 / 43.0,
                 x_opt=tuple(v / 43.0 for v in (-33.0, 11.0, 27.0, -5.0, 11.0))))

    # HS56: trigonometric equalities.
    a = math.asin(math.sqrt(1 / 4.2))
    b = math.asin(math.sqrt(5 / 7.2))
    P.append(_hs(56, 7, (1.0, 1.0, 1.0, a, a, a, b),
                 lambda x: -x[0] * x[1] * x[2],
                 eq=lambda x: _vec(x[0] - 4.2 * torch.sin(x[3]) ** 2,
                                   x[1] - 4.2 * torch.sin(x[4]) ** 2,
                                   x[2] - 4.2 * torch.sin(x[5]) ** 2,
                                   x[0] + 2 * x[1] + 2 * x[2] - 7.2 * torch.sin(x[6]) ** 2),
                 f_opt=-3.456,
                 x_opt=(2.4, 1.2, 1.2, math.asin(math.sqrt(4 / 7)), math.asin(math.sqrt(2 / 7)),
                        math.asin(math.sqrt(2 / 7)), math.pi / 2)))

    # HS60
    P.append(_hs(60, 3, (2.0, 2.0, 2.0),
                 lambda x: (x[0] - 1) ** 2 + (x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 4,
                 ineq=_box([-10.0] * 3, [10.0] * 3),
                 eq=lambda x: _vec(x[0] * (1 + x[1] ** 2) + x[2] ** 4 - 4 - 3 * s2),
                 f_opt=0.032568200255069873, x_opt=(1.10485901973, 1.19667418229, 1.53526226033),
                 note=_RECOMP))

    # HS61
    P.append(_hs(61, 3, (0.0, 0.0, 0.0),
                 lambda x: 4 * x[0] ** 2 + 2 * x[1] ** 2 + 2 * x[2] ** 2 - 33 * x[0] + 16 * x[1] - 24 * x[2],
                 eq=lambda x: _vec(3 * x[0] - 2 * x[1] ** 2 - 7, 4 * x[0] - x[2] ** 2 - 11),
                 f_opt=-143.64614219778025, x_opt=(5.32677013556, -2.11899863222, 3.21046422535),
                 note=_RECOMP))

    # HS63: nonconvex objective, mixed.
    P.append(_hs(63, 3, (2.0, 2.0, 2.0),
                 lambda x: 1000 - x[0] ** 2 - 2 * x[1] ** 2 - x[2] ** 2 - x[0] * x[1] - x[0] * x[2],
                 ineq=_nonneg(3),
                 eq=lambda x: _vec(8 * x[0] + 14 * x[1] + 7 * x[2] - 56,
                                   x[0] ** 2 + x[1] ** 2 + x[2] ** 2 - 25),
                 f_opt=961.7151721300521, x_opt=(3.51212134187, 0.216987941515, 3.55217115483),
                 note=_RECOMP))

    # HS65
    P.append(_hs(65, 3, (-5.0, 5.0, 0.0),
                 lambda x: (x[0] - x[1]) ** 2 + (x[0] + x[1] - 10) ** 2 / 9 + (x[2] - 5) ** 2,
                 ineq=_cat(lambda x: _vec(x[0] ** 2 + x[1] ** 2 + x[2] ** 2 - 48),
                           _box([-4.5, -4.5, -5.0], [4.5, 4.5, 5.0])),
                 f_opt=0.9535288568047826, x_opt=(3.65046172521, 3.65046172521, 4.62041755532),
                 note=_RECOMP))

    # HS71: the classic IPOPT example.
    P.append(_hs(71, 4, (1.0, 5.0, 5.0, 1.0),
                 lambda x: x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2],
                 ineq=_cat(lambda x: _vec(25 - x[0] * x[1] * x[2] * x[3]), _box([1.0] * 4, [5.0] * 4)),
                 eq=lambda x: _vec(x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + x[3] ** 2 - 40),
                 f_opt=17.014017289156303, x_opt=(1.0, 4.74299963726, 3.82114998418, 1.37940829317),
                 note=_RECOMP))

    # HS73: cattle feed (chance constraint with a square root).
    P.append(_hs(73, 4, (1.0, 1.0, 1.0, 1.0),
                 lambda x: 24.55 * x[0] + 26.75 * x[1] + 39 * x[2] + 40.50 * x[3],
                 ineq=_cat(lambda x: _vec(
                     5 - (2.3 * x[0] + 5.6 * x[1] + 11.1 * x[2] + 1.3 * x[3]),
                     21 + 1.645 * torch.sqrt(0.28 * x[0] ** 2 + 0.19 * x[1] ** 2 + 20.5 * x[2] ** 2
                                             + 0.62 * x[3] ** 2)
                     - (12 * x[0] + 11.9 * x[1] + 41.8 * x[2] + 52.1 * x[3])),
                     _nonneg(4)),
                 eq=lambda x: _vec(x[0] + x[1] + x[2] + x[3] - 1),
                 f_opt=29.894378159143358, x_opt=(0.635521568635, 0.0, 0.312701880752, 0.0517765506134),
                 note=_RECOMP))

    # HS76: convex QP with linear inequalities.
    P.append(_hs(76, 4, (0.5, 0.5, 0.5, 0.5),
                 lambda x: (x[0] ** 2 + 0.5 * x[1] ** 2 + x[2] ** 2 + 0.5 * x[3] ** 2 - x[0] * x[2]
                            + x[2] * x[3] - x[0] - 3 * x[1] + x[2] - x[3]),
                 ineq=_cat(lambda x: _vec(x[0] + 2 * x[1] + x[2] + x[3] - 5,
                                          3 * x[0] + x[1] + 2 * x[2] - x[3] - 4,
                                          1.5 - x[1] - 4 * x[2]),
                           _nonneg(4)),
                 f_opt=-103.0 / 22.0, x_opt=(3.0 / 11.0, 23.0 / 11.0, 0.0, 6.0 / 11.0)))

    # HS77
    P.append(_hs(77, 5, (2.0,) * 5,
                 lambda x: ((x[0] - 1) ** 2 + (x[0] - x[1]) ** 2 + (x[2] - 1) ** 2
                            + (x[3] - 1) ** 4 + (x[4] - 1) ** 6),
                 eq=lambda x: _vec(x[0] ** 2 * x[3] + torch.sin(x[3] - x[4]) - 2 * s2,
                                   x[1] + x[2] ** 4 * x[3] ** 2 - 8 - s2),
                 f_opt=0.24150512879017869,
                 x_opt=(1.16617218971, 1.1821113888, 1.38025704315, 1.50603627362, 0.610920196043),
                 note=_RECOMP))

    # HS78
    P.append(_hs(78, 5, (-2.0, 1.5, 2.0, -1.0, -1.0),
                 lambda x: x[0] * x[1] * x[2] * x[3] * x[4],
                 eq=lambda x: _vec((x ** 2).sum() - 10,
                                   x[1] * x[2] - 5 * x[3] * x[4],
                                   x[0] ** 3 + x[1] ** 3 + 1),
                 f_opt=-2.919700408963679,
                 x_opt=(-1.71714357039, 1.59570969018, 1.82724575293, -0.763643078184, -0.763643078184),
                 note=_RECOMP))

    # HS79
    P.append(_hs(79, 5, (2.0,) * 5,
                 lambda x: ((x[0] - 1) ** 2 + (x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 2
                            + (x[2] - x[3]) ** 4 + (x[3] - x[4]) ** 4),
                 eq=lambda x: _vec(x[0] + x[1] ** 2 + x[2] ** 3 - 2 - 3 * s2,
                                   x[1] - x[2] ** 2 + x[3] + 2 - 2 * s2,
                                   x[0] * x[4] - 2),
                 f_opt=0.07877682087105689,
                 x_opt=(1.19112745631, 1.36260316496, 1.47281793151, 1.63501661917, 1.67908143617),
                 note=_RECOMP))

    # HS80: exponential objective, HS78 constraints plus bounds.
    P.append(_hs(80, 5, (-2.0, 2.0, 2.0, -1.0, -1.0),
                 lambda x: torch.exp(x[0] * x[1] * x[2] * x[3] * x[4]),
                 ineq=_box([-2.3, -2.3, -3.2, -3.2, -3.2], [2.3, 2.3, 3.2, 3.2, 3.2]),
                 eq=lambda x: _vec((x ** 2).sum() - 10,
                                   x[1] * x[2] - 5 * x[3] * x[4],
                                   x[0] ** 3 + x[1] ** 3 + 1),
                 f_opt=0.05394984777027203,
                 x_opt=(-1.71714357039, 1.59570969018, 1.82724575293, -0.763643078184, -0.763643078184),
                 note=_RECOMP))

    # HS83: Colville no. 3 (large objective scale, two-sided nonlinear constraints).
    def hs83_c(x):
        return (85.334407 + 0.0056858 * x[1] * x[4] + 0.0006262 * x[0] * x[3] - 0.0022053 * x[2] * x[4],
                80.51249 + 0.0071317 * x[1] * x[4] + 0.0029955 * x[0] * x[1] + 0.0021813 * x[2] ** 2,
                9.300961 + 0.0047026 * x[2] * x[4] + 0.0012547 * x[0] * x[2] + 0.0019085 * x[2] * x[3])

    def hs83_g(x):
        c1, c2, c3 = hs83_c(x)
        return _vec(-c1, c1 - 92, 90 - c2, c2 - 110, 20 - c3, c3 - 25)

    P.append(_hs(83, 5, (78.0, 33.0, 27.0, 27.0, 27.0),
                 lambda x: 5.3578547 * x[2] ** 2 + 0.8356891 * x[0] * x[4] + 37.293239 * x[0] - 40792.141,
                 ineq=_cat(hs83_g, _box([78.0, 33.0, 27.0, 27.0, 27.0], [102.0, 45.0, 45.0, 45.0, 45.0])),
                 f_opt=-30665.538671783317, x_opt=(78.0, 33.0, 29.9952560257, 45.0, 36.7758129058),
                 note="Colville no. 3; " + _RECOMP))

    # HS93: transformer design.
    def hs93_parts(x):
        a = x[0] * x[3] * (x[0] + x[1] + x[2])
        b = x[1] * x[2] * (x[0] + 1.57 * x[1] + x[3])
        return a, b

    P.append(_hs(93, 6, (5.54, 4.4, 12.02, 11.82, 0.702, 0.852),
                 lambda x: (0.0204 * hs93_parts(x)[0] + 0.0187 * hs93_parts(x)[1]
                            + 0.0607 * hs93_parts(x)[0] * x[4] ** 2 + 0.0437 * hs93_parts(x)[1] * x[5] ** 2),
                 ineq=_cat(lambda x: _vec(2.07 - 0.001 * x[0] * x[1] * x[2] * x[3] * x[4] * x[5],
                                          0.00062 * hs93_parts(x)[0] * x[4] ** 2
                                          + 0.00058 * hs93_parts(x)[1] * x[5] ** 2 - 1),
                           _nonneg(6)),
                 f_opt=135.0759628291518,
                 x_opt=(5.33266633553, 4.65674405917, 10.4329919405, 12.0823063401, 0.752607436224, 0.878650874659),
                 note="transformer design; published f* = 135.075961, " + _RECOMP))

    # HS100
    P.append(_hs(100, 7, (1.0, 2.0, 0.0, 4.0, 0.0, 1.0, 1.0),
                 lambda x: ((x[0] - 10) ** 2 + 5 * (x[1] - 12) ** 2 + x[2] ** 4 + 3 * (x[3] - 11) ** 2
                            + 10 * x[4] ** 6 + 7 * x[5] ** 2 + x[6] ** 4 - 4 * x[5] * x[6]
                            - 10 * x[5] - 8 * x[6]),
                 ineq=lambda x: _vec(
                     2 * x[0] ** 2 + 3 * x[1] ** 4 + x[2] + 4 * x[3] ** 2 + 5 * x[4] - 127,
                     7 * x[0] + 3 * x[1] + 10 * x[2] ** 2 + x[3] - x[4] - 282,
                     23 * x[0] + x[1] ** 2 + 6 * x[5] ** 2 - 8 * x[6] - 196,
                     4 * x[0] ** 2 + x[1] ** 2 - 3 * x[0] * x[1] + 2 * x[2] ** 2 + 5 * x[5] - 11 * x[6]),
                 f_opt=680.630057374402, x_opt=(2.33049937288, 1.9513723729, -0.477541392389, 4.36572623366,
                                                -0.624486970527, 1.03813101861, 1.59422671161),
                 note=_RECOMP))

    # HS108: nonconvex, 14 inequalities (maximal-area hexagon type problem).
    def hs108_g(x):
        return _vec(x[2] ** 2 + x[3] ** 2 - 1,
                    x[8] ** 2 - 1,
                    x[4] ** 2 + x[5] ** 2 - 1,
                    x[0] ** 2 + (x[1] - x[8]) ** 2 - 1,
                    (x[0] - x[4]) ** 2 + (x[1] - x[5]) ** 2 - 1,
                    (x[0] - x[6]) ** 2 + (x[1] - x[7]) ** 2 - 1,
                    (x[2] - x[4]) ** 2 + (x[3] - x[5]) ** 2 - 1,
                    (x[2] - x[6]) ** 2 + (x[3] - x[7]) ** 2 - 1,
                    x[6] ** 2 + (x[7] - x[8]) ** 2 - 1,
                    x[1] * x[2] - x[0] * x[3],
                    -x[2] * x[8],
                    x[4] * x[8],
                    x[5] * x[6] - x[4] * x[7],
                    -x[8])

    P.append(_hs(108, 9, (1.0,) * 9,
                 lambda x: -0.5 * (x[0] * x[3] - x[1] * x[2] + x[2] * x[8] - x[4] * x[8]
                                   + x[4] * x[7] - x[5] * x[6]),
                 ineq=hs108_g,
                 f_opt=-math.sqrt(3.0) / 2,
                 x_opt=None,
                 note="nonconvex area-of-hexagon problem; minimizer not unique (x_opt not stored), f_opt = -sqrt(3)/2"))

    # HS113: Wong no. 2, convex QP objective, nonlinear convex inequalities.
    P.append(_hs(113, 10, (2.0, 3.0, 5.0, 5.0, 1.0, 2.0, 7.0, 3.0, 6.0, 10.0),
                 lambda x: (x[0] ** 2 + x[1] ** 2 + x[0] * x[1] - 14 * x[0] - 16 * x[1] + (x[2] - 10) ** 2
                            + 4 * (x[3] - 5) ** 2 + (x[4] - 3) ** 2 + 2 * (x[5] - 1) ** 2 + 5 * x[6] ** 2
                            + 7 * (x[7] - 11) ** 2 + 2 * (x[8] - 10) ** 2 + (x[9] - 7) ** 2 + 45),
                 ineq=lambda x: _vec(
                     -(105 - 4 * x[0] - 5 * x[1] + 3 * x[6] - 9 * x[7]),
                     -(-10 * x[0] + 8 * x[1] + 17 * x[6] - 2 * x[7]),
                     -(8 * x[0] - 2 * x[1] - 5 * x[8] + 2 * x[9] + 12),
                     -(-3 * (x[0] - 2) ** 2 - 4 * (x[1] - 3) ** 2 - 2 * x[2] ** 2 + 7 * x[3] + 120),
                     -(-5 * x[0] ** 2 - 8 * x[1] - (x[2] - 6) ** 2 + 2 * x[3] + 40),
                     -(-0.5 * (x[0] - 8) ** 2 - 2 * (x[1] - 4) ** 2 - 3 * x[4] ** 2 + x[5] + 30),
                     -(-x[0] ** 2 - 2 * (x[1] - 2) ** 2 + 2 * x[0] * x[1] - 14 * x[4] + 6 * x[5]),
                     -(3 * x[0] - 6 * x[1] - 12 * (x[8] - 8) ** 2 + 7 * x[9])),
                 f_opt=24.30620906817978,
                 x_opt=(2.17199637126, 2.3636829737, 8.77392573848, 5.09598448795, 0.990654764964,
                        1.43057397894, 1.32164420816, 9.82872580789, 8.2800916701, 8.37592666392),
                 note=_RECOMP))

    # HS118: QP with 15 variables, 29 linear inequalities and bounds.
    def hs118_f(x):
        t = x.reshape(5, 3)
        return (2.3 * t[:, 0] + 0.0001 * t[:, 0] ** 2 + 1.7 * t[:, 1] + 0.0001 * t[:, 1] ** 2
                + 2.2 * t[:, 2] + 0.00015 * t[:, 2] ** 2).sum()

    def hs118_g(x):
        t = x.reshape(5, 3)
        d = t[1:] - t[:-1] + 7.0  # (4, 3): 0 <= d <= (13, 14, 13)
        up = torch.tensor([13.0, 14.0, 13.0], dtype=x.dtype, device=x.device)
        dem = torch.tensor([60.0, 50.0, 70.0, 85.0, 100.0], dtype=x.dtype, device=x.device)
        return torch.cat([(-d).reshape(-1), (d - up).reshape(-1), dem - t.sum(dim=1)])

    P.append(_hs(118, 15, (20.0, 55.0, 15.0) + (20.0, 60.0, 20.0) * 4,
                 hs118_f,
                 ineq=_cat(hs118_g, _box([8.0, 43.0, 3.0] + [0.0] * 12,
                                         [21.0, 57.0, 16.0] + [90.0, 120.0, 60.0] * 4)),
                 f_opt=664.82045, x_opt=(8, 49, 3, 1, 56, 0, 1, 63, 6, 3, 70, 12, 5, 77, 18)))
    return P


HS_PROBLEMS: list[Problem] = _build_hs()


# ---------------------------------------------------------------------------
# Equality-constrained convex QPs: closed-form KKT solution.
# ---------------------------------------------------------------------------

def _quadratic(Pm: np.ndarray, qv: np.ndarray) -> Callable[[Tensor], Tensor]:
    """x ↦ ½ xᵀ P x + qᵀx in the dtype and on the device of x."""
    def f(x):
        Pt = torch.as_tensor(Pm, dtype=x.dtype, device=x.device)
        qt = torch.as_tensor(qv, dtype=x.dtype, device=x.device)
        return 0.5 * x @ (Pt @ x) + qt @ x
    return f


def _eq_qp(n: int, q: int, seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    Pm = M @ M.T / n + np.eye(n)
    qv = rng.standard_normal(n)
    A = rng.standard_normal((q, n))
    b = rng.standard_normal(q)
    K = np.block([[Pm, A.T], [A, np.zeros((q, q))]])
    sol = np.linalg.solve(K, np.concatenate([-qv, b]))
    xs = sol[:n]
    fs = float(0.5 * xs @ Pm @ xs + qv @ xs)

    f = _quadratic(Pm, qv)

    def eq(x):
        At = torch.as_tensor(A, dtype=x.dtype, device=x.device)
        bt = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        return At @ x - bt

    return Problem(name=f"eqqp_n{n}_q{q}", n=n, x0=(0.0,) * n, f=f, ineq=None, eq=eq,
                   f_opt=fs, x_opt=tuple(float(v) for v in xs), smooth=True,
                   source=f"random SPD equality QP (seed {seed}); f_opt from the KKT linear solve")


# ---------------------------------------------------------------------------
# Inequality-constrained convex problem: quadratic + ball + linear inequalities.
# ---------------------------------------------------------------------------

_CVX_N, _CVX_M, _CVX_SEED = 10, 4, 7


def _cvx_data():
    rng = np.random.default_rng(_CVX_SEED)
    M = rng.standard_normal((_CVX_N, _CVX_N))
    Pm = M @ M.T / _CVX_N + 0.1 * np.eye(_CVX_N)
    qv = 3.0 * rng.standard_normal(_CVX_N)  # unconstrained minimizer lies far outside the ball
    G = rng.standard_normal((_CVX_M, _CVX_N))
    h = 0.2 * np.abs(rng.standard_normal(_CVX_M))  # x = 0 is strictly feasible
    return Pm, qv, G, h


@functools.lru_cache(maxsize=None)
def _cvx_reference() -> tuple[float, tuple[float, ...]]:
    """Tight reference solution of the convex problem (computed once, cached)."""
    from scipy.optimize import minimize as sp_minimize

    Pm, qv, G, h = _cvx_data()
    cons = [
        {"type": "ineq", "fun": lambda x: 1.0 - x @ x, "jac": lambda x: -2.0 * x[None, :]},
        {"type": "ineq", "fun": lambda x: h - G @ x, "jac": lambda x: -G},
    ]
    r = sp_minimize(lambda x: 0.5 * x @ Pm @ x + qv @ x, np.zeros(_CVX_N), jac=lambda x: Pm @ x + qv,
                    method="SLSQP", constraints=cons, options={"ftol": 1e-15, "maxiter": 1000})
    x = r.x
    # Polish: Newton on the KKT system of the active set (ball + active rows of G).
    act = np.flatnonzero(G @ x - h > -1e-8)
    ball = bool(x @ x - 1 > -1e-8)
    Ga, ha = G[act], h[act]
    lam = np.zeros(int(ball) + len(act))
    for _ in range(20):
        rows_J = ([2 * x[None, :]] if ball else []) + [Ga]
        rows_c = ([np.array([x @ x - 1])] if ball else []) + [Ga @ x - ha]
        J, c = np.vstack(rows_J), np.concatenate(rows_c)
        H = Pm + (2 * lam[0] * np.eye(_CVX_N) if ball else 0.0)
        F = np.concatenate([Pm @ x + qv + J.T @ lam, c])
        if np.abs(F).max() < 1e-15:
            break
        K = np.block([[H, J.T], [J, np.zeros((len(c), len(c)))]])
        d = np.linalg.solve(K, -F)
        x, lam = x + d[:_CVX_N], lam + d[_CVX_N:]
    assert np.all(lam > 0), "reference solution: a multiplier is not positive"
    return float(0.5 * x @ Pm @ x + qv @ x), tuple(float(v) for v in x)


def _cvx_problem() -> Problem:
    Pm, qv, G, h = _cvx_data()

    f = _quadratic(Pm, qv)

    def ineq(x):
        Gt = torch.as_tensor(G, dtype=x.dtype, device=x.device)
        ht = torch.as_tensor(h, dtype=x.dtype, device=x.device)
        return torch.cat([(x @ x - 1).reshape(1), Gt @ x - ht])

    fs, xs = _cvx_reference()
    x0 = tuple(float(v) for v in np.full(_CVX_N, 1.0))  # infeasible start
    return Problem(name="cvx_ball_n10", n=_CVX_N, x0=x0, f=f, ineq=ineq, eq=None, f_opt=fs, x_opt=xs,
                   smooth=True,
                   source=f"convex QP with ||x||^2 <= 1 and {_CVX_M} linear inequalities (seed {_CVX_SEED}); "
                          "f_opt from scipy SLSQP (ftol 1e-15) polished by Newton on the active-set KKT system; "
                          "cross-checked with trust-constr in tests")


# ---------------------------------------------------------------------------
# Nonsmooth constrained Rosenbrock (Curtis, Mitchell & Overton 2017).
# ---------------------------------------------------------------------------

_NSROSEN_STARTS = ((1.0, 1.0), (-1.0, 2.0), (0.0, 0.0), (2.0, -1.0), (-1.5, -0.5))


def _ns_rosenbrock(x0, idx) -> Problem:
    def f(x):
        return 8 * torch.abs(x[0] ** 2 - x[1]) + (1 - x[0]) ** 2

    def ineq(x):
        return _vec(math.sqrt(2.0) * x[0] - 1, 2 * x[1] - 1)

    return Problem(name=f"nsrosen_{idx}", n=2, x0=tuple(float(v) for v in x0), f=f, ineq=ineq, eq=None,
                   f_opt=(1 - 1 / math.sqrt(2.0)) ** 2, x_opt=(1 / math.sqrt(2.0), 0.5), smooth=False,
                   source="nonsmooth constrained Rosenbrock, Curtis, Mitchell & Overton (2017); "
                          f"x0 = {tuple(x0)}")


# ---------------------------------------------------------------------------
# Trace problem on the Stiefel manifold.
# ---------------------------------------------------------------------------

def _trace_problem(n: int, k: int, seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n))
    A = (B + B.T) / 2
    w, U = np.linalg.eigh(A)
    fs = -float(w[-k:].sum())
    xs = U[:, -k:].reshape(-1)
    x0 = 0.5 * rng.standard_normal((n, k)).reshape(-1)
    iu = np.triu_indices(k)

    def f(x):
        V = x.reshape(n, k)
        At = torch.as_tensor(A, dtype=x.dtype, device=x.device)
        return -(V * (At @ V)).sum()

    def eq(x):
        V = x.reshape(n, k)
        R = V.T @ V - torch.eye(k, dtype=x.dtype, device=x.device)
        return R[iu[0], iu[1]]

    return Problem(name=f"trace_n{n}_k{k}", n=n * k, x0=tuple(float(v) for v in x0), f=f, ineq=None, eq=eq,
                   f_opt=fs, x_opt=tuple(float(v) for v in xs), smooth=True,
                   source=f"min -tr(V^T A V) s.t. V^T V = I, A symmetric (seed {seed}); "
                          "f_opt = -(sum of top-k eigenvalues), Ky Fan (1949)")


# ---------------------------------------------------------------------------
# Soft-margin linear SVM in primal form.
# ---------------------------------------------------------------------------

_SVM_NPTS, _SVM_C, _SVM_SEED = 20, 1.0, 3


def svm_data() -> tuple[np.ndarray, np.ndarray, float]:
    """Two overlapping Gaussian clouds in 2-D (not linearly separable)."""
    rng = np.random.default_rng(_SVM_SEED)
    m = _SVM_NPTS // 2
    a_pos = rng.standard_normal((m, 2)) * 1.0 + np.array([1.0, 0.5])
    a_neg = rng.standard_normal((m, 2)) * 1.0 + np.array([-1.0, -0.5])
    Apts = np.vstack([a_pos, a_neg])
    y = np.concatenate([np.ones(m), -np.ones(m)])
    return Apts, y, _SVM_C


def svm_primal_value(w: np.ndarray, b: float) -> float:
    Apts, y, C = svm_data()
    xi = np.maximum(0.0, 1.0 - y * (Apts @ w + b))
    return float(0.5 * w @ w + C * xi.sum())


@functools.lru_cache(maxsize=None)
def svm_dual_reference() -> dict:
    """Solve the SVM dual QP independently, recover the primal solution.

    dual:  max_a  sum(a) - 1/2 a^T (yy^T * K) a   s.t. 0 <= a <= C, y^T a = 0.
    Returns dual value, primal value at the recovered (w, b, xi), and that point.
    """
    from scipy.optimize import minimize as sp_minimize

    Apts, y, C = svm_data()
    m = len(y)
    Q = (y[:, None] * Apts) @ (y[:, None] * Apts).T

    r = sp_minimize(lambda a: 0.5 * a @ Q @ a - a.sum(), np.full(m, 0.5 * C), jac=lambda a: Q @ a - 1.0,
                    method="SLSQP", bounds=[(0.0, C)] * m,
                    constraints=[{"type": "eq", "fun": lambda a: y @ a, "jac": lambda a: y[None, :]}],
                    options={"ftol": 1e-14, "maxiter": 2000})
    alpha = np.clip(r.x, 0.0, C)
    dual = float(alpha.sum() - 0.5 * alpha @ Q @ alpha)
    w = (alpha * y) @ Apts
    # b: minimize the (convex, piecewise linear) primal over b exactly;
    # the minimum is attained at a breakpoint b = y_i - w.a_i.
    cands = y - Apts @ w
    vals = [svm_primal_value(w, bb) for bb in cands]
    b = float(cands[int(np.argmin(vals))])
    xi = np.maximum(0.0, 1.0 - y * (Apts @ w + b))
    primal = svm_primal_value(w, b)
    return {"dual": dual, "primal": primal, "w": w, "b": b, "xi": xi, "alpha": alpha,
            "success": bool(r.success)}


def _svm_problem() -> Problem:
    Apts, y, C = svm_data()
    m = len(y)
    ref = svm_dual_reference()

    def f(x):
        w, xi = x[:2], x[3:]
        return 0.5 * (w @ w) + C * xi.sum()

    def ineq(x):
        At = torch.as_tensor(Apts, dtype=x.dtype, device=x.device)
        yt = torch.as_tensor(y, dtype=x.dtype, device=x.device)
        w, b, xi = x[:2], x[2], x[3:]
        return torch.cat([1 - yt * (At @ w + b) - xi, -xi])

    xs = np.concatenate([ref["w"], [ref["b"]], ref["xi"]])
    return Problem(name="svm_primal_m20", n=3 + m, x0=(0.0,) * (3 + m), f=f, ineq=ineq, eq=None,
                   f_opt=ref["dual"], x_opt=tuple(float(v) for v in xs), smooth=True,
                   source=f"soft-margin linear SVM primal, {m} points in 2-D (seed {_SVM_SEED}), C={C}; "
                          "f_opt = optimal value of the dual QP (scipy SLSQP), equal to the primal value")


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

OTHER_PROBLEMS: list[Problem] = [
    _eq_qp(5, 2, seed=0),
    _eq_qp(30, 10, seed=1),
    _cvx_problem(),
    *[_ns_rosenbrock(x0, i) for i, x0 in enumerate(_NSROSEN_STARTS)],
    _trace_problem(8, 2, seed=11),
    _trace_problem(10, 3, seed=12),
    _svm_problem(),
]

ALL_PROBLEMS: list[Problem] = HS_PROBLEMS + OTHER_PROBLEMS
PROBLEMS_BY_NAME: dict[str, Problem] = {p.name: p for p in ALL_PROBLEMS}
assert len(PROBLEMS_BY_NAME) == len(ALL_PROBLEMS), "duplicate problem names"

# Suggested iteration limits above the default of 1000 (used by the acceptance
# tests and the benchmark), with the reason.
DEFAULT_MAX_ITER = 1000
MAX_ITER_HINT: dict[str, int] = {
    # degenerate: f grows like |x - x*|^4 or ^6 along the constraints, so
    # convergence of any first/quasi-second order method is sublinear
    "hs026": 3000,
    "hs046": 3000,
    "hs049": 3000,
    # nonsmooth objective: BFGS-SQP converges only (R-)linearly
    **{f"nsrosen_{i}": 3000 for i in range(len(_NSROSEN_STARTS))},
}


def max_iter_for(prob: Problem) -> int:
    return MAX_ITER_HINT.get(prob.name, DEFAULT_MAX_ITER)

# Small, quick, representative subset (benchmark --quick).
QUICK = ["hs007", "hs014", "hs035", "hs043", "hs071", "hs076", "hs100", "hs113",
         "eqqp_n5_q2", "cvx_ball_n10", "nsrosen_0", "trace_n8_k2", "svm_primal_m20"]


def get_problem(name: str) -> Problem:
    return PROBLEMS_BY_NAME[name]


# ---------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------

def violation(prob: Problem, x) -> float:
    """Max inf-norm constraint violation at x (array-like or tensor)."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, Tensor) else x.detach())
    xt = xt.to(torch.float64).reshape(-1)
    v = 0.0
    with torch.no_grad():
        if prob.ineq is not None:
            g = prob.ineq(xt)
            if g.numel():
                v = max(v, float(torch.clamp(g, min=0).max()))
        if prob.eq is not None:
            h = prob.eq(xt)
            if h.numel():
                v = max(v, float(h.abs().max()))
    return v


def evaluate(prob: Problem, x) -> tuple[float, float]:
    """(objective, violation) at x, in float64."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, Tensor) else x.detach())
    xt = xt.to(torch.float64).reshape(-1)
    with torch.no_grad():
        fv = float(prob.f(xt))
    return fv, violation(prob, xt)


def rel_error(prob: Problem, fun: float) -> float:
    return abs(float(fun) - prob.f_opt) / max(1.0, abs(prob.f_opt))


def make_torch_problem(prob: Problem, dtype=torch.float64, x0=None):
    """Build ``(x, objective, constraints)`` for ``constrained_optim.minimize``.

    ``x`` is a leaf tensor (requires_grad) initialised at ``x0`` (default: the
    problem's published starting point).  The solver is imported lazily so that
    this module can be imported without it.
    """
    import constrained_optim as co

    start = prob.x0 if x0 is None else tuple(float(v) for v in np.asarray(x0).reshape(-1))
    x = torch.tensor(start, dtype=dtype, requires_grad=True)
    cons = []
    if prob.ineq is not None:
        cons.append(co.ineq(lambda: prob.ineq(x), name="ineq"))
    if prob.eq is not None:
        cons.append(co.eq(lambda: prob.eq(x), name="eq"))
    objective = lambda: prob.f(x)  # noqa: E731
    return x, objective, cons


def _np_funcs(prob: Problem):
    """float64 numpy wrappers with autograd gradients/Jacobians."""
    from torch.func import jacrev

    def to_t(z):
        return torch.as_tensor(np.asarray(z, dtype=np.float64))

    def fun(z):
        with torch.no_grad():
            return float(prob.f(to_t(z)))

    def grad(z):
        t = to_t(z).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.f(t), t)
        return g.numpy()

    out = {"fun": fun, "grad": grad, "cons": []}
    if prob.ineq is not None:
        jg = jacrev(prob.ineq)
        out["cons"].append({"type": "ineq",
                            "fun": lambda z: -prob.ineq(to_t(z)).detach().numpy(),
                            "jac": lambda z: -jg(to_t(z)).detach().numpy()})
    if prob.eq is not None:
        jh = jacrev(prob.eq)
        out["cons"].append({"type": "eq",
                            "fun": lambda z: prob.eq(to_t(z)).detach().numpy(),
                            "jac": lambda z: jh(to_t(z)).detach().numpy()})
    return out


def slsqp_solve(prob: Problem, x0=None, maxiter: int = 1000, ftol: float = 1e-12) -> dict:
    """Solve ``prob`` with scipy SLSQP using exact torch-autograd derivatives.

    Returns ``dict(fun, nit, nfev, time, violation, success, x, status, message)``;
    ``fun`` and ``violation`` are re-evaluated at the returned point.
    """
    from scipy.optimize import minimize as sp_minimize

    fns = _np_funcs(prob)
    start = np.asarray(prob.x0 if x0 is None else x0, dtype=np.float64).reshape(-1)
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        r = sp_minimize(fns["fun"], start, jac=fns["grad"], method="SLSQP", constraints=fns["cons"],
                        options={"maxiter": maxiter, "ftol": ftol})
    elapsed = time.perf_counter() - t0
    fv, viol = evaluate(prob, r.x)
    return {"fun": fv, "nit": int(r.nit), "nfev": int(r.nfev), "time": elapsed, "violation": viol,
            "success": bool(r.success), "status": int(r.status), "message": str(r.message),
            "x": np.asarray(r.x)}


def trust_constr_solve(prob: Problem, x0=None, maxiter: int = 5000, gtol: float = 1e-12) -> dict:
    """Solve with scipy trust-constr (exact first derivatives, BFGS Hessians)."""
    from scipy.optimize import NonlinearConstraint, minimize as sp_minimize, BFGS

    fns = _np_funcs(prob)
    cons = []
    for c in fns["cons"]:
        lb = 0.0
        ub = np.inf if c["type"] == "ineq" else 0.0
        cons.append(NonlinearConstraint(c["fun"], lb, ub, jac=c["jac"], hess=BFGS()))
    start = np.asarray(prob.x0 if x0 is None else x0, dtype=np.float64).reshape(-1)
    t0 = time.perf_counter()
    import warnings
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        r = sp_minimize(fns["fun"], start, jac=fns["grad"], hess=BFGS(), method="trust-constr",
                        constraints=cons, options={"maxiter": maxiter, "gtol": gtol, "xtol": 1e-14})
    elapsed = time.perf_counter() - t0
    fv, viol = evaluate(prob, r.x)
    return {"fun": fv, "nit": int(r.nit), "nfev": int(r.nfev), "time": elapsed, "violation": viol,
            "success": bool(r.success), "status": int(r.status), "message": str(r.message),
            "x": np.asarray(r.x)}
