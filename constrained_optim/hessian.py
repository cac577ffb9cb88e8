"""Damped BFGS approximations ``H ≈ ∇²φ⁻¹`` of the inverse Hessian, applied as operators.

Both classes expose ``apply(V) = H V`` for a vector (n,) or a matrix (n, r) of columns,
``sandwich(J, g)`` (:class:`Sandwich`: ``J H Jᵀ`` and ``J H g`` for a constraint
:class:`~constrained_optim.jacobian.Jacobian`, the m×m matrix and the m-vector of the penalty QP, and the step
``−H (μ g + Jᵀy)``), ``update(s, y)`` and ``reset()``; ``version`` changes whenever
``H`` does.

Inverse BFGS update with ``ρ = 1 / sᵀy``:

    H₊ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ

Damping (the inverse form of Powell's rule): if ``sᵀy < θ yᵀHy`` the step is replaced by
``s ← τ s + (1 − τ) H y`` with ``τ = (1 − θ) yᵀHy / (yᵀHy − sᵀy)``, which makes ``sᵀy = θ yᵀHy > 0``
so that ``H`` stays positive definite on nonconvex or nonsmooth functions. A pair whose curvature is
still not positive and finite is skipped.

:class:`DenseBFGS` stores the n×n matrix (initially ``I``, rescaled by ``sᵀy / yᵀy`` before the first
update). :class:`LBFGS` stores the last ``k`` pairs; its initial matrix is ``γ I`` with ``γ = sᵀy / yᵀy`` of the
newest pair. It runs the two-loop recursion on the coefficients of ``H V`` in the basis of the pairs, all
columns of ``V`` at once (the compact form of Byrd, Nocedal & Schnabel 1994, with triangular solves in
place of ``R⁻¹``): with ``S``, ``Y`` the pairs oldest first, ``R`` the upper triangle of ``SᵀY`` and ``Δ`` its
diagonal,

    a = R⁻¹ SᵀV                      (first loop:  a_i = ρ_i s_iᵀ q)
    c = R⁻ᵀ (Δ a − γ (YᵀV − YᵀY a))  (second loop: c_i = a_i − b_i)
    H V = γ V + S c − γ Y a.

It needs ``V`` only through ``WᵀV`` (W = [S Y], n × 2k), so ``J H Jᵀ = γ J Jᵀ + (J W) [c; −γ a]`` with
``WᵀJᵀ = (J W)ᵀ``: one m×2k product with ``J`` and the Gram matrix ``J Jᵀ``, never an n×m or n×n matrix.

:class:`BatchedDenseBFGS` and :class:`BatchedLBFGS` hold one such approximation for each of B independent
problems (a (B, n, n) tensor; (B, k, n) pairs) and apply the same rules to every problem at once: the
damping, the skip test and the first scaling are decided per problem, and ``update``/``reset``/``apply``
act on the problems listed in ``idx`` only.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .jacobian import _true_runs


# A deferred pair's ``Wᵀy`` is formed from differences of products (see :meth:`LBFGS.defer`) only when the products it
# cancels are at most this many times ‖y‖: their rounding (~eps ‖w‖ ‖g‖ each) then stays within this many times that
# of the products themselves (~eps ‖w‖ ‖y‖).
_CANCELLATION = 100.0


@dataclass
class GradientChange:
    """``y = μ (g₁ − g₀) + (J₁ − J₀)ᵀ w``: the change of the gradient of the Lagrangian ``μ f + wᵀc`` from a point
    (``g₀ = ∇f``, ``J₀`` its constraint Jacobian) to another (``g₁``, ``J₁``), with the same μ and weights w (m,)."""

    mu: float
    g0: Tensor
    J0: Any
    g1: Tensor
    J1: Any
    w: Tensor


class _Products(NamedTuple):
    """What a sandwich's pass computed, for the next: ``J W`` of the dense rows (``blocks``: weak references to J's
    blocks), ``Wᵀg`` and ``gᵀg`` (``g``: a weak reference), with the ``stamps`` of W's rows then."""

    blocks: list
    JW: Tensor
    stamps: list[int]
    g: Any
    Wg: Tensor
    gg: Tensor


@dataclass
class Sandwich:
    """The penalty QP's data at one point: ``M = J H Jᵀ``, ``JHg = J H ∇f``, and ``direction(μ, y) =
    −H (μ ∇f + Jᵀy)``, the primal step of a dual solution y (from quantities the sandwich already has); ``Jg =
    J ∇f`` where the sandwich's pass computed it (for the certificate's multiplier fit)."""

    M: Tensor
    JHg: Tensor
    direction: Callable[[float, Tensor], Tensor]
    Jg: Tensor | None = None


def _damp(s: Tensor, y: Tensor, yHy: Tensor, Hy: Callable[[], Tensor], theta: float) -> tuple[Tensor, Tensor]:
    """Powell-damped ``s`` and its curvature ``sᵀy`` (``Hy()`` is only formed when damping is needed)."""
    sy = s.dot(y)
    if sy < theta * yHy:
        tau = (1 - theta) * yHy / (yHy - sy)
        s = tau * s + (1 - tau) * Hy()
        sy = s.dot(y)
    return s, sy


def _acceptable(sy: Tensor, s: Tensor, y: Tensor) -> bool:
    scale = torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)
    return bool(torch.isfinite(sy) & torch.isfinite(scale) & (sy > 1e-14 * scale))


class DenseBFGS:
    """Inverse BFGS matrix stored densely (n×n): for n up to a few thousand."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, damping: float = 1e-4):
        self.n, self.dtype, self.device, self.damping = n, dtype, device, damping
        self.version = 0
        self.reset()

    def reset(self) -> None:
        self.H = torch.eye(self.n, dtype=self.dtype, device=self.device)
        self.updates = 0
        self.version += 1

    def apply(self, V: Tensor) -> Tensor:
        return self.H @ V

    def sandwich(self, J, g: Tensor) -> Sandwich:
        """``[H g, H Jᵀ]`` by one product (the bound rows' columns of ``H Jᵀ`` are columns of H), then
        ``J H Jᵀ``, ``J H g`` and ``−H (μ g + Jᵀy) = −(μ H g + H Jᵀ y)``."""
        HV = self.H @ torch.cat([g[:, None], J.dense.T.to(self.dtype)], dim=1)
        Hg = HV[:, 0]
        HJt = HV.new_empty(self.n, J.m)
        HJt[:, J.dense_rows] = HV[:, 1:]
        HJt[:, J.bound_rows] = self.H[:, J.columns] * J.signs
        return Sandwich(J @ HJt, J @ Hg, lambda mu, y: -(mu * Hg + HJt @ y))

    def update(self, s: Tensor, y: Tensor) -> bool:
        """Apply one damped BFGS update; returns False when the pair was skipped."""
        if self.updates == 0:
            sy0, yy = s.dot(y), y.dot(y)
            if sy0 > 0 and yy > 0 and torch.isfinite(sy0 / yy):
                self.H = (sy0 / yy) * self.H
        Hy = self.H @ y
        s, sy = _damp(s, y, y.dot(Hy), lambda: Hy, self.damping)
        if not _acceptable(sy, s, y):
            return False
        rho = 1.0 / sy
        # H - ρ (Hy sᵀ + s yᵀH) + (ρ² yᵀHy + ρ) s sᵀ, symmetrised, in three n×n buffers
        outer = torch.outer(Hy, s)
        H = torch.sub(self.H, (outer + outer.T).mul_(rho))
        H += torch.outer(s, s, out=outer).mul_(rho * rho * y.dot(Hy) + rho)
        self.H = (H + H.T).mul_(0.5)
        self.updates += 1
        self.version += 1
        return True

    def defer(self, s: Tensor, y: Tensor, change: GradientChange | None = None) -> None:
        """:meth:`update` now (the dense matrix has no pass over stored pairs to share, see :meth:`LBFGS.defer`;
        ``change`` is not needed)."""
        self.update(s, y)

    def pair_rows(self) -> tuple[Tensor, Tensor]:
        """Two new n-vectors to compute the next pair (s, y) in (see :meth:`LBFGS.pair_rows`)."""
        return (torch.empty(self.n, dtype=self.dtype, device=self.device),
                torch.empty(self.n, dtype=self.dtype, device=self.device))

    def state_dict(self) -> dict:
        return {"H": self.H.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.H = state["H"].to(dtype=self.dtype, device=self.device).clone()
        self.updates = int(state["updates"])
        self.version += 1


class LBFGS:
    """Limited-memory inverse BFGS: the last ``memory`` pairs, O(memory·n) storage, never an n×n matrix.

    The pairs live in one (2(memory + 1), n) buffer, ``s`` of slot j in row 2j and its ``y`` in row 2j + 1 (so that
    ``W``, the rows up to the last slot in use, is one contiguous block); ``order`` lists the slots in use, oldest
    first, and ``SᵀY`` (its upper triangle in that order), ``YᵀY`` (slot-indexed) are updated with each pair. The
    slot beyond the memory is where a pair given to :meth:`defer` waits: the next :meth:`sandwich` takes its
    products ``Wᵀy`` from the pass over W that it makes anyway, instead of a pass of their own, or, when y is a
    known change of gradients (:class:`GradientChange`), from the differences of the products of two sandwiches.
    Rows of slots not in use are zero or hold an accepted pair (finite): their coefficients are zero.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, memory: int, damping: float = 1e-4):
        self.n, self.dtype, self.device, self.memory, self.damping = n, dtype, device, memory, damping
        self.version = 0
        self.reset()

    def reset(self) -> None:
        self.version += 1
        self._W = None
        slots = self.memory + 1
        self._stamps = [-1] * (2 * slots)   # when each buffer row was last written (``_writes`` then)
        self._writes = 0
        self._kept: _Products | None = None  # the last sandwich's products (see ``_known``, ``_pair_products``)
        self._gathered = None               # (version, ...) of ``_compact``
        self._pending: int | None = None    # the slot of a deferred pair
        self._change: tuple | None = None    # what its y is the change of (see ``defer``)
        self._SY = torch.zeros(slots, slots, dtype=self.dtype, device=self.device)
        self._YY = torch.zeros_like(self._SY)
        self.order: list[int] = []
        self._slots = torch.zeros(0, dtype=torch.long, device=self.device)    # ``order`` as a tensor
        self._updates = 0

    @property
    def updates(self) -> int:
        """Pairs accepted since the last reset."""
        self._flush()
        return self._updates

    @property
    def S(self) -> list[Tensor]:
        """The steps, oldest first."""
        self._flush()
        return [self._W[2 * i] for i in self.order]

    @property
    def Y(self) -> list[Tensor]:
        """The gradient differences, oldest first."""
        self._flush()
        return [self._W[2 * i + 1] for i in self.order]

    @property
    def W(self) -> Tensor:
        """(2k, n): the buffer rows up to the last slot in use (with a deferred pair's), interleaved by slot."""
        used = self.order + ([] if self._pending is None else [self._pending])
        return self._W[:2 * (max(used) + 1)] if used else self._W[:0]

    def _coefficients(self, WtV: Tensor) -> tuple[Tensor, Tensor]:
        """``(γ, X)`` with ``H V = γ V + Wᵀ X`` (X = [c; −γ a], slot-interleaved, zero for slots not in use) given
        ``WᵀV`` (2k, r)."""
        gamma, R, YY, diag, s_rows, y_rows = self._compact()
        a = torch.linalg.solve_triangular(R, WtV[s_rows], upper=True)
        z = diag * a - gamma * (WtV[y_rows] - YY @ a)
        X = torch.zeros_like(WtV)
        X[s_rows] = torch.linalg.solve_triangular(R.mT, z, upper=False)
        X[y_rows] = -gamma * a
        return gamma, X

    def _compact(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``γ``, ``R``, ``YᵀY``, ``diag(R)`` (a column) in the order of the pairs and the buffer rows of their s
        and y, gathered once per ``version``."""
        if self._gathered is None or self._gathered[0] != self.version:
            slots = self._slots
            SY = self._SY[slots[:, None], slots]
            newest = self.order[-1]
            gamma = self._SY[newest, newest] / self._YY[newest, newest]
            self._gathered = (self.version, gamma, SY.triu(), self._YY[slots[:, None], slots],
                              torch.diag(SY)[:, None], 2 * slots, 2 * slots + 1)
        return self._gathered[1:]

    def apply(self, V: Tensor) -> Tensor:
        """``H V = γ V + S c − γ Y a``, all columns of ``V`` at once."""
        self._flush()
        if not self.order:
            return V.clone()
        W = self.W
        gamma, X = self._coefficients((W @ V).reshape(len(W), -1))
        return gamma * V + (W.T @ X).reshape(V.shape)

    def sandwich(self, J, g: Tensor) -> Sandwich:
        """``J H Jᵀ = γ J Jᵀ + (J W) X_J`` and ``J H g = γ J g + (J W) X_g``, X the coefficients of ``H [Jᵀ g]``;
        the direction uses ``Wᵀ(μ g + Jᵀy) = μ Wᵀg + (J W)ᵀ y`` (no pass over W before the last). A deferred pair
        joins first, its products from the same pass (or from differences of this pass's products and the last's,
        see :meth:`defer`)."""
        if self._pending is not None and not self.order:
            self._flush()               # the first pair: nothing to share
        if not self.order and self._pending is None:
            G, Jg, _ = J.gram_and_times([g[None]])
            return Sandwich(G, Jg[:, 0], lambda mu, y: -(mu * g + J.T @ y), Jg[:, 0])
        W = self.W
        pair = self._pair_products(J, g)
        left = [g[None]]
        if self._pending is not None and pair is None:
            left.append(self._W[2 * self._pending + 1][None])
        # one pass: J Jᵀ, J W, J g, Wᵀg (and Wᵀy of a deferred pair), but not the part of J W known already
        G, JV, LV = J.gram_and_times([W, g[None]], left=left, known=self._known(J))
        JW, Jg, Wg = JV[:, :-1], JV[:, -1], LV[0, :-1]
        if self._pending is not None:
            Wy = LV[1, :-1] if pair is None else self._change_products(J, JW, Wg, pair)
            if not self._join(Wy):
                return self.sandwich(J, g)     # damped or skipped: the pair is settled on its own, then a fresh pass
        self._kept = _Products([weakref.ref(B) for B in J.blocks], JW[J.dense_rows], list(self._stamps[:len(W)]),
                               weakref.ref(g), Wg, LV[0, -1])
        gamma, X = self._coefficients(torch.cat([JW.T, Wg[:, None]], dim=1))
        JWX = JW @ X

        def direction(mu: float, y: Tensor) -> Tensor:
            # Jᵀ(−γy) − γμ g − W X in three passes, the signs and γ on the small factors (n-vectors are the cost at
            # large n)
            _, Xd = self._coefficients((mu * Wg + JW.T @ y)[:, None])
            d = (J.T @ (y * -gamma)).addcmul_(g, gamma * -mu)
            for rows in self._rows_in_use():        # (not the rows of the pair the deferred one replaced)
                d.addmv_(W[rows].T, Xd[rows, 0], alpha=-1.0)
            return d
        return Sandwich(gamma * G + JWX[:, :-1], gamma * Jg + JWX[:, -1], direction, Jg)

    def _rows_in_use(self) -> list[slice]:
        """The rows of the buffer that hold the pairs in use, as slices of adjacent slots (the coefficients of the
        other rows are zero)."""
        in_use = [slot in self.order for slot in range(max(self.order) + 1)]
        return [slice(2 * a, 2 * b) for a, b in _true_runs(in_use)]

    def _known(self, J) -> tuple[Tensor, list[bool], Tensor] | None:
        """The entries of the dense rows' ``D W`` that the last sandwich computed and that still hold: rows of
        the blocks of ``J`` that are the same tensors as then (shared by :meth:`Jacobian.share_unchanged`: constraints
        linear in x), columns of the pairs not overwritten since (in the layout that ``gram_and_times`` takes, with
        a last column for ``g``, never known)."""
        if self._kept is None:
            return None
        refs, DW, stamps = self._kept.blocks, self._kept.JW, self._kept.stamps
        blocks = [i < len(refs) and refs[i]() is B for i, B in enumerate(J.blocks)]
        k2 = len(self.W)
        if not any(blocks) or len(refs) != len(J.blocks) or DW.shape[0] != J.dense_rows.numel():
            return None
        columns = [j < len(stamps) and stamps[j] == self._stamps[j] for j in range(k2)] + [False]
        K = DW.new_zeros(DW.shape[0], k2 + 1)
        K[:, :min(k2, DW.shape[1])] = DW[:, :k2]
        return K, blocks, torch.tensor(columns, device=DW.device)

    def _pair_products(self, J, g: Tensor) -> Tensor | None:
        """``[sᵀy, yᵀy]`` of a deferred pair (one pass over s and y) when the rest of its ``Wᵀy`` can come from
        differences of products (see :meth:`defer`): its y is the change to this ``J``, ``g`` from those of the last
        sandwich, no other row of W has changed since, and the products that cancel are at most ``_CANCELLATION``
        times ‖y‖, bounded by ``μ(‖g₁‖ + ‖g₀‖) + Σ|wᵢ|(‖∇c_i(x₁)‖ + ‖∇c_i(x₀)‖) <= 2μ‖g₀‖ + ‖y‖ + 2 Σ|wᵢ|(...)``
        (the triangle inequality on y) before the pass that gives ‖g₁‖; else None."""
        kept, slot = self._kept, self._pending
        if self._change is None or kept is None:
            return None
        mu, w, g0, J0, g1, J1 = self._change
        g0, J0 = g0(), J0()
        if g1() is not g or J1() is not J or g0 is None or J0 is None or kept.g() is not g0:
            return None
        if (len(kept.blocks) != len(J0.blocks) or any(ref() is not B for ref, B in zip(kept.blocks, J0.blocks))
                or len(kept.JW) != J.dense_rows.numel()):
            return None
        own, stamps = (2 * slot, 2 * slot + 1), kept.stamps
        if any(j not in own and (j >= len(stamps) or stamps[j] != self._stamps[j]) for j in range(len(self.W))):
            return None
        pair = self._W[2 * slot:2 * slot + 2] @ self._W[2 * slot + 1]
        norm_y = pair[1].sqrt()
        rows = J.row_norms()[J.dense_rows] + J0.row_norms()[J0.dense_rows]
        cancelled = 2 * mu * kept.gg.sqrt() + norm_y + 2 * w[J.dense_rows].to(self.dtype).abs().dot(rows)
        return pair if bool(cancelled <= _CANCELLATION * norm_y) else None

    def _change_products(self, J, JW: Tensor, Wg: Tensor, pair: Tensor) -> Tensor:
        """``Wᵀy = μ (Wᵀg₁ − Wᵀg₀) + (J₁W − J₀W)ᵀ w`` for the rows of W the last sandwich multiplied (each difference
        of products of the same row), the pair's own rows from ``pair``."""
        (mu, w, *_), kept, slot = self._change, self._kept, self._pending
        k = len(kept.Wg)
        dg, dJW = Wg.clone(), JW[J.dense_rows]
        dg[:k] -= kept.Wg
        dJW[:, :k] -= kept.JW
        Wy = mu * dg + dJW.T @ w[J.dense_rows].to(self.dtype)
        Wy[2 * slot:2 * slot + 2] = pair
        return Wy

    def update(self, s: Tensor, y: Tensor) -> bool:
        """Damped update; ``yᵀHy`` from ``Wᵀy`` (H y itself only when damping needs it). Returns whether the pair
        was kept."""
        self._flush()
        free = self._free_slot() if self._W is not None else None
        if free is not None and self._W[2 * free].data_ptr() in (s.data_ptr(), y.data_ptr()):
            # the pair of :meth:`pair_rows`: its rows must not hold it if it is rejected (rows not in use are zero
            # or an accepted pair)
            s, y = s.clone(), y.clone()
            self._W[2 * free:2 * free + 2] = 0.0
        if self.order:
            W = self.W
            Wy = W @ y
            gamma, X = self._coefficients(Wy[:, None])
            yHy = gamma * y.dot(y) + Wy.dot(X[:, 0])
            s, sy = _damp(s, y, yHy, lambda: gamma * y + W.T @ X[:, 0], self.damping)
        else:
            Wy = None
            s, sy = _damp(s, y, y.dot(y), lambda: y, self.damping)
        if not _acceptable(sy, s, y):
            return False
        slot = self._write(s, y)
        k2 = 2 * (max(self.order + [slot]) + 1)
        # [sᵢᵀy, yᵢᵀy]ᵢ: the old slots' values and the new pair's
        Wy = torch.cat([Wy, s.new_zeros(k2 - len(Wy))]) if Wy is not None else s.new_zeros(k2)
        Wy[2 * slot], Wy[2 * slot + 1] = sy, y.dot(y)
        self._accept(slot, Wy)
        return True

    def defer(self, s: Tensor, y: Tensor, change: GradientChange | None = None) -> None:
        """:meth:`update` with the pair (s, y), done when ``H`` is next used: by :meth:`sandwich` from its own pass
        over W when no damping is needed (at large n a pass over W costs as much as the rest of the update).

        With ``change``, y's change of gradients from the point of the last sandwich to that of the next, ``Wᵀy``
        of the pairs already stored comes from the products of the two sandwiches by linearity,
        ``μ (Wᵀg₁ − Wᵀg₀) + (J₁W − J₀W)ᵀ w``, and the pass over W carries one vector fewer: used when the terms
        that cancel are not much larger than y (``_CANCELLATION``), else y is multiplied as without ``change``."""
        self._flush()
        self._pending = self._write(s, y)
        # (the points by weak reference: a pair that is never joined keeps neither one's gradient nor Jacobian alive)
        self._change = None if change is None else (change.mu, change.w, *map(weakref.ref, (
            change.g0, change.J0, change.g1, change.J1)))
        self.version += 1

    def pair_rows(self) -> tuple[Tensor, Tensor]:
        """The buffer rows where the next pair will be stored, to compute (s, y) in: :meth:`defer` and
        :meth:`update` of those very rows copy nothing (the rows are not in use; any other use of ``H`` before
        them is not allowed)."""
        self._flush()
        slot = self._free_slot()
        return self._W[2 * slot], self._W[2 * slot + 1]

    def _flush(self) -> None:
        """Settle a deferred pair with :meth:`update`."""
        if self._pending is not None:
            slot, self._pending, self._change = self._pending, None, None
            s, y = self._W[2 * slot].clone(), self._W[2 * slot + 1].clone()
            self._W[2 * slot:2 * slot + 2] = 0.0
            self.update(s, y)

    def _join(self, Wy: Tensor) -> bool:
        """Accept the deferred pair from ``Wᵀy`` (W with the pair); False, the pair still deferred, when it needs
        damping or is not acceptable (``_flush`` decides then)."""
        slot = self._pending
        s = self._W[2 * slot]
        sy, yy, ss = Wy[2 * slot], Wy[2 * slot + 1], s.dot(s)
        yHy = yy
        if self.order:
            gamma, X = self._coefficients(Wy[:, None])
            yHy = gamma * yy + Wy.dot(X[:, 0])
        scale = torch.sqrt(ss * yy)
        if not bool((sy >= self.damping * yHy) & torch.isfinite(sy) & torch.isfinite(scale) & (sy > 1e-14 * scale)):
            self._flush()
            return False
        self._pending = self._change = None
        self._accept(slot, Wy)
        return True

    def _free_slot(self) -> int:
        """The first slot not in use (the oldest pair stays until a new pair is accepted)."""
        if self._W is None:
            self._W = torch.zeros(2 * (self.memory + 1), self.n, dtype=self.dtype, device=self.device)
        return next(j for j in range(self.memory + 1) if j not in self.order)

    def _write(self, s: Tensor, y: Tensor) -> int:
        """Store the pair in a slot not in use (no copy when it was computed there, see :meth:`pair_rows`); returns
        the slot."""
        slot = self._free_slot()
        for row, v in ((self._W[2 * slot], s), (self._W[2 * slot + 1], y)):
            if v.data_ptr() != row.data_ptr():
                row.copy_(v)
        self._writes += 1
        self._stamps[2 * slot] = self._stamps[2 * slot + 1] = self._writes
        return slot

    def _accept(self, slot: int, Wy: Tensor) -> None:
        """Put the stored pair of ``slot`` last in ``order`` (dropping the oldest when full) and update ``SᵀY``,
        ``YᵀY`` from ``Wy = [sᵢᵀy, yᵢᵀy]ᵢ`` (slot-indexed, the pair's own entries included). Of ``SᵀY`` the
        recursion uses the upper triangle in the order of the pairs (``R``): the new pair's column; its row,
        ``sᵀyᵢ`` of the older pairs, lies below the diagonal and is zero."""
        k = len(Wy) // 2
        self._SY[slot] = 0.0
        self._SY[:k, slot] = Wy[0::2]
        self._YY[slot, :k] = self._YY[:k, slot] = Wy[1::2]
        if len(self.order) == self.memory:
            self.order.pop(0)
        self.order.append(slot)
        self._slots = torch.tensor(self.order, dtype=torch.long, device=self.device)
        self._updates += 1
        self.version += 1

    def state_dict(self) -> dict:
        """The pairs oldest first, their buffer slots and ``SᵀY``, ``YᵀY`` (oldest first), so that a loaded
        operator computes exactly what this one does."""
        self._flush()
        slots = self._slots
        return {"S": [s.clone() for s in self.S], "Y": [y.clone() for y in self.Y], "updates": self._updates,
                "slots": slots, "SY": self._SY[slots[:, None], slots].clone(),
                "YY": self._YY[slots[:, None], slots].clone()}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        work = dict(dtype=self.dtype, device=self.device)
        if state["S"]:
            self._W = torch.zeros(2 * (self.memory + 1), self.n, **work)
        for slot, s, y in zip(state["slots"].tolist(), state["S"], state["Y"]):
            self._W[2 * slot], self._W[2 * slot + 1] = s.to(**work), y.to(**work)
            self.order.append(slot)
        slots = self._slots = state["slots"].to(self.device)
        self._SY[slots[:, None], slots] = state["SY"].to(**work)
        self._YY[slots[:, None], slots] = state["YY"].to(**work)
        self._updates = int(state["updates"])
        self.version += 1


def _damp_batched(s: Tensor, y: Tensor, Hy: Tensor, theta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of (A, n) pairs: Powell-damped ``s``, its curvature ``sᵀy`` and whether the pair is kept."""
    sy, yHy = (s * y).sum(-1), (y * Hy).sum(-1)
    damp = sy < theta * yHy
    tau = torch.where(damp, (1 - theta) * yHy / torch.where(damp, yHy - sy, 1.0), 1.0)
    s = torch.where(damp[:, None], tau[:, None] * s + (1 - tau[:, None]) * Hy, s)
    sy = (s * y).sum(-1)
    scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return s, sy, torch.isfinite(sy) & torch.isfinite(scale) & (sy > 1e-14 * scale)


class BatchedDenseBFGS:
    """B inverse BFGS matrices stored densely, (B, n, n)."""

    def __init__(self, batch: int, n: int, dtype: torch.dtype, device: torch.device, damping: float = 1e-4):
        self.n, self.damping = n, damping
        self.H = torch.eye(n, dtype=dtype, device=device).repeat(batch, 1, 1)
        self.updates = torch.zeros(batch, dtype=torch.int64, device=device)

    def reset(self, idx: Tensor) -> None:
        """``H_b ← I`` for the problems ``idx``."""
        self.H[idx] = torch.eye(self.n, dtype=self.H.dtype, device=self.H.device)
        self.updates[idx] = 0

    def apply(self, V: Tensor, idx: Tensor) -> Tensor:
        """``H_b V_b`` for the problems ``idx``; ``V`` is (A, n, r)."""
        return self.H[idx] @ V

    def update(self, s: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """One damped update per problem ``idx`` (rows of s, y: (A, n)); returns which pairs were kept."""
        H = self.H[idx]
        sy0, yy = (s * y).sum(-1), (y * y).sum(-1)
        first = (self.updates[idx] == 0) & (sy0 > 0) & (yy > 0) & torch.isfinite(sy0 / yy)
        H = torch.where(first[:, None, None], (sy0 / torch.where(first, yy, 1.0))[:, None, None] * H, H)
        Hy = (H @ y[:, :, None])[:, :, 0]
        s, sy, kept = _damp_batched(s, y, Hy, self.damping)
        rho = torch.where(kept, 1.0 / torch.where(kept, sy, 1.0), 0.0)[:, None, None]
        Hy_s = Hy[:, :, None] * s[:, None, :]
        yHy = (y * Hy).sum(-1)[:, None, None]
        H_new = H - rho * (Hy_s + Hy_s.mT) + (rho * rho * yHy + rho) * (s[:, :, None] * s[:, None, :])
        self.H[idx] = torch.where(kept[:, None, None], 0.5 * (H_new + H_new.mT), H)
        self.updates[idx] += kept.to(torch.int64)
        return kept

    def state_dict(self) -> dict:
        return {"H": self.H.clone(), "updates": self.updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.H = state["H"].to(dtype=self.H.dtype, device=self.H.device).clone()
        self.updates = state["updates"].to(self.updates.device).clone()


class BatchedLBFGS:
    """B limited-memory inverse BFGS approximations: the last ``memory`` pairs of each problem, (B, k, n),
    newest last; a problem with fewer pairs has zero pairs in front, which the recursion skips (ρ = 0)."""

    def __init__(self, batch: int, n: int, dtype: torch.dtype, device: torch.device, memory: int,
                 damping: float = 1e-4):
        self.memory, self.damping = memory, damping
        self.S = torch.zeros(batch, memory, n, dtype=dtype, device=device)
        self.Y = torch.zeros_like(self.S)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)   # pairs held, <= memory
        self.updates = torch.zeros(batch, dtype=torch.int64, device=device)

    def reset(self, idx: Tensor) -> None:
        self.S[idx] = 0.0
        self.Y[idx] = 0.0
        self.count[idx] = 0
        self.updates[idx] = 0

    def apply(self, V: Tensor, idx: Tensor) -> Tensor:
        """``H_b V_b`` for the problems ``idx`` by the two-loop recursion, all columns of V (A, n, r) at once."""
        S, Y, count = self.S[idx], self.Y[idx], self.count[idx]
        k = self.memory
        held = torch.arange(k, device=S.device) >= k - count[:, None]           # (A, k)
        sy = (S * Y).sum(-1)
        rho = torch.where(held, 1.0 / torch.where(held, sy, 1.0), 0.0)
        Q = V.clone()
        alphas = [None] * k
        for i in reversed(range(k)):
            alphas[i] = rho[:, i, None] * (S[:, i, :, None] * Q).sum(1)          # (A, r)
            Q = Q - Y[:, i, :, None] * alphas[i][:, None, :]
        yy = (Y[:, -1] * Y[:, -1]).sum(-1)
        gamma = torch.where(count > 0, sy[:, -1] / torch.where(count > 0, yy, 1.0), 1.0)
        R = gamma[:, None, None] * Q
        for i in range(k):
            beta = rho[:, i, None] * (Y[:, i, :, None] * R).sum(1)
            R = R + S[:, i, :, None] * (alphas[i] - beta)[:, None, :]
        return R

    def update(self, s: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """Append one damped pair per problem ``idx`` (dropping its oldest); returns which pairs were kept."""
        s, sy, kept = _damp_batched(s, y, self.apply(y[:, :, None], idx)[:, :, 0], self.damping)
        keep = kept[:, None, None]
        self.S[idx] = torch.where(keep, torch.cat([self.S[idx][:, 1:], s[:, None]], 1), self.S[idx])
        self.Y[idx] = torch.where(keep, torch.cat([self.Y[idx][:, 1:], y[:, None]], 1), self.Y[idx])
        self.count[idx] = torch.where(kept, (self.count[idx] + 1).clamp(max=self.memory), self.count[idx])
        self.updates[idx] += kept.to(torch.int64)
        return kept

    def state_dict(self) -> dict:
        return {"S": self.S.clone(), "Y": self.Y.clone(), "count": self.count.clone(), "updates": self.updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("S", "Y", "count", "updates"):
            old = getattr(self, key)
            setattr(self, key, state[key].to(dtype=old.dtype, device=old.device).clone())
