"""Weak Wolfe line search by bracketing (Lewis & Overton 2013), valid for nonsmooth functions.

Along a descent direction ``d`` with ``g₀ = ∇φ(x)ᵀd < 0``, find ``t > 0`` with

    φ(x + t d) ≤ φ(x) + c₁ t g₀          (sufficient decrease, Armijo)
    ∇φ(x + t d)ᵀ d ≥ c₂ g₀               (weak curvature)

Bracket ``[α, β]``, start ``α = 0, β = ∞, t = t₀`` (1 by default): if decrease fails (or φ is not finite) ``β ← t``;
elif curvature fails ``α ← t``; else accept. Next ``t = (α + β) / 2`` if ``β < ∞`` else ``2t``.

Where sufficient decrease fails by no more than the rounding error ``ε`` of φ (``φ(x + t d) ≤ φ(x) + c₁ t g₀ + ε``),
values cannot tell it, and the slopes decide instead (the approximate Wolfe conditions of Hager & Zhang 2005): accept when

    c₂ g₀ ≤ ∇φ(x + t d)ᵀ d ≤ (2c₁ − 1) g₀,

which for a quadratic along d is the sufficient decrease itself. Without it a search cannot reach a relative
stationarity much below √eps: the decrease that a step to a point 1e-8 more stationary brings is eps-relative.

The bracket ends when ``β − α`` is at rounding size, or when the next trial step is below ``t_x``, the
resolution of the step: every ``x + t d`` with ``t < t_x`` rounds to x itself in the precision of the
parameters. Such a trial would evaluate x again, and is no step, although its φ(x) may pass the decrease test
where ``c₁ t g₀`` is below the rounding of φ(x) (the search would then return x as its point).

:func:`weak_wolfe_batched` runs the same search for A independent problems at once: every problem has its
own ``α, β, t``, each round evaluates all trial points together, and a problem whose search has ended
keeps its accepted point while the others go on.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


def step_resolution(x: Tensor, d: Tensor, eps: float) -> Tensor:
    """``t_x`` of the module doc along the last dimension: the largest step such that ``x + t d`` rounds to x for
    every ``t < t_x``, x representable in a precision of machine epsilon ``eps``: ``|t d_i| < eps |x_i| / 4`` is
    below half the spacing of the numbers next to ``x_i`` (on either side). 0 when an entry x_i = 0 moves,
    ∞ when nothing moves."""
    ratio = torch.div(d, x).abs_().nan_to_num_(nan=0.0, posinf=math.inf).amax(-1) if d.shape[-1] else d.new_zeros(
        d.shape[:-1])
    return torch.where(ratio > 0, 0.25 * eps / ratio, math.inf)


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
               max_evaluations: int = 50, max_expansions: int = 10, t0: float = 1.0,
               noise: float = 0.0, resolution: Callable[[], float] | None = None) -> LineSearchResult:
    """Run the bracketing search.

    Args:
        evaluate: ``evaluate(t)`` returns ``(φ(x + t d), slope, trial)`` where ``slope()`` computes
            ``∇φ(x + t d)ᵀ d`` on demand (it is only needed where the decrease condition holds);
            ``slope(within_noise=True)``, for the test within the noise, may leave out the parts of φ whose
            sign is rounding (the violation of constraints at rounding distance from their bound).
        phi0: φ(x). g0: ∇φ(x)ᵀd (must be negative). t0: the first trial step.
        noise: the rounding error ``ε`` of φ near x (0: values are trusted down to the last bit).
        resolution: ``resolution()`` returns ``t_x`` (see the module doc); asked for once, when the search first
            brackets (None: never).
    """
    alpha, beta, t = 0.0, math.inf, t0
    t_x = None
    best = None  # (α, trial at α): the largest t with sufficient decrease and a finite slope
    expansions = 0
    for evaluations in range(1, max_evaluations + 1):
        phi, slope, trial = evaluate(t)
        if not math.isfinite(phi) or phi > phi0 + c1 * t * g0:
            if phi <= phi0 + c1 * t * g0 + noise and c2 * g0 <= slope(within_noise=True) <= (2 * c1 - 1) * g0:
                return LineSearchResult(Outcome.WOLFE, t, trial, evaluations)
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
            if t_x is None and resolution is not None:
                t_x = resolution()
        elif expansions < max_expansions:
            t, expansions = 2.0 * t, expansions + 1
        else:
            return LineSearchResult(Outcome.EXPANSION_LIMIT, best[0], best[1], evaluations)
        if beta - alpha < 1e-15 * max(1.0, beta if beta < math.inf else alpha) or (t_x is not None and t < t_x):
            break
    if best is not None:
        return LineSearchResult(Outcome.DECREASE_ONLY, best[0], best[1], evaluations)
    return LineSearchResult(Outcome.FAILED, 0.0, None, evaluations)


class BatchedOutcome(enum.IntEnum):
    """Per-problem outcome codes of :func:`weak_wolfe_batched` (the meanings of :class:`Outcome`)."""

    SEARCHING = 0
    WOLFE = 1
    DECREASE_ONLY = 2
    EXPANSION_LIMIT = 3
    FAILED = 4


@dataclass
class BatchedLineSearchResult:
    outcome: Tensor     # (A,) BatchedOutcome codes
    t: Tensor           # (A,) accepted step (meaningless where FAILED)
    trial: Any          # the accepted trial of each row (``evaluate``'s third value, rows merged)
    evaluations: int    # rounds, each one evaluation of all rows


def weak_wolfe_batched(evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Any]], phi0: Tensor, g0: Tensor,
                       t0: Tensor, searching: Tensor, c1: float = 1e-4, c2: float = 0.5, max_evaluations: int = 50,
                       max_expansions: int = 10, first: tuple | None = None, noise: Tensor | float = 0.0,
                       slope_within_noise: Callable[[Any, Tensor], Tensor] | None = None,
                       resolution: Tensor | float = 0.0) -> BatchedLineSearchResult:
    """The bracketing search for A problems at once (rows of the (A,) tensors).

    Args:
        evaluate: ``evaluate(t, active)`` returns ``(φ(x + t d), ∇φ(x + t d)ᵀd, trial)`` for every row, where
            rows outside ``active`` may be evaluated anywhere (their values are ignored); ``trial.where(mask,
            other)`` takes ``trial``'s rows where ``mask`` and ``other``'s elsewhere.
        phi0, g0: φ(x) and ∇φ(x)ᵀd per row. t0: first trial steps.
        searching: the rows to search (g0 < 0); the others end FAILED without an evaluation.
        first: ``evaluate(t0, ...)``'s result when the caller has it already (it counts as the first round).
        noise: the rounding error ``ε`` of φ near x per row (or one for all), as in :func:`weak_wolfe`.
        slope_within_noise: ``slope_within_noise(trial, slope)``, the slope for the test within the noise (as in
            :func:`weak_wolfe`, it may leave out the parts of φ whose sign is rounding); the slope itself by default.
        resolution: ``t_x`` per row (or one for all; see the module doc): a bracketed row whose next trial step is
            below it ends.
    """
    code = BatchedOutcome
    alpha, beta, t = torch.zeros_like(phi0), torch.full_like(phi0, math.inf), t0.clone()
    expansions = torch.zeros_like(phi0, dtype=torch.int64)
    outcome = torch.where(searching, int(code.SEARCHING), int(code.FAILED))
    found = torch.zeros_like(searching)          # a point with sufficient decrease is kept (α > 0)
    kept, t_kept, evaluations = None, torch.zeros_like(phi0), 0
    while evaluations < max_evaluations and bool((outcome == code.SEARCHING).any()):
        active = outcome == code.SEARCHING
        phi, slope, trial = first if evaluations == 0 and first is not None else evaluate(t, active)
        evaluations += 1
        decrease = torch.isfinite(phi) & (phi <= phi0 + c1 * t * g0) & torch.isfinite(slope)
        # where the decrease fails within the noise, the slopes decide (approximate Wolfe, see the module doc)
        near = ~decrease & (phi <= phi0 + c1 * t * g0 + noise)
        flat = slope if slope_within_noise is None else slope_within_noise(trial, slope)
        approximate = near & (c2 * g0 <= flat) & (flat <= (2 * c1 - 1) * g0)
        beta = torch.where(active & ~decrease & ~approximate, t, beta)
        grow = active & decrease & (slope < c2 * g0)
        accept = active & ((decrease & (slope >= c2 * g0)) | approximate)
        alpha = torch.where(grow, t, alpha)
        found |= grow
        kept = trial if kept is None else trial.where(grow | accept, kept)
        t_kept = torch.where(grow | accept, t, t_kept)
        outcome = torch.where(accept, int(code.WOLFE), outcome)
        active &= ~accept
        bracketed = beta < math.inf
        expand = active & ~bracketed & (expansions < max_expansions)
        outcome = torch.where(active & ~bracketed & ~expand, int(code.EXPANSION_LIMIT), outcome)
        expansions += expand.to(torch.int64)
        t = torch.where(bracketed, 0.5 * (alpha + beta), torch.where(expand, 2.0 * t, t))
        narrow = active & bracketed & ((beta - alpha < 1e-15 * beta.clamp(min=1.0)) | (t < resolution))
        outcome = torch.where(narrow, torch.where(found, int(code.DECREASE_ONLY), int(code.FAILED)), outcome)
    outcome = torch.where(outcome == code.SEARCHING, torch.where(found, int(code.DECREASE_ONLY), int(code.FAILED)),
                          outcome)
    return BatchedLineSearchResult(outcome, t_kept, kept, evaluations)
