"""Problems shared by the data-parallel tests: one dataset split into equal shards, the same model, loss and
constraints written once for a shard (run under DDP on every rank) and once for the whole dataset (the
single-process reference that every rank must reproduce).

The constraints exercise the three reductions: a positive rate over the batch (mean), the worst prediction
over the batch (max), a sum over the batch (sum), and data-independent ones (weight norm, an equality).
"""
from __future__ import annotations

import datetime
import os

import torch

import constrained_optim as co

WORLD = 2
STEPS = {"sqp": 40, "alm": 25, "alm_fused": 25, "penalty": 25, "pgd": 8, "local": 10}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5], dtype=torch.float64) + 0.1 * torch.randn(16, generator=g,
                                                                                             dtype=torch.float64)
    return X, y


def shard(rank: int, world: int = WORLD):
    X, y = data()
    n = X.shape[0] // world
    return X[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def model() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(5, 1).double()


def constraints(lin: torch.nn.Linear, forward, kind: str):
    """``forward()`` returns the predictions on this process's data (a shard, or everything)."""
    rate = co.ineq(lambda: torch.sigmoid(forward()).mean() - 0.45, name="rate")
    worst = co.ineq(lambda: forward().abs().max().reshape(1) - 4.0, name="worst", reduce="max")
    total = co.ineq(lambda: (torch.nn.functional.softplus(forward()) - 0.6).sum().reshape(1) / 16, name="total", reduce="sum")
    norm = co.ineq(lambda: lin.weight.square().sum() - 2.0, name="norm")
    if kind == "sqp":
        return [rate, worst, total, norm, co.eq(lambda: lin.weight.sum() - 0.3, name="sum")]
    if kind == "pgd":
        return [co.Ball(lin.weight, radius=1.2), co.Box(lin.bias, lower=-0.1, upper=0.1)]
    return [rate, worst, total, norm]


def optimizer(kind: str, params, cons):
    if kind == "sqp":
        return co.ConstrainedSQP(params, cons)
    if kind in ("alm", "alm_fused"):
        return co.AugmentedLagrangian(params, cons, lr=0.05, update_every=3, penalty=5.0)
    if kind == "local":     # no communication even when distributed: each rank solves its own shard's problem
        return co.AugmentedLagrangian(params, cons, lr=0.05, update_every=3, penalty=5.0, process_group=False)
    if kind == "penalty":
        return co.Penalty(params, cons, optimizer=torch.optim.SGD, lr=0.02, update_every=5)
    if kind == "pgd":
        return co.ProjectedGradient(params, cons, lr=0.1, step="spg")
    raise ValueError(kind)


def run(kind: str, module, lin, X, y):
    """``STEPS[kind]`` steps of ``kind`` with the loss computed through ``module`` (the DDP wrapper or the
    model itself); returns (flat parameters, certificate of the last point)."""
    fused = kind == "alm_fused"      # the closure leaves backward to the optimizer; constraints reuse its forward
    cache = {}

    def forward():
        return cache["out"] if fused else module(X).squeeze(-1)

    def closure():
        opt.zero_grad()
        cache["out"] = module(X).squeeze(-1)
        loss = torch.nn.functional.mse_loss(cache["out"], y)
        if not fused:
            loss.backward()
        return loss

    opt = optimizer(kind, lin.parameters(), constraints(lin, forward, kind))
    for _ in range(STEPS[kind]):
        opt.step(closure)
    cert = opt.certificate if kind == "sqp" else opt.certify(closure)
    x = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    return x, cert


def reference(kind: str, rank: int | None = None):
    """The single-process run on the concatenated data (on one shard with ``rank``)."""
    X, y = data() if rank is None else shard(rank)
    lin = model()
    return run(kind, lin, lin, X, y)


def values_at_start(X, lin, synchronize=None) -> tuple[torch.Tensor, torch.Tensor]:
    """c and J of the SQP problem's constraints at the initial model (reduced over the ranks with a reducer)."""
    from constrained_optim._flat import FlatParams
    from constrained_optim.constraints import canonical, evaluate
    values = evaluate(canonical(constraints(lin, lambda: lin(X).squeeze(-1), "sqp")), FlatParams(list(lin.parameters())))
    if synchronize is not None:
        values.synchronize(synchronize)
    return values.c, values.jacobian()


def reduced_values(rank: int):
    from constrained_optim.distributed import Reducer
    X, _ = shard(rank)
    return values_at_start(X, model(), Reducer())


def init(rank: int, rendezvous: str) -> None:
    """Join the group through a file store (no rank hosts it: with a TCP store on rank 0, a rank 0 that left
    first aborted the other rank's last store access once in ten to twenty runs)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=30))


def finish() -> None:
    """Wait for the other rank before tearing down."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def worker(rank: int, rendezvous: str, out_dir: str, kinds: list[str]) -> None:
    """Each kind under DDP on this rank's shard; results to ``out_dir/rank{r}.pt``."""
    init(rank, rendezvous)
    results = {}
    try:
        for kind in kinds:
            X, y = shard(rank)
            lin = model()
            module = lin if kind == "local" else torch.nn.parallel.DistributedDataParallel(lin)
            x, cert = run(kind, module, lin, X, y)
            results[kind] = dict(x=x, cert=cert.__dict__)
        results["values"] = reduced_values(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        finish()


def unsynced_worker(rank: int, rendezvous: str, out_dir: str, kind: str) -> None:
    """A model NOT wrapped in DDP: gradients differ between ranks, and the optimizer must say so."""
    init(rank, rendezvous)
    try:
        X, y = shard(rank)
        lin = model()
        try:
            run(kind, lin, lin, X, y)
            message = "no error"
        except RuntimeError as err:
            message = str(err)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
            fh.write(message)
    finally:
        finish()


def failing_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    """Rank 1's closure raises in the middle of a run; rank 0 waits in a collective."""
    init(rank, rendezvous)
    X, y = shard(rank)
    lin = model()
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    calls = [0]

    def closure():
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise RuntimeError("rank 1 failed on purpose")
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(X).squeeze(-1), y)
        loss.backward()
        return loss

    opt = co.ConstrainedSQP(lin.parameters(), [co.ineq(lambda: lin.weight.square().sum() - 1.0)])
    for _ in range(10):
        opt.step(closure)
