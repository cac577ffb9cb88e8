"""The constraint Jacobian as an operator: dense rows from autograd, bound rows by their index.

``J ∈ Rᵐˣⁿ`` (row i = ∇c_i) has two kinds of rows:

* dense rows ``D ∈ Rʳˣⁿ`` at positions ``P_D`` of ``c``, from one batched vector-Jacobian product per
  constraint (in the parameters' dtype, kept as the row blocks autograd wrote);
* bound rows ``σ_i e_{k_i}ᵀ`` (``σ_i = ±1``) at positions ``P_B``, from ``co.Box``, ``co.NonNegative``,
  ``co.Ball(p="inf")`` and ``co.Simplex``'s ``x >= 0`` (``c_i = σ_i x_{k_i} + β_i``), stored as the column
  ``k_i`` and the sign ``σ_i``: never formed.

The products the SQP needs, without a dense bound row and without autograd:

    J V         rows P_D: D V,               rows P_B: σ_i V[k_i]           (gather)
    Jᵀ w        Dᵀ w_D + Σ_{i∈B} σ_i w_i e_{k_i}                            (scatter-add)
    J Jᵀ        blocks D Dᵀ,  D Bᵀ = [σ_j D[:, k_j]]_j,  (B Bᵀ)_ij = σ_i σ_j [k_i = k_j]
    (J − J')ᵀ w  the dense blocks' differences only (bound rows do not move)

``J Jᵀ`` comes with ``J Vᵀ`` (and ``L Vᵀ`` for a few extra rows L) from one pass over column slices of
``[D; L; V]`` copied into a small float64 buffer: the L-BFGS needs ``J Jᵀ``, ``J W``, ``J ∇f`` and ``Wᵀ∇f``
together. Every result is float64; products with a dense part of another dtype (float32 parameters)
accumulate in float64 over such slices, so no float64 copy of ``D`` is made. ``J Jᵀ`` and the row norms are
computed once per point and kept.
"""
from __future__ import annotations

import torch
from torch import Tensor

_WORK = torch.float64
_BLOCK = 1 << 21      # entries of D converted to float64 at a time (16 MiB)
_SLICE = 1 << 18      # entries of [D; V] per column slice of the fused products (2 MiB: stays in a CPU cache)
_ACCELERATOR = 1 << 6  # slices that many times larger off the CPU (few kernel launches, no cache to fit)
_SMALL = 1 << 20      # dense parts up to this many entries are kept as one matrix (one product, not one per block)


class Jacobian:
    """``J`` (m, n) from its dense rows and its bound rows (see module doc).

    Args:
        blocks: the dense rows ``D`` as a list of row blocks (r_j, n), one per constraint (so that the rows of
            a large constraint are used where autograd wrote them, never copied into one matrix; a small
            ``D`` is stacked into one); at least one (possibly (0, n)) block, which sets n and the dtype.
        dense_rows: (r,) positions in ``c`` of the dense rows, ``r = Σ r_j``.
        bound_rows: (b,) positions in ``c`` of the bound rows.
        columns: (b,) the column ``k_i`` of each bound row.
        signs: (b,) ``σ_i`` (±1).
    """

    def __init__(self, blocks: list[Tensor], dense_rows: Tensor, bound_rows: Tensor, columns: Tensor,
                 signs: Tensor):
        self.n, self.dtype = blocks[0].shape[1], blocks[0].dtype
        self.blocks = [B for B in blocks if B.shape[0]]
        if len(self.blocks) > 1 and dense_rows.numel() * self.n <= _SMALL:
            self.blocks = [torch.cat(self.blocks)]
        self.dense_rows, self.bound_rows = dense_rows, bound_rows
        self.columns, self.signs = columns, signs.to(device=blocks[0].device, dtype=_WORK)
        self.m = dense_rows.numel() + bound_rows.numel()
        self._gram = self._norms = self._amax = None

    @classmethod
    def from_dense(cls, J: Tensor) -> "Jacobian":
        """All rows dense."""
        empty = torch.zeros(0, dtype=torch.long, device=J.device)
        return cls([J], torch.arange(J.shape[0], device=J.device), empty, empty, J.new_zeros(0))

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.n

    @property
    def bounds(self) -> int:
        """Number of bound rows."""
        return self.bound_rows.numel()

    @property
    def T(self) -> "_Transposed":
        return _Transposed(self)

    def _stacked(self, values: list[Tensor], like: Tensor) -> Tensor:
        """The per-block results stacked (float64; empty, shaped like ``like``, without dense rows)."""
        return torch.cat(values) if values else like.new_zeros((0,) + like.shape[1:], dtype=_WORK)

    def __matmul__(self, V: Tensor) -> Tensor:
        """``J V`` for V (n,) or (n, k)."""
        out = V.new_empty((self.m,) + V.shape[1:], dtype=_WORK)
        out[self.dense_rows] = self._stacked([_times(B, V) for B in self.blocks], V)
        out[self.bound_rows] = _signed(self.signs, V[self.columns].to(_WORK))
        return out

    @property
    def dense(self) -> Tensor:
        """``D`` (r, n), the dense rows as one matrix (a copy when there are several large blocks)."""
        if len(self.blocks) == 1:
            return self.blocks[0]
        return torch.cat(self.blocks) if self.blocks else self.signs.new_zeros(0, self.n, dtype=self.dtype)

    def rmatmul_change(self, previous: "Jacobian", w: Tensor) -> Tensor:
        """``(J − J_prev)ᵀ w`` for the Jacobian of the same constraints at another point, without the cancellation
        of ``Jᵀw − J_prevᵀw`` (bound rows do not change)."""
        out = w.new_zeros(self.n, dtype=_WORK)
        w_dense, start = w[self.dense_rows].to(_WORK), 0
        for B, B_prev in zip(self.blocks, previous.blocks):
            for cols in _column_slices(B):
                out[cols] += (B[:, cols] - B_prev[:, cols]).to(_WORK).T @ w_dense[start:start + len(B)]
            start += len(B)
        return out

    def rmatmul(self, w: Tensor) -> Tensor:
        """``Jᵀ w`` for w (m,) or (m, k)."""
        out = w.new_zeros((self.n,) + w.shape[1:], dtype=_WORK)
        w_dense, start = w[self.dense_rows].to(_WORK), 0
        for B in self.blocks:
            _add_transposed_times(out, B, w_dense[start:start + len(B)])
            start += len(B)
        return out.index_add_(0, self.columns, _signed(self.signs, w[self.bound_rows].to(_WORK)))

    def gram(self) -> Tensor:
        """``J Jᵀ`` (m, m), computed once."""
        if self._gram is None:
            self.gram_and_times([])
        return self._gram

    def gram_and_times(self, rows: list[Tensor], left: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(J Jᵀ, J Vᵀ, L Vᵀ)`` for ``V`` the given row blocks stacked ((k, n) in all) and extra rows ``L``
        (e, n) (none by default), in one pass over the dense rows and V (``J Jᵀ`` is kept for later calls)."""
        V = [R.to(_WORK) for R in rows]
        L = [] if left is None else [left.to(_WORK)]
        DDt, DLVt = _products(self.blocks, L, V, self._gram is None, self.signs)
        r = self.dense_rows.numel()
        JVt = self.signs.new_empty(self.m, sum(len(R) for R in V))
        JVt[self.dense_rows] = DLVt[:r]
        if V:
            JVt[self.bound_rows] = self.signs[:, None] * torch.cat([R[:, self.columns] for R in V]).T
        if self._gram is None:
            self._gram = self._assemble_gram(DDt)
        return self._gram, JVt, DLVt[r:]

    def _assemble_gram(self, DDt: Tensor) -> Tensor:
        G = self.signs.new_zeros(self.m, self.m)
        dense, bound = self.dense_rows, self.bound_rows
        G[dense[:, None], dense] = DDt
        if self.bounds:
            DB = self.signs * self._stacked([B[:, self.columns].to(_WORK) for B in self.blocks], G)   # D Bᵀ
            G[dense[:, None], bound] = DB
            G[bound[:, None], dense] = DB.T
            same = self.columns[:, None] == self.columns[None, :]
            G[bound[:, None], bound] = torch.outer(self.signs, self.signs) * same
        return G

    def row_norms(self) -> Tensor:
        """``‖∇c_i‖₂`` (m,), computed once (1 for bound rows)."""
        if self._norms is None:
            self._norms = self._per_row([torch.linalg.vector_norm(B, dim=1) for B in self.blocks])
        return self._norms

    def row_amax(self) -> Tensor:
        """``‖∇c_i‖∞`` (m,), computed once (NaN where a row holds a NaN)."""
        if self._amax is None:
            self._amax = self._per_row([torch.maximum(B.amax(dim=1), -B.amin(dim=1)) for B in self.blocks])
        return self._amax

    def _per_row(self, dense_values: list[Tensor]) -> Tensor:
        out = self.signs.new_ones(self.m)
        out[self.dense_rows] = self._stacked([v.to(_WORK) for v in dense_values], out)
        return out

    @property
    def finite(self) -> bool:
        """Every entry is finite. (A row's 2-norm is finite when its entries are, unless it overflows: only
        then is every entry checked.)"""
        if bool(torch.isfinite(self.row_norms()).all()):
            return True
        return all(bool(torch.isfinite(B).all()) for B in self.blocks)

    def to_dense(self) -> Tensor:
        """The (m, n) matrix in the dense rows' dtype (for small problems: gradient sampling, tests)."""
        J = self.signs.new_zeros(self.m, self.n, dtype=self.dtype)
        J[self.dense_rows] = self.dense
        J[self.bound_rows, self.columns] = self.signs.to(J.dtype)
        return J


class _Transposed:
    """``Jᵀ``, so that ``J.T @ w`` reads like the math."""

    def __init__(self, J: Jacobian):
        self.J = J

    def __matmul__(self, w: Tensor) -> Tensor:
        return self.J.rmatmul(w)


def _signed(signs: Tensor, values: Tensor) -> Tensor:
    return signs.reshape((-1,) + (1,) * (values.dim() - 1)) * values


def _column_slices(D: Tensor):
    """Column slices of D of about ``_BLOCK`` entries (all of D when it is small)."""
    width = max(1, _entries(_BLOCK, D.device) // max(len(D), 1))
    return [slice(start, start + width) for start in range(0, D.shape[1], width)]


def _column_blocks(D: Tensor):
    """Column slices of D of about ``_BLOCK`` entries with a float64 copy of each (one reused buffer)."""
    r, n = D.shape
    width = max(1, _entries(_BLOCK, D.device) // max(r, 1))
    buffer = D.new_empty(r, min(width, n), dtype=_WORK)
    for start in range(0, n, width):
        block = buffer[:, :min(width, n - start)]
        block.copy_(D[:, start:start + width])
        yield slice(start, start + width), block


def _times(D: Tensor, V: Tensor) -> Tensor:
    """``D V`` accumulated in float64."""
    V = V.to(_WORK)
    if D.dtype == _WORK:
        return D @ V
    out = V.new_zeros((D.shape[0],) + V.shape[1:])
    for cols, block in _column_blocks(D):
        out += block @ V[cols]
    return out


def _add_transposed_times(out: Tensor, D: Tensor, w: Tensor) -> None:
    """``out += Dᵀ w`` in float64."""
    if D.dtype == _WORK:
        out += D.T @ w
        return
    for cols, block in _column_blocks(D):
        out[cols] += block.T @ w


def _products(blocks: list[Tensor], extra: list[Tensor], rows: list[Tensor], gram: bool,
              like: Tensor) -> tuple[Tensor | None, Tensor]:
    """``(D Dᵀ if gram, [D; E] Vᵀ)`` for D, E, V the stacked blocks, extra rows and rows (all with n columns),
    accumulated in float64 over column slices of ``[D; E; V]`` copied into one small buffer (cache-sized: faster
    than separate products, even in float64). ``like``: a float64 tensor on the device."""
    r, e, k = (sum(len(M) for M in group) for group in (blocks, extra, rows))
    DDt = like.new_zeros(r, r) if gram else None
    DVt = like.new_zeros(r + e, k)
    if not r + e:
        return DDt, DVt
    n = (blocks + extra)[0].shape[1]
    width = max(1, _entries(_SLICE, like.device) // (r + e + k))
    buffer = like.new_empty(r + e + k, min(width, n))
    for start in range(0, n, width):
        cols = slice(start, start + width)
        block = buffer[:, :min(width, n - start)]
        row = 0
        for M in blocks + extra + rows:
            block[row:row + len(M)].copy_(M[:, cols])
            row += len(M)
        if gram:
            DDt.addmm_(block[:r], block[:r].T)
        DVt.addmm_(block[:r + e], block[r + e:].T)
    return DDt, DVt


def _entries(base: int, device: torch.device) -> int:
    return base if device.type == "cpu" else base * _ACCELERATOR
