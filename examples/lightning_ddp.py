"""Data-parallel constrained training with PyTorch Lightning: ``Trainer(strategy="ddp", devices=2)`` on CPU.

Lightning starts a second process (it re-runs this script); each process trains on its half of the data and
the constrained optimizer reduces what it decides on over both (see ``constrained_optim.distributed``):

    minimize   mean((net(x) − y)²)
    subject to ‖W₁‖_F − R ≤ 0                 ("hidden_norm": the same on every rank)
               mean(net(x)) − m ≤ 0           ("mean_output": a mean over the global batch; each rank
                                               computes it on its shard and the optimizer averages)

``--optimizer alm`` (default): co.AugmentedLagrangian (Adam inside) on minibatches.
``--optimizer sqp``: co.ConstrainedSQP on the full data set (each rank's shard is one batch; the objective
is the mean over the ranks), for a linear model (W₁ is then its weight row; a convex problem that the SQP
certifies), stopped by ``ConstraintMonitor(stop_on_certificate=True)``.

At the end of training (a callback, while the process group is up) every rank certifies the final point on
its shard of the whole data set, and the ranks compare their parameters and certificates. Rank 0 prints the
certificate and exits with status 1 unless the parameters and certificates agree on both ranks, the point is
feasible (ALM: violation ≤ 2e-2 · R; SQP: a converged certificate) and the CSV log holds the callback's
metrics.

    python examples/lightning_ddp.py [--optimizer alm|sqp] [--quick]
"""
import argparse
import csv
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import constrained_optim as co

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:
    sys.exit("this example needs PyTorch Lightning: pip install lightning")

from constrained_optim.lightning import ConstraintMonitor

N, D, H = 512, 8, 16
RADIUS, MEAN_BOUND = 1.5, 0.1
ALM_TOL = 2e-2 * RADIUS


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.5 + 0.1 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    return x, y


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str, steps_per_epoch: int):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Linear(D, 1)] if optimizer == "sqp" else \
            [torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, 1)]
        self.net = torch.nn.Sequential(*layers).double()
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.batch_x = None
        self.constraints = [
            co.ineq(lambda: self.net[0].weight.norm() - RADIUS, name="hidden_norm"),
            # the batch of the current training_step (the optimizer averages it over the ranks)
            co.ineq(lambda: self.net(self.batch_x).mean() - MEAN_BOUND, name="mean_output", reduce="mean"),
        ]

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_x = x
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sqp":
            return co.ConstrainedSQP(self.parameters(), self.constraints)
        return co.AugmentedLagrangian(self.parameters(), self.constraints, lr=2e-2, penalty=10.0,
                                      update_every=self.steps_per_epoch)


class CompareRanks(pl.Callback):
    """At the end of training: certify on the rank's whole shard and compare parameters and certificates."""

    def __init__(self, shard: tuple[torch.Tensor, torch.Tensor]):
        self.shard, self.report = shard, {}

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        x, y = self.shard
        pl_module.batch_x = x
        if isinstance(opt, co.ConstrainedSQP):
            cert = opt.certificate
        else:
            cert = opt.certify(lambda: torch.nn.functional.mse_loss(pl_module.net(x), y))
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        summary = torch.cat([flat, torch.tensor([cert.objective, cert.ineq_violation, cert.eq_violation,
                                                 cert.stationarity], dtype=flat.dtype)])
        table = [torch.empty_like(summary) for _ in range(trainer.world_size)]
        dist.all_gather(table, summary)
        self.report = dict(cert=cert, agree=all(torch.equal(table[0], t) for t in table[1:]),
                           world_size=trainer.world_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("alm", "sqp"), default="alm")
    parser.add_argument("--quick", action="store_true", help="short run for CI")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is an invalid version.*")
    x, y = make_data()
    # every rank sees the data set whole and takes its half, as a DistributedSampler without shuffling would
    batch = N // 2 if args.optimizer == "sqp" else 32
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    log_dir = os.environ.get("CO_DDP_LOG_DIR") or tempfile.mkdtemp(prefix="constrained_optim_ddp_")
    os.environ["CO_DDP_LOG_DIR"] = log_dir            # the second process logs where the first one does
    steps_per_epoch = N // 2 // batch
    model = Regression(args.optimizer, steps_per_epoch)
    epochs = 5 if args.quick else 30
    limits = dict(max_steps=200, max_epochs=-1) if args.optimizer == "sqp" else dict(max_epochs=epochs)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    compare = CompareRanks((x[rank * N // 2:(rank + 1) * N // 2], y[rank * N // 2:(rank + 1) * N // 2]))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", precision="64-true",
                         logger=CSVLogger(log_dir, name=args.optimizer), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=True, **limits,
                         callbacks=[ConstraintMonitor(stop_on_certificate=args.optimizer == "sqp"), compare])
    trainer.fit(model, loader)
    if not trainer.is_global_zero:
        return 0
    report = compare.report
    cert = report["cert"]
    print(f"== {args.optimizer} under DDP on {report['world_size']} CPU processes, {trainer.global_step} steps ==")
    print(cert)
    checks = {"parameters and certificates identical on all ranks": report["agree"],
              "two processes": report["world_size"] == 2}
    if args.optimizer == "sqp":
        checks["certificate converged"] = cert.converged
    else:
        checks[f"feasible within {ALM_TOL:.0e}"] = max(cert.ineq_violation, cert.eq_violation) <= ALM_TOL
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = [name for name in ("constraints/violation/hidden_norm", "constraints/violation/mean_output",
                                "constraints/ineq_violation", "constraints/penalty")
              if any(row.get(name) not in (None, "") for row in rows)]
    checks["ConstraintMonitor metrics logged"] = len(logged) == 4
    for name, ok in checks.items():
        print(f"   {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
