r"""Batched convex quadratic programming in PyTorch.

Problem (one per batch element, leading dimensions broadcast):

.. math::
    \min_z \tfrac12 z^\top Q z + p^\top z \quad\text{s.t.}\quad G z \le h,\; A z = b,
    \qquad Q \succeq 0 \text{ (possibly singular)}.

KKT conditions with multipliers :math:`\lambda \ge 0`, :math:`\nu`, slack :math:`s = h - Gz \ge 0`:

.. math::
    Qz + p + G^\top\lambda + A^\top\nu = 0,\quad Az = b,\quad \lambda \circ s = 0.

Methods (all arithmetic in float64, on the device of the inputs):

* Jacobi equilibration: :math:`z = D\tilde z` with :math:`D = \mathrm{diag}(Q)^{-1/2}` (1 where the
  diagonal vanishes) and rows of :math:`G, A` scaled to unit max-norm, so badly scaled data
  (diagonal entries 1e-8 next to 1e8) become unit-diagonal problems.
* Box QPs (``solve_box_qp``): a primal-dual interior point method specialised to boxes (Mehrotra
  predictor-corrector). The primal iterate stays strictly inside the box, so only stationarity and
  complementarity are Newton-solved; with :math:`D = \lambda_l/s_l + \lambda_u/s_u` each
  iteration needs ONE batched Cholesky factorisation of :math:`Q + D + \delta I` (``cholesky_ex``,
  so a failed element does not stop the others; :math:`\delta = 10^{-10}` on the unit diagonal,
  grown per element on failure). The active-set guess :math:`\{\lambda > s\}` is *polished*
  whenever it settles: the active variables are fixed at their bounds and
  :math:`Q_{FF}\Delta = -(Qz+p)_F` is solved from the current iterate (regularised Cholesky plus
  refinement, which converges to the smallest correction, so singular :math:`Q` gives the
  minimiser nearest the interior point iterate); the polished point is kept where its residual is
  smaller, and an element stops once it is below ``tol``. Where that does not finish, a few
  primal-dual active-set (PDAS, semismooth Newton) iterations with a 1-/2-cycle guard follow from
  the last guess; warm starts begin with PDAS from the previous active set. Variables with
  :math:`l = u` are fixed and eliminated.
* General QPs: infeasible-start primal-dual interior point method with Mehrotra
  predictor-corrector. Eliminating :math:`\Delta s, \Delta\lambda` with :math:`W = \lambda / s`
  leaves the quasi-definite system

  .. math::
      \begin{bmatrix} Q + G^\top W G + \delta I & A^\top \\ A & -\delta I \end{bmatrix}
      \begin{bmatrix}\Delta z\\ \Delta\nu\end{bmatrix} = \dots

  (LU, one refinement step against :math:`\delta = 0`). Near convergence the active set
  :math:`\{\lambda > s\}` is *polished*: the equality-constrained KKT system for that active set is
  solved directly, which gives the exact (to rounding) solution.
* Infeasibility: the phase-1 problem :math:`\min \tfrac12\|Az-b\|^2 + \tfrac12\|t\|^2` s.t.
  :math:`Gz - t \le h` (always feasible) is solved for elements that did not converge; a
  non-zero optimal violation means INFEASIBLE. Boxes with :math:`l > u` are INFEASIBLE at once.

Residual (``QPResult.residual``, original units, float64) is the max of the relative terms

* stationarity :math:`\|Qz+p+G^\top\lambda+A^\top\nu\|_\infty / (1+\max(\|Qz\|_\infty,\|p\|_\infty,
  \|G^\top\lambda\|_\infty,\|A^\top\nu\|_\infty))`,
* inequality violation :math:`\|(Gz-h)_+\|_\infty / (1+\max(\|Gz\|_\infty,\|h\|_\infty))`,
* equality violation :math:`\|Az-b\|_\infty / (1+\max(\|Az\|_\infty,\|b\|_\infty))`,
* complementarity :math:`\max_i|\lambda_i (h-Gz)_i| / (1+\|\lambda\|_\infty\max(\|Gz\|_\infty,\|h\|_\infty))`,
* dual sign :math:`\|(-\lambda)_+\|_\infty / (1+\|\lambda\|_\infty)` (and :math:`|\lambda_i|` for absent rows).

For box QPs :math:`G = [-I; I]`, :math:`h = [-l; u]`, rows with infinite bounds are ignored, and
the residual is evaluated on the Jacobi-equilibrated problem (:math:`\tilde Q = DQD`,
:math:`\tilde p = Dp`, :math:`\tilde z = z/d`, bounds :math:`/d`, :math:`\tilde\lambda = d\lambda`),
so it does not depend on the units of the variables: in original units a row of :math:`Q` at scale
1e8 carries rounding noise of order 1e-8 in :math:`Qz` that no float64 :math:`z` can remove.
A problem is SOLVED when ``residual <= tol``.
"""

from ._box import solve_box_qp
from ._general import solve_qp
from ._problem import QPResult, QPStatus

__all__ = ["QPResult", "QPStatus", "solve_box_qp", "solve_qp"]
