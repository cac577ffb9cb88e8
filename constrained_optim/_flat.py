"""Parameters <-> one flat vector.

The optimizers work on ``x ∈ Rⁿ``, the concatenation of every parameter tensor flattened in order.
This module is the only place that knows about the parameters' shapes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor


def _checked(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters as a list, once checked: floating point, dense, leaves that require grad, one dtype
    and one device."""
    params = list(params)
    if not params:
        raise ValueError("the optimizer got an empty parameter list")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, expected a torch.Tensor")
        if not p.is_floating_point():
            raise TypeError(f"parameter {i} has dtype {p.dtype}; only real floating dtypes can be optimized")
        if not p.requires_grad:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) does not require grad")
        if p.is_sparse:
            raise TypeError(f"parameter {i} is sparse; constrained optimizers need dense parameters")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1:
        raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; use one dtype")
    if len(devices) > 1:
        raise TypeError(f"parameters live on different devices {sorted(map(str, devices))}; use one device")
    return params


def max_abs(v: Tensor) -> float:
    """``‖v‖∞`` of a flat vector in one pass, without the temporary of ``v.abs().max()`` (an n-vector costs a
    pass over memory at large n); NaN when ``v`` holds one, 0 for an empty vector."""
    if v.numel() == 0:
        return 0.0
    low, high = torch.aminmax(v)
    return float(torch.maximum(-low, high))


def within(a: Tensor, b: Tensor, radius: float, width: int = 1 << 16) -> bool:
    """``‖a − b‖∞ <= radius``, over column slices so that a far point is ruled out after its first slice."""
    return all(max_abs(a[i:i + width] - b[i:i + width]) <= radius for i in range(0, a.numel(), width))


class FlatParams:
    """A fixed list of parameter tensors seen as one vector ``x``.

    Validates once that the parameters can be optimized together: floating point, dense, leaves
    that require grad, one dtype and one device.
    """

    def __init__(self, params: Sequence[Tensor]):
        params = _checked(params)
        self.params = params
        self.numels = [p.numel() for p in params]
        self.n = sum(self.numels)
        self.dtype = params[0].dtype
        self.eps = torch.finfo(self.dtype).eps      # the precision the closure computes in
        self.device = params[0].device

    def offset(self, param: Tensor) -> int | None:
        """Where ``param`` (one of the parameters, by identity) starts in ``x``; None if it is not one."""
        start = 0
        for p, numel in zip(self.params, self.numels):
            if p is param:
                return start
            start += numel
        return None

    def get(self) -> Tensor:
        """x: a detached copy of the parameters as one vector (``torch.cat`` copies)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def holds(self, x: Tensor) -> bool:
        """Whether the parameters hold exactly ``x`` (in their dtype), compared without a copy of them (and with one
        host synchronisation, whatever the number of parameters)."""
        if len(self.params) == 1:      # (torch.equal: one pass, no boolean temporary)
            return torch.equal(self.params[0].detach().reshape(-1), x.to(self.dtype))
        same = [torch.eq(p.detach().reshape(-1), chunk.to(p.dtype)).all()
                for p, chunk in zip(self.params, x.split(self.numels))]
        return bool(torch.stack(same).all())

    @torch.no_grad()
    def set(self, x: Tensor) -> None:
        """Write the vector ``x`` into the parameters (in place, so references stay valid)."""
        for p, chunk in zip(self.params, x.split(self.numels)):
            p.copy_(chunk.view_as(p))

    @torch.no_grad()
    def set_grad(self, g: Tensor) -> None:
        """Write the vector ``g`` into the parameters' ``.grad``."""
        for p, chunk in zip(self.params, g.split(self.numels)):
            p.grad = chunk.view_as(p).clone()

    def grad(self) -> Tensor:
        """The parameters' ``.grad`` as one vector (a missing grad counts as zero)."""
        chunks = []
        for p in self.params:
            if p.grad is None:
                chunks.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            elif p.grad.is_sparse:
                raise TypeError("sparse gradients are not supported; use a dense embedding (sparse=False)")
            else:
                chunks.append(p.grad.detach().reshape(-1))
        return torch.cat(chunks)

    def flatten(self, tensors: Iterable[Tensor | None], batch_shape: tuple[int, ...] = ()) -> Tensor:
        """Concatenate per-parameter tensors of shape ``batch_shape + p.shape`` into ``batch_shape + (n,)`` (a view of
        the tensor itself when there is one parameter)."""
        out = []
        for p, t in zip(self.params, tensors):
            if t is None:
                out.append(torch.zeros(*batch_shape, p.numel(), dtype=p.dtype, device=p.device))
            else:
                out.append(t.reshape(*batch_shape, p.numel()))
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)   # one parameter: no copy


class BatchedFlatParams:
    """Parameters that hold ``B`` independent problems, seen as one matrix ``X ∈ R^{B×n}``.

    Every parameter has the same leading (batch) dimension ``B``; problem ``b`` owns slice ``[b]`` of each,
    and row ``b`` of ``X`` is those slices flattened and concatenated in order.
    """

    def __init__(self, params: Sequence[Tensor]):
        params = _checked(params)
        shapes = [tuple(p.shape) for p in params]
        if any(p.dim() == 0 for p in params) or len({p.shape[0] for p in params}) > 1 or params[0].shape[0] == 0:
            raise ValueError(f"every parameter needs the same leading (batch) dimension B >= 1, one slice per "
                             f"problem; got shapes {shapes}")
        self.params = params
        self.batch = params[0].shape[0]
        self.numels = [p[0].numel() for p in params]
        self.n = sum(self.numels)
        self.dtype = params[0].dtype
        self.eps = torch.finfo(self.dtype).eps      # the precision the closure computes in
        self.device = params[0].device

    def get(self) -> Tensor:
        """X (B, n): a detached copy of the parameters, one row per problem (``torch.cat`` copies)."""
        return torch.cat([p.detach().reshape(self.batch, -1) for p in self.params], dim=1)

    @torch.no_grad()
    def set(self, x: Tensor) -> None:
        """Write the rows of ``x`` (B, n) into the parameters (in place)."""
        for p, chunk in zip(self.params, x.split(self.numels, dim=-1)):
            p.copy_(chunk.reshape(p.shape))

    def flatten(self, tensors: Iterable[Tensor | None], batch_shape: tuple[int, ...] = ()) -> Tensor:
        """Concatenate per-parameter tensors of shape ``batch_shape + p.shape`` into ``batch_shape + (B, n)``."""
        out = []
        for p, t in zip(self.params, tensors):
            if t is None:
                out.append(torch.zeros(*batch_shape, self.batch, p[0].numel(), dtype=p.dtype, device=p.device))
            else:
                out.append(t.reshape(*batch_shape, self.batch, -1))
        return torch.cat(out, dim=-1)

    def grad(self) -> Tensor:
        """The parameters' ``.grad`` as (B, n) (a missing grad counts as zero)."""
        return self.flatten([None if p.grad is None else p.grad.detach() for p in self.params])
