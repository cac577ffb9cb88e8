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

from ._flat import FlatParams
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
    """

    def __init__(self, fn: Callable[[], Tensor], kind: str, name: str | None = None, fold: str | None = None):
        if not callable(fn):
            raise TypeError(f"constraint fn must be callable with no arguments, got {type(fn).__name__}")
        if kind not in _KINDS:
            raise ValueError(f"constraint kind must be 'ineq' or 'eq', got {kind!r}")
        if fold not in _FOLDS:
            raise ValueError(f"fold must be None, 'l2' or 'max', got {fold!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"constraint name must be a string, got {type(name).__name__}")
        self.fn = fn
        self.kind = kind
        self.name = name
        self.fold = fold

    def __repr__(self) -> str:
        fold = f", fold={self.fold!r}" if self.fold else ""
        return f"{self.kind}({self.name!r}{fold})"

    def values(self) -> Tensor:
        """The constraint's scalar rows at the current parameters: ``fn()`` flattened, then folded."""
        value = self.fn()
        if not isinstance(value, Tensor):
            raise TypeError(
                f"constraint {self.name!r} returned a {type(value).__name__}; it must return a tensor "
                "computed from the parameters (so that it can be differentiated)")
        if not value.is_floating_point():
            raise TypeError(f"constraint {self.name!r} returned dtype {value.dtype}; expected a floating tensor")
        return _fold(value.reshape(-1), self.kind, self.fold)


def _fold(c: Tensor, kind: str, fold: str | None) -> Tensor:
    if fold is None or c.numel() == 0:
        return c
    if fold == "max":
        folded = c.max() if kind == "ineq" else c.abs().max()
    else:
        r = c.clamp(min=0) if kind == "ineq" else c
        # ‖r‖₂ = s ‖r / s‖₂ with s = ‖r‖∞: squaring tiny violations must not underflow to "feasible"
        scale = r.detach().abs().max()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        folded = scale * torch.linalg.vector_norm(r / scale)
    return folded.reshape(1)


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


def ineq(fn: Callable[[], Tensor], name: str | None = None, fold: str | None = None) -> Constraint:
    """Inequality constraint ``fn() <= 0`` elementwise."""
    return Constraint(fn, "ineq", name, fold)


def eq(fn: Callable[[], Tensor], name: str | None = None, fold: str | None = None) -> Constraint:
    """Equality constraint ``fn() == 0`` elementwise."""
    return Constraint(fn, "eq", name, fold)


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
        c: (m,) detached values ``[c_I; c_E]`` in the parameters' dtype.
        p: number of inequality rows (the first ``p`` entries of ``c``).
        slices: constraint name -> slice of ``c`` holding its rows.
        bounds: ``(slice of c, columns k_i in x, signs σ_i)`` of every :class:`Bounds` constraint on an optimized
            parameter.
        _blocks: the values (with their graph) of the other constraints, in order: the dense rows.
    """

    c: Tensor
    p: int
    slices: dict[str, slice]
    _graph: Tensor | None
    _flat: FlatParams
    bounds: list[tuple[slice, Tensor, Tensor]] = field(default_factory=list)
    _blocks: list[Tensor] = field(default_factory=list)

    @property
    def m(self) -> int:
        return self.c.numel()

    def vjp(self, w: Tensor, retain_graph: bool = True) -> Tensor:
        """``Jᵀ w`` (n,) by one backward pass (``retain_graph``: keep the graph for further products)."""
        return self._flat.flatten(self.vjp_per_param(w, retain_graph))

    def vjp_per_param(self, w: Tensor, retain_graph: bool = True) -> tuple[Tensor | None, ...]:
        """``Jᵀ w`` split by parameter (None where a parameter does not enter any constraint)."""
        if self.m == 0:
            return (None,) * len(self._flat.params)
        return torch.autograd.grad(self._graph, self._flat.params, grad_outputs=w.to(self._graph.dtype),
                                   retain_graph=retain_graph, allow_unused=True)

    def backward(self, w: Tensor, loss: Tensor | None = None) -> None:
        """Accumulate ``∇loss + Jᵀ w`` into the parameters' ``.grad`` by ONE backward pass (frees the graph)."""
        outputs = ([loss] if loss is not None else []) + ([self._graph] if self.m else [])
        grads = ([torch.ones_like(loss)] if loss is not None else []) + ([w.to(self._graph.dtype)] if self.m else [])
        if outputs:
            torch.autograd.backward(outputs, grads)

    def jacobian(self) -> Tensor:
        """``J`` (m, n) as a dense tensor (see :meth:`structured_jacobian`)."""
        return self.structured_jacobian().to_dense()

    def structured_jacobian(self) -> Jacobian:
        """``J`` as a :class:`~constrained_optim.jacobian.Jacobian`: the bound rows by column and sign, the rows of
        every other constraint by one batched vector-Jacobian product of that constraint alone (vmap over
        ``I_r``, r its number of rows; a plain backward for r = 1), so that no constraint pays for the rows of
        the others.

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
        blocks += [self._block_rows(value) for value in self._blocks]
        return Jacobian(blocks, dense_rows, bound_rows, columns, signs)

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
            warnings.warn(f"batched Jacobian failed ({str(err).splitlines()[0]}); computing it one row at a "
                          "time, which is slower", RuntimeWarning, stacklevel=5)
            return torch.stack([flat.flatten(torch.autograd.grad(value, flat.params, grad_outputs=e,
                                                                 retain_graph=True, allow_unused=True))
                                for e in eye])
        return flat.flatten(grads, batch_shape=(r,))


def evaluate(constraints: Sequence[Constraint], flat: FlatParams, check_dependence: bool = False) -> ConstraintValues:
    """Evaluate every constraint at the current parameters (with grad enabled) into ``c = [c_I; c_E]``.

    With ``check_dependence`` each constraint is checked once to depend on the parameters.
    """
    rows, slices, start, p = [], {}, 0, 0
    bounds, dense = [], []
    with torch.enable_grad():
        for con in constraints:
            value = con.values()
            if value.device != flat.device or value.dtype != flat.dtype:
                raise TypeError(
                    f"constraint {con.name!r} returned a {value.dtype} tensor on {value.device}, but the "
                    f"parameters are {flat.dtype} on {flat.device}; compute constraints in the parameters' "
                    "dtype and device")
            if check_dependence:
                _check_dependence(con, value, flat)
            rows.append(value)
            slices[con.name] = slice(start, start + value.numel())
            columns = con.columns(flat) if isinstance(con, Bounds) else None
            if columns is not None:
                bounds.append((slices[con.name], columns, con.signs.to(device=flat.device, dtype=flat.dtype)))
            else:
                dense.append(value)
            start += value.numel()
            if con.kind == "ineq":
                p = start
        graph = torch.cat(rows) if rows else None
    c = graph.detach() if graph is not None else torch.zeros(0, dtype=flat.dtype, device=flat.device)
    return ConstraintValues(c=c, p=p, slices=slices, _graph=graph, _flat=flat, bounds=bounds, _blocks=dense)


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
