"""Weak Wolfe line search by bracketing (Lewis & Overton 2013), valid for nonsmooth functions.

Along a descent direction ``d`` with ``g₀ = ∇φ(x)ᵀd < 0``, find ``t > 0`` with

    φ(x + t d) ≤ φ(x) + c₁ t g₀          (sufficient decrease, Armijo)
    ∇φ(x + t d)ᵀ d ≥ c₂ g₀               (weak curvature)

Bracket ``[α, β]``, start ``α = 0, β = ∞, t = t₀`` (1 by default): if decrease fails (or φ is not finite) ``β ← t``;
elif curvature fails ``α ← t``; else accept. Next ``t = (α + β) / 2`` if ``β < ∞`` else ``2t``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable


class Outcome(enum.Enum):
    WOLFE = "wolfe"                  # both conditions hold
    DECREASE_ONLY = "decrease_only"  # bracketed, no Wolfe point found: the best decreasing point is returned
    EXPANSION_LIMIT = "expansion"    # never bracketed: φ may be unbounded below along d
    FAILED = "failed"                # no decrease found at any tried t


@dataclass
class LineSearchResult:
    outcome: Outcome
    t: float
    trial: Any          # what ``evaluate`` returned at the accepted t (None on failure)
    evaluations: int


def weak_wolfe(evaluate: Callable[[float], tuple[float, Callable[[], float], Any]],
               phi0: float, g0: float, c1: float = 1e-4, c2: float = 0.5,
               max_evaluations: int = 50, max_expansions: int = 10, t0: float = 1.0) -> LineSearchResult:
    """Run the bracketing search.

    Args:
        evaluate: ``evaluate(t)`` returns ``(φ(x + t d), slope, trial)`` where ``slope()`` computes
            ``∇φ(x + t d)ᵀ d`` on demand (it is only needed where the decrease condition holds).
        phi0: φ(x). g0: ∇φ(x)ᵀd (must be negative). t0: the first trial step.
    """
    alpha, beta, t = 0.0, math.inf, t0
    best = None  # (α, trial at α): the largest t with sufficient decrease and a finite slope
    expansions = 0
    for evaluations in range(1, max_evaluations + 1):
        phi, slope, trial = evaluate(t)
        if not math.isfinite(phi) or phi > phi0 + c1 * t * g0:
            beta = t
        else:
            slope_t = slope()
            if not math.isfinite(slope_t):
                beta = t
            elif slope_t < c2 * g0:
                best, alpha = (t, trial), t
            else:
                return LineSearchResult(Outcome.WOLFE, t, trial, evaluations)
        if beta < math.inf:
            t = 0.5 * (alpha + beta)
        elif expansions < max_expansions:
            t, expansions = 2.0 * t, expansions + 1
        else:
            return LineSearchResult(Outcome.EXPANSION_LIMIT, best[0], best[1], evaluations)
        if beta - alpha < 1e-15 * max(1.0, beta if beta < math.inf else alpha):
            break
    if best is not None:
        return LineSearchResult(Outcome.DECREASE_ONLY, best[0], best[1], evaluations)
    return LineSearchResult(Outcome.FAILED, 0.0, None, evaluations)
