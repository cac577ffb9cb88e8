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
together. At large n, products whose one side has a few rows (matrix-vector like) skip the copy of the other.

Rows that did not change: the Jacobian at a trial point takes over the blocks of the current point's that are
bit for bit the same (``share_unchanged``: constraints linear in x). A shared block is stored once; its part of
``J Jᵀ`` is the previous one, ``(J − J')ᵀw`` skips it, its norms are the previous ones, and a caller that keys
products on the block's identity (the L-BFGS ``J W`` of the pairs already stored) reuses them. ``Jᵀw`` reads
only the rows of a large block whose weight is nonzero. Every result is float64; products with a dense part of another dtype (float32 parameters)
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
_THIN = 4             # at large n, products with a side of at most this many rows skip the copy ...
_THIN_SLICE = 1 << 15  # ... and run over column slices this wide
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
        self._previous_gram: Tensor | None = None   # J_prev J_prevᵀ, for the blocks shared with J_prev
        self.shared = [False] * len(self.blocks)    # which blocks are J_prev's (see ``share_unchanged``)
        self._block_norms: list[Tensor | None] = [None] * len(self.blocks)   # per block, shared with the block
        self._block_amax: list[Tensor | None] = [None] * len(self.blocks)

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

    def share_unchanged(self, previous: "Jacobian") -> None:
        """Take over the dense blocks that equal ``previous``'s bit for bit (``previous``: the same constraints at an
        earlier point; equal blocks are the rows of constraints linear in x, or of parameters that did not move).
        A shared block is stored once, its part of ``J Jᵀ`` is ``previous``'s, ``(J − J_prev)ᵀw`` skips it, and
        products that a caller keeps by the block's identity (the L-BFGS ``J W``) stay valid."""
        if self._gram is not None or len(self.blocks) != len(previous.blocks):
            return
        for i, (B, P) in enumerate(zip(self.blocks, previous.blocks)):
            if B is P or (B.shape == P.shape and B.dtype == P.dtype and torch.equal(B, P)):
                self.blocks[i], self.shared[i] = P, True
                self._block_norms[i], self._block_amax[i] = previous._block_norms[i], previous._block_amax[i]
        if previous._gram is not None and any(self.shared):
            self._previous_gram = previous._gram

    def rmatmul_change(self, previous: "Jacobian", w: Tensor, out: Tensor | None = None,
                       gradients: tuple[float, Tensor, Tensor] | None = None) -> Tensor:
        """``(J − J_prev)ᵀ w`` for the Jacobian of the same constraints at another point, without the cancellation
        of ``Jᵀw − J_prevᵀw`` (bound rows and shared blocks do not change); into ``out`` (n,) when given. With
        ``gradients = (μ, g, g_prev)``: ``μ (g − g_prev) + (J − J_prev)ᵀ w``, the change of the gradient of the
        Lagrangian ``μ f + wᵀc``, formed over the same column slices (each slice of the result is written once)."""
        out = w.new_empty(self.n, dtype=_WORK) if out is None else out
        w_dense = w[self.dense_rows].to(_WORK)
        changed, start = [], 0
        for B, B_prev in zip(self.blocks, previous.blocks):
            if B is not B_prev:
                changed.append((B, B_prev, w_dense[start:start + len(B)]))
            start += len(B)
        # slices in which the differences of the blocks stay in cache
        width = max(1, _entries(_SLICE, out.device) // max([len(B) for B, _, _ in changed] + [1]))
        mu, g, g_prev = gradients if gradients is not None else (0.0, None, None)
        for begin in range(0, self.n, width):
            cols = slice(begin, begin + width)
            part = out[cols]
            if g is None:
                part.zero_()
            else:
                torch.sub(g[cols], g_prev[cols], out=part).mul_(mu)
            for B, B_prev, weights in changed:
                part.addmv_((B[:, cols] - B_prev[:, cols]).to(_WORK).T, weights)
        return out

    def rmatmul(self, w: Tensor, base: Tensor | None = None) -> Tensor:
        """``Jᵀ w`` for w (m,) or (m, k), or ``base + Jᵀw`` without a pass of its own for the sum (``base`` unchanged);
        of a large block only the rows with a nonzero weight are read (at a solution most inequalities are inactive:
        their multipliers and violation weights are zero)."""
        w_dense, out = w[self.dense_rows].to(_WORK), None
        for rows, weights in self._weighted(w_dense):
            out = _add_transposed_times(out, rows, weights, base)
        if out is None:
            out = base.clone() if base is not None else w.new_zeros((self.n,) + w.shape[1:], dtype=_WORK)
        if self.bounds:
            out.index_add_(0, self.columns, _signed(self.signs, w[self.bound_rows].to(_WORK)))
        return out

    def bilinear(self, w: Tensor, v: Tensor) -> Tensor:
        """``wᵀ J v`` (a float64 scalar tensor) for w (m,) and v (n,), reading only the weighted rows of a large
        block (as :meth:`rmatmul`) and no n-vector result."""
        w_dense = w[self.dense_rows].to(_WORK)
        total = w[self.bound_rows].to(_WORK).dot(_signed(self.signs, v[self.columns].to(_WORK)))
        for rows, weights in self._weighted(w_dense):
            total = total + weights.dot(_times(rows, v))
        return total

    def _weighted(self, w_dense: Tensor):
        """``(rows, weights)``: the dense blocks with their weights, a large block only by its runs of rows with a
        nonzero weight (views); ``w_dense`` (r,) or (r, k)."""
        nonzero = w_dense != 0
        weighted = (nonzero.flatten(1).any(dim=1) if w_dense.dim() > 1 else nonzero).tolist()
        for B, (start, stop) in zip(self.blocks, self._spans()):
            if B.numel() <= _SMALL or all(weighted[start:stop]):
                yield B, w_dense[start:stop]
                continue
            for a, b in _true_runs(weighted[start:stop]):
                yield B[a:b], w_dense[start + a:start + b]

    def gram(self) -> Tensor:
        """``J Jᵀ`` (m, m), computed once."""
        if self._gram is None:
            self.gram_and_times([])
        return self._gram

    def gram_and_times(self, rows: list[Tensor], left: list[Tensor] | None = None,
                       known: tuple[Tensor, list[bool], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(J Jᵀ, J Vᵀ, L Vᵀ)`` for ``V`` the given row blocks stacked ((k, n) in all) and ``L`` the row blocks
        of ``left`` stacked ((e, n), none by default), in one pass over the dense rows and V (``J Jᵀ`` is kept for
        later calls).

        Products known already are not recomputed: the part of ``J Jᵀ`` between blocks shared with the previous
        Jacobian (``share_unchanged``), and with ``known = (K, blocks, columns)`` the entries of the dense rows'
        ``D Vᵀ`` in the blocks flagged in ``blocks`` and the columns flagged in ``columns`` (k,), taken from K (r, k).
        """
        V = [R.to(_WORK) for R in rows]
        L = [R.to(_WORK) for R in left or []]
        spans, every = self._spans(), range(len(self.blocks))
        fresh = [i for i in every if known is None or not known[1][i]]
        kept = [i for i in every if i not in fresh]
        pairs = [([self.blocks[i] for i in fresh] + L, V)]
        if kept:            # the kept blocks times the new columns of V only
            pairs.append(([self.blocks[i] for i in kept],
                          [R[idx] for R, idx in zip(V, _split_mask(known[2], [len(R) for R in V]))]))
        gram = self._gram is None
        changed = [i for i in every if self._previous_gram is None or not self.shared[i]]
        if gram:            # the changed blocks times all of D
            pairs.append(([self.blocks[i] for i in changed], self.blocks))
        outs = _products(pairs, self.signs)
        device = self.signs.device
        DVt = self.signs.new_zeros(self.dense_rows.numel(), sum(len(R) for R in V))
        fresh_rows = _rows(spans, fresh, device)
        DVt[fresh_rows] = outs[0][:len(fresh_rows)]
        if kept:
            kept_rows, columns = _rows(spans, kept, device), known[2]
            DVt[kept_rows[:, None], columns.nonzero()[:, 0]] = known[0][kept_rows][:, columns]
            DVt[kept_rows[:, None], (~columns).nonzero()[:, 0]] = outs[1]
        JVt = self.signs.new_empty(self.m, DVt.shape[1])
        JVt[self.dense_rows] = DVt
        if V:
            JVt[self.bound_rows] = self.signs[:, None] * torch.cat([R[:, self.columns] for R in V]).T
        if gram:
            self._gram = self._assemble_gram(self._dense_gram(outs[-1], _rows(spans, changed, device)))
            self._previous_gram = None
        return self._gram, JVt, outs[0][len(fresh_rows):]

    def _spans(self) -> list[tuple[int, int]]:
        """The dense rows (start, stop) of each block."""
        bounds = [0]
        for B in self.blocks:
            bounds.append(bounds[-1] + len(B))
        return list(zip(bounds[:-1], bounds[1:]))

    def _dense_gram(self, changed_rows_times_D: Tensor, changed: Tensor) -> Tensor:
        """``D Dᵀ`` from the rows of the changed blocks times ``Dᵀ`` and, for the others, the previous ``J Jᵀ``."""
        r = self.dense_rows.numel()
        if len(changed) == r:
            return changed_rows_times_D
        dense = self.dense_rows
        DDt = self._previous_gram[dense[:, None], dense].clone()
        DDt[changed] = changed_rows_times_D
        DDt[:, changed] = changed_rows_times_D.T
        return DDt

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
            self._norms = self._per_row(self._per_block(self._block_norms,
                                                        lambda B: torch.linalg.vector_norm(B, dim=1)))
        return self._norms

    def row_amax(self) -> Tensor:
        """``‖∇c_i‖∞`` (m,), computed once (NaN where a row holds a NaN)."""
        if self._amax is None:
            self._amax = self._per_row(self._per_block(self._block_amax,
                                                       lambda B: torch.maximum(B.amax(dim=1), -B.amin(dim=1))))
        return self._amax

    def _per_block(self, cache: list[Tensor | None], fn) -> list[Tensor]:
        """``fn`` of each dense block, kept in ``cache`` (blocks shared with the previous Jacobian bring theirs)."""
        for i, B in enumerate(self.blocks):
            if cache[i] is None:
                cache[i] = fn(B)
        return cache

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


def _add_transposed_times(out: Tensor | None, D: Tensor, w: Tensor, base: Tensor | None = None) -> Tensor:
    """``out + Dᵀ w`` in float64, in place; ``out = None``: a new ``base + Dᵀw`` (``Dᵀw`` without ``base``), without a
    pass to zero or copy it first."""
    matrix = w.dim() > 1
    if D.dtype == _WORK:
        if out is None:
            if base is None:
                return D.T @ w
            return torch.addmm(base, D.T, w) if matrix else torch.addmv(base, D.T, w)
        return out.addmm_(D.T, w) if matrix else out.addmv_(D.T, w)
    if out is None:
        out = base.clone() if base is not None else w.new_zeros((D.shape[1],) + w.shape[1:], dtype=_WORK)
    for cols, block in _column_blocks(D):
        out[cols] += block.T @ w
    return out


def _products(pairs: list[tuple[list[Tensor], list[Tensor]]], like: Tensor) -> list[Tensor]:
    """``[L Rᵀ for (L, R) in pairs]`` (L, R: row blocks stacked, all with n columns), accumulated in float64 over
    column slices of every distinct block copied once into one small buffer (cache-sized: one pass over the data,
    faster than separate products, even in float64). ``like``: a float64 tensor on the device."""
    outs = [like.new_zeros(sum(len(M) for M in L), sum(len(M) for M in R)) for L, R in pairs]
    live = [(out, L, R) for out, (L, R) in zip(outs, pairs) if out.numel()]
    if not live:
        return outs
    n = live[0][1][0].shape[1]
    if n > _entries(_THIN_SLICE, like.device) and all(M.dtype == _WORK for _, L, R in live for M in L + R) and all(
            min(len(out), out.shape[1]) <= _THIN for out, _, _ in live):
        _thin_products(live, like.device)
        return outs
    distinct: dict[int, tuple[Tensor, int]] = {}
    row = 0
    for _, L, R in live:
        for M in L + R:
            if id(M) not in distinct:
                distinct[id(M)] = (M, row)
                row += len(M)
    width = max(1, _entries(_SLICE, like.device) // row)
    buffer = like.new_empty(row, min(width, n))
    products = [(out[lo:hi, left:right], a, b, c, d) for out, L, R in live
                for lo, hi, a, b in _runs(L, distinct) for left, right, c, d in _runs(R, distinct)]
    for start in range(0, n, width):
        block = buffer[:, :min(width, n - start)]
        for M, at in distinct.values():
            block[at:at + len(M)].copy_(M[:, start:start + width])
        for out, a, b, c, d in products:
            out.addmm_(block[a:b], block[c:d].T)
    return outs


def _thin_products(live: list[tuple[Tensor, list[Tensor], list[Tensor]]], device: torch.device) -> None:
    """The products of :func:`_products` when every one has a side of at most ``_THIN`` rows (matrix-vector
    like) and all data is float64: over column slices wide enough for few calls, every distinct block of the
    other (fat) side times every thin block that multiplies it (whichever product it belongs to), so that each
    fat block is read from memory once per slice."""
    n = live[0][1][0].shape[1]
    width = _entries(_THIN_SLICE, device)
    groups: dict[int, tuple[Tensor, dict[int, Tensor], list[tuple[Tensor, int]]]] = {}
    for out, L, R in live:
        swap = sum(len(M) for M in L) > sum(len(M) for M in R)       # thin side first: (out, thin, fat)
        out, thin, fat = (out.T, R, L) if swap else (out, L, R)
        column = 0
        for M in fat:
            if len(M):
                _, rows, targets = groups.setdefault(id(M), (M, {}, []))
                row = 0
                for T in thin:
                    if len(T):
                        rows.setdefault(id(T), T)
                        targets.append((out[row:row + len(T), column:column + len(M)], id(T)))
                    row += len(T)
            column += len(M)
    plans = []
    for M, rows, targets in groups.values():
        thin, offset, at = list(rows.values()), {}, 0
        for key, T in rows.items():
            offset[key] = at
            at += len(T)
        plans.append((tuple(offset), M, thin, M.new_zeros(at, len(M)), targets, offset))
    (_thin_products_by_rows if device.type == "cpu" else _thin_products_stacked)(plans, n, width)
    for _, _, _, acc, targets, offset in plans:
        for view, key in targets:
            view += acc[offset[key]:offset[key] + len(view)]


def _thin_products_by_rows(plans: list, n: int, width: int) -> None:
    """On a CPU, one matrix-vector product per thin row and slice: the fat slice comes from memory for the first and
    from the cache for the others (MKL's products of a few rows by a fat slice cost more, per row, than these: 18
    against 25 ms for 3 rows times 24 rows of 10⁶ columns, float64, one thread)."""
    work = [(M.split(width, 1), [(target, row.split(width)) for target, row in zip(acc, (r for T in thin for r in T))])
            for _, M, thin, acc, _, _ in plans]
    for s in range(-(-n // width)):
        for fat, rows in work:
            for target, parts in rows:
                target.addmv_(fat[s], parts[s])


def _thin_products_stacked(plans: list, n: int, width: int) -> None:
    """Elsewhere (one kernel per product counts), one product per fat block and slice, with the thin blocks that
    multiply it stacked in a small buffer; fat blocks multiplied by the same thin blocks one after the other, so
    that a slice copies those into the buffer once."""
    plans = sorted(plans, key=lambda plan: plan[0])
    buffer = plans[0][3].new_empty(max(len(plan[3]) for plan in plans), min(width, n))
    for start in range(0, n, width):
        cols = slice(start, start + width)
        copied = None
        for key, M, thin, acc, _, _ in plans:
            block = thin[0][:, cols] if len(thin) == 1 else buffer[:len(acc), :min(width, n - start)]
            if len(thin) > 1 and key != copied:
                row = 0
                for T in thin:
                    block[row:row + len(T)].copy_(T[:, cols])
                    row += len(T)
                copied = key
            acc.addmm_(block, M[:, cols].T)


def _runs(group: list[Tensor], distinct: dict) -> list[tuple[int, int, int, int]]:
    """``group``'s rows as runs adjacent in the buffer: (start, stop) in the stacked group, (start, stop) in the
    buffer (one run in the usual case)."""
    runs, row = [], 0
    for M in group:
        at = distinct[id(M)][1]
        if runs and runs[-1][1] == row and runs[-1][3] == at:
            runs[-1] = (runs[-1][0], row + len(M), runs[-1][2], at + len(M))
        else:
            runs.append((row, row + len(M), at, at + len(M)))
        row += len(M)
    return runs


def _true_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """The (start, stop) of each run of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _rows(spans: list[tuple[int, int]], blocks: list[int], device: torch.device) -> Tensor:
    """The dense-row indices of the given blocks."""
    index = [torch.arange(*spans[i], device=device) for i in blocks]
    return torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)


def _split_mask(mask: Tensor, sizes: list[int]) -> list[Tensor]:
    """The indices where ``mask`` is False, split by the given consecutive sizes (relative to each part)."""
    return [(~part).nonzero()[:, 0] for part in mask.split(sizes)]


def _entries(base: int, device: torch.device) -> int:
    return base if device.type == "cpu" else base * _ACCELERATOR
