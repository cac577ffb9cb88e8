"""Data-parallel reduction: every quantity that enters a decision is the same on every rank.

Under ``torch.distributed`` with R ranks, rank r evaluates the closure on its shard of the data. The
problem all ranks solve together is

    f(x) = (1/R) Σ_r f_r(x)                     (the mean of the ranks' losses: equal shards)
    c_i(x) = (1/R) Σ_r c_{r,i}(x)   "mean"      (default: a rate over the global batch)
             Σ_r c_{r,i}(x)         "sum"
             max_r c_{r,i}(x)       "max"       (a worst case over all shards)

and the gradient of a reduced row is ``∇c_i = Σ_r s_{r,i} ∇c_{r,i}`` with ``s_{r,i} = 1/R``, ``1``, or
``1[r = argmax_r c_{r,i}]`` (lowest rank on ties). A constraint that does not depend on the data (a weight
norm) has the same value on every rank and any reduction returns it.

What is communicated per evaluation: the loss value and the constraint values in one ``all_gather``; the
optimizer's own vector-Jacobian products and Jacobians (local rows weighted by ``s_r``) in one
``all_reduce``. The gradient of the loss is averaged by ``DistributedDataParallel`` (or by the user's own
all-reduce): the optimizer checks once, at its first evaluation, that parameters and gradients agree on
all ranks, and raises otherwise instead of letting the ranks drift apart. Without an initialized process
group (or with ``process_group=False``) nothing is communicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

REDUCTIONS = ("mean", "sum", "max")
_CODES = {name: i for i, name in enumerate(REDUCTIONS)}


def resolve(process_group) -> "Reducer | None":
    """The reducer for an optimizer's ``process_group`` option: ``None`` means the default group when
    ``torch.distributed`` is initialized with more than one rank, ``False`` never communicates."""
    check_option(process_group)
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("a process_group was given but torch.distributed is not initialized")
        return None
    if dist.get_world_size(process_group) == 1:
        return None
    return Reducer(process_group)


def check_option(process_group) -> None:
    """Validate the option without resolving it (optimizers may be built before the group is)."""
    if process_group is None or process_group is False:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None (the default group), False (no communication) or a "
                        f"torch.distributed.ProcessGroup, got {process_group!r}")


class Reducer:
    """Collectives over one process group (see the module doc for the semantics)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, loss: Tensor | None, c: Tensor, codes: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """One ``all_gather`` of ``[f_r, c_r]``. Returns the mean loss, the reduced constraint values and this
        rank's row weights ``s_r`` (see the module doc); ``codes`` holds each row's reduction index."""
        local = torch.cat([(loss.detach() if loss is not None else c.new_zeros(())).reshape(1).to(c.dtype), c])
        table = self._all_gather(local)                          # (R, 1 + m)
        losses, rows = table[:, 0], table[:, 1:]
        mean, total = rows.mean(0), rows.sum(0)
        top, winner = rows.max(0)                                # first (lowest) rank on ties
        reduced = torch.where(codes == _CODES["sum"], total, torch.where(codes == _CODES["max"], top, mean))
        mine = (winner == self.rank).to(c.dtype)
        scale = torch.where(codes == _CODES["sum"], torch.ones_like(c),
                            torch.where(codes == _CODES["max"], mine, torch.full_like(c, 1.0 / self.size)))
        global_loss = None if loss is None else losses.mean().to(loss.dtype).reshape(loss.shape)
        return global_loss, reduced, scale

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a tensor over the ranks (one ``all_reduce``)."""
        return self.sum(value) / self.size

    def sum(self, value: Tensor) -> Tensor:
        """The sum of a tensor over the ranks (one ``all_reduce``; the input is not modified)."""
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def check_replicated(self, **tensors: Tensor) -> None:
        """Raise on every rank when a tensor (parameters, gradients) differs between ranks."""
        table = self._all_gather(torch.stack([_checksum(t) for t in tensors.values()]))   # (R, k, 3)
        spread = (table.amax(0) - table.amin(0)).amax(1)
        scale = table.abs().amax(0).amax(1)
        for name, gap, size in zip(tensors, spread.tolist(), scale.tolist()):
            if gap > 1e-6 * size:
                raise RuntimeError(
                    f"the {name} differ between the {self.size} ranks (checksums spread {gap:.3g}): a "
                    "data-parallel constrained optimizer needs the same parameters on every rank and loss "
                    "gradients averaged over the ranks. Wrap the model in DistributedDataParallel (or "
                    "all-reduce the gradients before step), and initialize all replicas identically.")

    def _all_gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


def codes(reductions: list[tuple[slice, str]], m: int, like: Tensor) -> Tensor:
    """Each row's reduction index, from ``(slice, reduction)`` pairs."""
    out = torch.zeros(m, dtype=torch.long, device=like.device)
    for rows, name in reductions:
        out[rows] = _CODES[name]
    return out


def _checksum(t: Tensor) -> Tensor:
    """Three numbers that differ between two different vectors with probability one in practice."""
    v = t.detach().reshape(-1).to(torch.float64)
    weights = torch.cos(torch.arange(v.numel(), dtype=torch.float64, device=v.device))
    return torch.stack([v.sum(), v.abs().sum(), (weights * v).sum()])


class DataParallel:
    """Mixin of the optimizers: the reducer of their ``process_group`` option (``self._process_group``),
    resolved at the first evaluation (an optimizer may be built before the process group is)."""

    def _reducer(self) -> Reducer | None:
        if "_reducer_cache" not in self.__dict__:
            self._reducer_cache = resolve(self._process_group)
        return self._reducer_cache

    def _synchronize(self, values, loss: Tensor | None) -> Tensor | None:
        """Reduce the constraint values (``ConstraintValues``) and the loss over the ranks (one collective);
        returns the mean loss. Without a process group: the loss as it is."""
        reducer = self._reducer()
        return loss if reducer is None else values.synchronize(reducer, loss)

    def _check_replicas(self, flat) -> None:
        """Once: parameters and loss gradients must agree on all ranks (see :meth:`Reducer.check_replicated`)."""
        reducer = self._reducer()
        if reducer is not None and not self.__dict__.get("_replicas_checked", False):
            reducer.check_replicated(parameters=flat.get(), gradients=flat.grad())
            self._replicas_checked = True

    def _mean_gradient(self, flat):
        """The loss gradient averaged over the ranks, whether or not DDP averaged it already (the mean of
        equal vectors is the vector): for ``certify``, whose closure may bypass the DDP wrapper."""
        reducer = self._reducer()
        if reducer is None:
            return flat.grad()
        reducer.check_replicated(parameters=flat.get())
        return reducer.mean(flat.grad())
