"""Function constraints and their evaluation into one canonical form.

A problem's constraints are ``c_I(x) <= 0`` and ``c_E(x) = 0``. Each :class:`Constraint` wraps a
zero-argument callable returning a tensor of any shape; every element is one scalar constraint. At a
point, :func:`evaluate` stacks all of them into one vector

    c = [c_I; c_E] ∈ Rᵐ,   m = p + q,

keeping the autograd graph, so that the Jacobian ``J = ∂c/∂x`` (rows are constraint gradients) is
obtained by *batched* vector-Jacobian products ``J_kᵀ E`` with ``E = I_{r_k}``, one per constraint k of r_k rows
(one for all rows would differentiate every constraint with all m rows of E, most of them zero), and
``Jᵀ w`` for a single weight vector by one ordinary backward pass.

Folding (``fold="l2"`` or ``"max"``) replaces a constraint tensor by one scalar:

    ineq:  ‖max(c, 0)‖₂ <= 0   ("l2")      max_i c_i <= 0   ("max")
    eq:    ‖c‖₂ = 0            ("l2")      ‖c‖∞ = 0         ("max")

which keeps the feasible set and turns thousands of rows into one (the folded function is nonsmooth
where it is zero).

Bounds (:class:`Bounds`, what ``co.Box`` and ``co.NonNegative`` state themselves as) are inequality rows
``c_i = σ_i x_{k_i} + β_i`` on one parameter (``σ_i = ±1``): their Jacobian rows ``σ_i e_{k_i}ᵀ`` are known, so
:meth:`ConstraintValues.structured_jacobian` records them by column and sign instead of differentiating them
(see :mod:`constrained_optim.jacobian`).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import distributed
from ._flat import BatchedFlatParams, FlatParams
from .distributed import REDUCTIONS
from .jacobian import Jacobian

_KINDS = ("ineq", "eq")
_FOLDS = (None, "l2", "max")


class Constraint:
    """One named constraint tensor: ``fn() <= 0`` (``kind="ineq"``) or ``fn() == 0`` (``kind="eq"``).

    Args:
        fn: callable with no arguments returning a tensor of any shape computed from the parameters.
        kind: ``"ineq"`` or ``"eq"``.
        name: used in certificates and error messages (default ``"ineq0"``, ``"eq1"``, ... by position).
        fold: ``None`` (every element is a constraint), ``"l2"`` or ``"max"`` (one scalar, see module doc).
        reduce: how the rows combine over the ranks of a data-parallel run: ``"mean"`` (default), ``"sum"``
            or ``"max"`` (see :mod:`constrained_optim.distributed`; ignored when not distributed).
    """

    def __init__(self, fn: Callable[[], Tensor], kind: str, name: str | None = None, fold: str | None = None,
                 reduce: str = "mean"):
        if not callable(fn):
            raise TypeError(f"constraint fn must be callable with no arguments, got {type(fn).__name__}")
        if kind not in _KINDS:
            raise ValueError(f"constraint kind must be 'ineq' or 'eq', got {kind!r}")
        if fold not in _FOLDS:
            raise ValueError(f"fold must be None, 'l2' or 'max', got {fold!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"constraint name must be a string, got {type(name).__name__}")
        self.fn = fn
        self.kind = kind
        self.name = name
        self.fold = fold
        self.reduce = reduce

    def __repr__(self) -> str:
        fold = f", fold={self.fold!r}" if self.fold else ""
        reduce = f", reduce={self.reduce!r}" if self.reduce != "mean" else ""
        return f"{self.kind}({self.name!r}{fold}{reduce})"

    def values(self, batch: int | None = None) -> Tensor:
        """The constraint's scalar rows at the current parameters: ``fn()`` flattened, then folded.

        With ``batch = B`` (B independent problems) the value must have shape (B, ...); it is flattened and
        folded per problem into (B, r)."""
        value = self.fn()
        if not isinstance(value, Tensor):
            raise TypeError(
                f"constraint {self.name!r} returned a {type(value).__name__}; it must return a tensor "
                "computed from the parameters (so that it can be differentiated)")
        if not value.is_floating_point():
            raise TypeError(f"constraint {self.name!r} returned dtype {value.dtype}; expected a floating tensor")
        if batch is None:
            return _fold(value.reshape(-1), self.kind, self.fold)
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(f"constraint {self.name!r} returned shape {tuple(value.shape)}; with {batch} independent "
                             f"problems it must have shape ({batch}, ...): one slice per problem, batch first")
        return _fold(value.reshape(batch, -1), self.kind, self.fold)


def _fold(c: Tensor, kind: str, fold: str | None) -> Tensor:
    """Fold the last dimension of ``c`` (..., r) into one row (..., 1) (unchanged for ``fold=None``)."""
    if fold is None or c.shape[-1] == 0:
        return c
    if fold == "max":
        return c.amax(-1, keepdim=True) if kind == "ineq" else c.abs().amax(-1, keepdim=True)
    r = c.clamp(min=0) if kind == "ineq" else c
    # ‖r‖₂ = s ‖r / s‖₂ with s = ‖r‖∞: squaring tiny violations must not underflow to "feasible"
    scale = r.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale * torch.linalg.vector_norm(r / scale, dim=-1, keepdim=True)


class Bounds(Constraint):
    """Bound rows on one parameter: ``c_i = σ_i param.flatten()[k_i] + β_i <= 0`` (``σ_i = ±1``), computed by ``fn``.

    Args:
        fn: returns the rows (as for any constraint).
        param: the bounded tensor.
        index: (b,) flat positions ``k_i`` in ``param`` of the rows, in the order ``fn`` returns them.
        signs: (b,) ``σ_i``.
        name: constraint name.
    """

    def __init__(self, fn: Callable[[], Tensor], param: Tensor, index: Tensor, signs: Tensor, name: str | None = None):
        super().__init__(fn, "ineq", name)
        self.param, self.index, self.signs = param, index, signs

    def columns(self, flat: FlatParams) -> Tensor | None:
        """The columns ``k_i`` in the flat ``x``; None when ``param`` is not one of the optimized tensors."""
        start = flat.offset(self.param)
        return None if start is None else self.index.to(flat.device) + start


def ineq(fn: Callable[[], Tensor], name: str | None = None, fold: str | None = None,
         reduce: str = "mean") -> Constraint:
    """Inequality constraint ``fn() <= 0`` elementwise."""
    return Constraint(fn, "ineq", name, fold, reduce)


def eq(fn: Callable[[], Tensor], name: str | None = None, fold: str | None = None,
       reduce: str = "mean") -> Constraint:
    """Equality constraint ``fn() == 0`` elementwise."""
    return Constraint(fn, "eq", name, fold, reduce)


def canonical(constraints: Sequence | None) -> list[Constraint]:
    """Validate a user's constraint list; state sets (``co.Box``, ...) as constraints; order inequalities
    first; give every constraint a unique name."""
    from .sets import Set

    if constraints is None:
        return []
    if isinstance(constraints, (Constraint, Set)):
        constraints = [constraints]
    expanded, set_counts = [], {}
    for i, c in enumerate(list(constraints)):
        if isinstance(c, Set):
            kind = type(c).__name__.lower()
            expanded += c.as_constraint(c.name or f"{kind}{set_counts.get(kind, 0)}")
            set_counts[kind] = set_counts.get(kind, 0) + 1
        elif isinstance(c, Constraint):
            expanded.append(c)
        else:
            raise TypeError(f"constraints[{i}] is a {type(c).__name__}; build constraints with co.ineq(fn), "
                            "co.eq(fn) or a set such as co.Box(param, lower, upper)")
    constraints = expanded
    counts = {"ineq": 0, "eq": 0}
    named = []
    for c in constraints:
        if c.name is None:
            c = copy.copy(c)
            c.name = f"{c.kind}{counts[c.kind]}"
        counts[c.kind] += 1
        named.append(c)
    names = [c.name for c in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"constraint names must be unique; repeated: {duplicates}")
    return [c for c in named if c.kind == "ineq"] + [c for c in named if c.kind == "eq"]


@dataclass
class ConstraintValues:
    """All constraints evaluated at one point, with their autograd graph.

    Attributes:
        c: (m,) detached values ``[c_I; c_E]`` in the parameters' dtype; (B, m) for a batch of problems
            (after :meth:`synchronize`: reduced over the ranks).
        p: number of inequality rows (the first ``p`` entries of ``c``).
        slices: constraint name -> slice of ``c`` holding its rows.
        reductions: ``(slice, "mean" | "sum" | "max")`` of each constraint (data-parallel runs).
        bounds: ``(slice of c, columns k_i in x, signs σ_i)`` of every :class:`Bounds` constraint on an optimized
            parameter.
        _blocks: the values (with their graph) of the other constraints, in order: the dense rows.
    """

    c: Tensor
    p: int
    slices: dict[str, slice]
    reductions: list[tuple[slice, str]]
    _graph: Tensor | None
    _flat: FlatParams | BatchedFlatParams
    bounds: list[tuple[slice, Tensor, Tensor]] = field(default_factory=list)
    _blocks: list[Tensor] = field(default_factory=list)
    _reducer: distributed.Reducer | None = None
    _scale: Tensor | None = None      # this rank's row weights s_r (distributed.py)

    @property
    def m(self) -> int:
        return self.c.shape[-1]

    def synchronize(self, reducer: distributed.Reducer, loss: Tensor | None = None) -> Tensor | None:
        """Reduce ``c`` over the ranks (one collective, with the loss) and make every later product with J
        the reduced one. Returns the mean loss (None without a loss)."""
        codes = distributed.codes(self.reductions, self.m, self.c)
        loss, self.c, self._scale = reducer.gather(loss, self.c, codes)
        self._reducer = reducer
        return loss

    def vjp(self, w: Tensor, retain_graph: bool = True) -> Tensor:
        """``Jᵀ w`` (n,), or (B, n) for a batch, by one backward pass (``retain_graph``: keep the graph for
        further products)."""
        return self._flat.flatten(self.vjp_per_param(w, retain_graph))

    def vjp_per_param(self, w: Tensor, retain_graph: bool = True) -> tuple[Tensor | None, ...]:
        """``Jᵀ w`` split by parameter (None where a parameter does not enter any constraint)."""
        if self.m == 0:
            return (None,) * len(self._flat.params)
        if self._reducer is not None:
            w = w * self._scale
        grads = torch.autograd.grad(self._graph, self._flat.params, grad_outputs=w.to(self._graph.dtype),
                                    retain_graph=retain_graph, allow_unused=True)
        if self._reducer is None:
            return grads
        total = self._reducer.sum(self._flat.flatten(grads))
        return tuple(chunk.view_as(p) for p, chunk in zip(self._flat.params, total.split(self._flat.numels)))

    def backward(self, w: Tensor, loss: Tensor | None = None) -> None:
        """Accumulate ``∇loss + Jᵀ w`` into the parameters' ``.grad`` by ONE backward pass (frees the graph).

        Data-parallel: the rows are weighted by ``R s_r`` so that the gradient average that
        DistributedDataParallel takes over the ranks is the reduced ``∇f + Jᵀw``."""
        if self._reducer is not None and self.m:
            w = w * self._scale * self._reducer.size
        outputs = ([loss] if loss is not None else []) + ([self._graph] if self.m else [])
        grads = ([torch.ones_like(loss)] if loss is not None else []) + ([w.to(self._graph.dtype)] if self.m else [])
        if outputs:
            torch.autograd.backward(outputs, grads)

    def jacobian(self) -> Tensor:
        """``J`` (m, n) as a dense tensor (see :meth:`structured_jacobian`).

        For B independent problems (``c`` of shape (B, m), row b a function of x_b only) the same m
        products, with ``e_j`` repeated over the batch, give all B Jacobians (B, m, n) at once:
        ``∂(Σ_b c_{b,j}) / ∂x_b = ∂c_{b,j} / ∂x_b``. Falls back to one backward per row, with a warning, when
        the user's functions contain an operation that vmap cannot batch.
        """
        if self.c.dim() == 1:
            return self.structured_jacobian().to_dense()
        m, flat = self.m, self._flat
        if m == 0:
            return torch.zeros(*self.c.shape, flat.n, dtype=flat.dtype, device=flat.device)
        eye = torch.eye(m, dtype=self._graph.dtype, device=self._graph.device)[:, None, :].expand(m, *self.c.shape)
        try:
            grads = torch.autograd.grad(self._graph, flat.params, grad_outputs=eye, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
        except (RuntimeError, NotImplementedError) as err:
            _warn_rowwise(err)
            return torch.stack([self.vjp(e) for e in eye]).movedim(0, -2)
        return flat.flatten(grads, batch_shape=(m,)).movedim(0, -2)

    def structured_jacobian(self) -> Jacobian:
        """``J`` as a :class:`~constrained_optim.jacobian.Jacobian`: the bound rows by column and sign, the rows of
        every other constraint by one batched vector-Jacobian product of that constraint alone (vmap over
        ``I_r``, r its number of rows; a plain backward for r = 1), so that no constraint pays for the rows of
        the others. In a data-parallel run the dense rows are weighted by ``s_r`` and summed over the ranks
        (one all-reduce); bound rows depend on the parameters only and are the same on every rank.

        Falls back to one backward per row, with a warning, when the user's functions contain an
        operation that vmap cannot batch.
        """
        device = self.c.device
        bound_rows = [torch.arange(rows.start, rows.stop, device=device) for rows, _, _ in self.bounds]
        dense_rows, start = [], 0
        for rows, _, _ in self.bounds + [(slice(self.m, self.m), None, None)]:
            dense_rows.append(torch.arange(start, rows.start, device=device))
            start = rows.stop
        dense_rows = torch.cat(dense_rows)
        bound_rows = torch.cat(bound_rows) if bound_rows else dense_rows[:0]
        columns = torch.cat([cols for _, cols, _ in self.bounds]) if self.bounds else dense_rows[:0]
        signs = torch.cat([sg for _, _, sg in self.bounds]) if self.bounds else self.c[:0]
        flat = self._flat
        blocks = [torch.zeros(0, flat.n, dtype=flat.dtype, device=flat.device)]
        dense = [self._block_rows(value) for value in self._blocks]
        if self._reducer is not None and dense:
            dense = self._reduce(dense, dense_rows)
        return Jacobian(blocks + dense, dense_rows, bound_rows, columns, signs)

    def _reduce(self, blocks: list[Tensor], rows: Tensor) -> list[Tensor]:
        """Σ_r s_r D_r over the ranks for the dense row blocks D (one all-reduce)."""
        D = torch.cat(blocks) * self._scale[rows, None].to(blocks[0].dtype)
        return list(self._reducer.sum(D).split([B.shape[0] for B in blocks]))

    def _block_rows(self, value: Tensor) -> Tensor:
        """The Jacobian rows (r, n) of one constraint's values."""
        flat, r = self._flat, value.numel()
        if not value.requires_grad:
            return torch.zeros(r, flat.n, dtype=flat.dtype, device=flat.device)
        if r == 1:
            grads = torch.autograd.grad(value, flat.params, torch.ones_like(value), retain_graph=True, allow_unused=True)
            return flat.flatten(grads, batch_shape=(1,))
        eye = torch.eye(r, dtype=value.dtype, device=value.device)
        try:
            grads = torch.autograd.grad(value, flat.params, grad_outputs=eye, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
        except (RuntimeError, NotImplementedError) as err:
            _warn_rowwise(err)
            return torch.stack([flat.flatten(torch.autograd.grad(value, flat.params, grad_outputs=e,
                                                                 retain_graph=True, allow_unused=True))
                                for e in eye])
        return flat.flatten(grads, batch_shape=(r,))


def _warn_rowwise(err: Exception) -> None:
    warnings.warn(f"batched Jacobian failed ({str(err).splitlines()[0]}); computing it one row at a time, which is "
                  "slower", RuntimeWarning, stacklevel=5)


def evaluate(constraints: Sequence[Constraint], flat: FlatParams | BatchedFlatParams, check_dependence: bool = False,
             batch: int | None = None) -> ConstraintValues:
    """Evaluate every constraint at the current parameters (with grad enabled) into ``c = [c_I; c_E]``;
    with ``batch = B``, into one such row per problem, ``c`` of shape (B, m).

    With ``check_dependence`` each constraint is checked once to depend on the parameters.
    """
    rows, slices, reductions, start, p = [], {}, [], 0, 0
    bounds, dense = [], []
    with torch.enable_grad():
        for con in constraints:
            value = con.values(batch)
            if value.device != flat.device or value.dtype != flat.dtype:
                raise TypeError(
                    f"constraint {con.name!r} returned a {value.dtype} tensor on {value.device}, but the "
                    f"parameters are {flat.dtype} on {flat.device}; compute constraints in the parameters' "
                    "dtype and device")
            if check_dependence:
                _check_dependence(con, value, flat)
            rows.append(value)
            slices[con.name] = slice(start, start + value.shape[-1])
            reductions.append((slices[con.name], con.reduce))
            columns = con.columns(flat) if isinstance(con, Bounds) and batch is None else None
            if columns is not None:
                bounds.append((slices[con.name], columns, con.signs.to(device=flat.device, dtype=flat.dtype)))
            else:
                dense.append(value)
            start += value.shape[-1]
            if con.kind == "ineq":
                p = start
        graph = torch.cat(rows, dim=-1) if rows else None
    empty = (0,) if batch is None else (batch, 0)
    c = graph.detach() if graph is not None else torch.zeros(empty, dtype=flat.dtype, device=flat.device)
    return ConstraintValues(c=c, p=p, slices=slices, reductions=reductions, _graph=graph, _flat=flat, bounds=bounds,
                            _blocks=dense)


def _check_dependence(con: Constraint, value: Tensor, flat: FlatParams) -> None:
    if value.numel() == 0:
        raise ValueError(f"constraint {con.name!r} returned an empty tensor")
    if value.requires_grad:
        grads = torch.autograd.grad(value.sum(), flat.params, retain_graph=True, allow_unused=True)
        if any(g is not None for g in grads):
            return
    raise ValueError(
        f"constraint {con.name!r} does not depend on the optimized parameters (its value has no autograd "
        "path to them); a constraint must be computed from the parameters inside fn(), with grad enabled")
