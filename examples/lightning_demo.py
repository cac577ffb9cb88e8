"""Constrained training with PyTorch Lightning and ``ConstraintMonitor``.

1. Train a small MLP regressor y ≈ net(x) on synthetic data with minibatches, under a bound on the norm of
   its hidden layer, with ``co.AugmentedLagrangian`` (Adam inside) returned from ``configure_optimizers``:

       minimize   mean((net(x) − y)²)   subject to   ‖W₁‖_F − R ≤ 0        ("hidden_norm", active)

2. Refit the output layer on the frozen features φ(x) = tanh(W₁x + b₁) of the trained network, full batch,
   with ``co.ConstrainedSQP`` until its KKT certificate holds; ``ConstraintMonitor(stop_on_certificate=True)``
   stops the Trainer there:

       minimize   mean((wᵀφ(x) + b − y)²)   subject to   ‖w‖₂ − r ≤ 0          ("head_norm", active)
                                                         mean(wᵀφ(x) + b − y) = 0   ("mean_residual")

   (with a free bias b the optimum has a zero mean residual anyway, so the equality's multiplier is ≈ 0;
   it is there to show how an equality constraint is logged).

Both runs log the constraint metrics to a CSVLogger in a temporary directory. The script prints the final
certificates and the CSV paths, and exits with status 1 unless the ALM run ends feasible (violation
≤ 1e-2 · R), the SQP run stopped early with a converged certificate, and the CSVs hold the metrics.

    python examples/lightning_demo.py            # full: 60 epochs of ALM
    python examples/lightning_demo.py --quick    # CI: 12 epochs
"""
import argparse
import csv
import math
import os
import sys
import tempfile
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import constrained_optim as co

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:
    sys.exit("this example needs PyTorch Lightning: pip install lightning")

from constrained_optim.lightning import ConstraintMonitor

N, D, H = 512, 8, 32
BATCH = 64
RADIUS = 2.0                 # ‖W₁‖_F ≤ RADIUS; the unconstrained fit goes well beyond it
# stated feasibility tolerance of the ALM run: Adam on minibatches ends near the bound, not on it (measured
# over 5 seeds of data order and initialisation: |‖W₁‖_F − R| ≤ 1.3e-2 after 12 and after 60 epochs);
# a certified answer is part 2's job
ALM_TOL = 1e-2 * RADIUS
SQP_MAX_STEPS = 300


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(N, 1, generator=g)
    return x, y


class NormBoundedMLP(pl.LightningModule):
    """MLP regression, trained by the augmented Lagrangian under ‖W₁‖_F ≤ radius."""

    def __init__(self, radius: float, lr: float, steps_per_epoch: int, total_steps: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, 1))
        self.radius, self.lr = radius, lr
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        # the module owns its constraints; the optimizer evaluates them after each backward
        self.constraints = [co.ineq(lambda: self.net[0].weight.norm() - self.radius, name="hidden_norm")]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        # multipliers updated once per epoch (from the epoch's mean constraint value); ρ = 10 keeps the
        # iterates close to the bound while the multiplier settles
        opt = co.AugmentedLagrangian(self.parameters(), self.constraints, lr=self.lr, penalty=10.0,
                                     update_every=self.steps_per_epoch)
        # schedulers set the learning rate of the inner Adam through the shared parameter groups
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HeadRefit(pl.LightningModule):
    """Least-squares refit of the output layer on fixed features, by ConstrainedSQP (full batch, float64)."""

    def __init__(self, features: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear, radius: float):
        super().__init__()
        self.head = torch.nn.Linear(head.in_features, 1).double()
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            self.head.bias.copy_(head.bias)
        # the full batch, kept by the module for the data-dependent constraint
        self.register_buffer("features", features.double())
        self.register_buffer("y", y.double())
        self.radius = radius
        self.constraints = [
            co.ineq(lambda: self.head.weight.norm() - self.radius, name="head_norm"),
            co.eq(lambda: (self.head(self.features) - self.y).mean(), name="mean_residual"),
        ]

    def training_step(self, batch, batch_idx):
        # the SQP's line search calls this again for every trial point, on the same (full) batch
        features, y = batch
        return torch.nn.functional.mse_loss(self.head(features), y)

    def configure_optimizers(self):
        return co.ConstrainedSQP(self.parameters(), self.constraints)


def trainer(log_dir: str, name: str, quick: bool, **options) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(log_dir, name=name), log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=not quick, enable_model_summary=not quick,
                      **options)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_columns(path: str, expected: list[str]) -> list[str]:
    """Names in ``expected`` that have no value in any row of the CSV."""
    rows = read_csv(path)
    return [name for name in expected if not any(row.get(name) not in (None, "") for row in rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI (a few seconds of training)")
    args = parser.parse_args()
    epochs = 12 if args.quick else 60
    torch.set_num_threads(1)   # tiny tensors: threads only add synchronisation
    if args.quick:
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
    ok = True
    x, y = make_data()
    log_dir = tempfile.mkdtemp(prefix="constrained_optim_lightning_")

    # ---------------------------------------------------------------- 1. ALM, minibatches, Adam inside
    print(f"== 1. MLP regression, ‖W₁‖_F ≤ {RADIUS}, AugmentedLagrangian, {epochs} epochs ==")
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    steps_per_epoch = len(loader)
    model = NormBoundedMLP(RADIUS, lr=5e-2, steps_per_epoch=steps_per_epoch, total_steps=epochs * steps_per_epoch)
    alm_trainer = trainer(log_dir, "alm", args.quick, max_epochs=epochs, callbacks=[ConstraintMonitor()])
    alm_trainer.fit(model, loader)
    alm = alm_trainer.optimizers[0]

    def full_batch_closure():
        return torch.nn.functional.mse_loss(model(x), y)      # certify runs the backward itself

    cert = alm.certify(full_batch_closure)                    # full KKT certificate at the final weights
    print(cert)
    print(f"   multipliers: { {k: v.tolist() for k, v in cert.multipliers.items()} }")
    violation = cert.violations["hidden_norm"]
    norm = float(model.net[0].weight.detach().norm())
    print(f"   ‖W₁‖_F = {norm:.6f} (bound {RADIUS}), violation {violation:.2e} (tolerance {ALM_TOL:.0e})")
    if not violation <= ALM_TOL:
        print(f"FAIL: the ALM run ended infeasible: violation {violation:.3e} > {ALM_TOL:.0e}")
        ok = False
    if not norm >= 0.95 * RADIUS:
        print(f"FAIL: the norm bound is not active (‖W₁‖_F = {norm:.4f}); the example no longer shows it")
        ok = False
    alm_csv = os.path.join(alm_trainer.logger.log_dir, "metrics.csv")
    missing = check_columns(alm_csv, ["train/loss", "constraints/violation/hidden_norm", "constraints/ineq_violation",
                                      "constraints/eq_violation", "constraints/penalty",
                                      "constraints/multiplier/hidden_norm", "constraints/objective"])
    print(f"   metrics: {alm_csv}")
    if missing:
        print(f"FAIL: metrics missing from {alm_csv}: {missing}")
        ok = False

    # ---------------------------------------------------------------- 2. SQP, full batch, certified
    with torch.no_grad():
        features = model.net[1](model.net[0](x))
    head_radius = 0.5 * float(model.net[2].weight.detach().norm())   # below the least-squares norm: active
    print(f"\n== 2. output layer refit, ‖w‖₂ ≤ {head_radius:.4f}, mean residual = 0, ConstrainedSQP, full batch ==")
    refit = HeadRefit(features, y, model.net[2], head_radius)
    full_batch = DataLoader(TensorDataset(features.double(), y.double()), batch_size=N)   # one batch: all data
    sqp_trainer = trainer(log_dir, "sqp", args.quick, max_steps=SQP_MAX_STEPS, max_epochs=-1,
                          callbacks=[ConstraintMonitor(stop_on_certificate=True)])
    sqp_trainer.fit(refit, full_batch)
    sqp = sqp_trainer.optimizers[0]
    print(sqp.certificate)
    print(f"   multipliers: { {k: v.tolist() for k, v in sqp.certificate.multipliers.items()} }")
    print(f"   stopped after {sqp_trainer.global_step} of at most {SQP_MAX_STEPS} steps, "
          f"{sqp.nfev} training_step calls")
    if not sqp.certificate.converged:
        print(f"FAIL: the SQP certificate did not converge ({sqp.certificate.status.name})")
        ok = False
    if not sqp_trainer.global_step < SQP_MAX_STEPS:
        print("FAIL: ConstraintMonitor(stop_on_certificate=True) did not stop the SQP run")
        ok = False
    sqp_csv = os.path.join(sqp_trainer.logger.log_dir, "metrics.csv")
    missing = check_columns(sqp_csv, ["constraints/violation/head_norm", "constraints/violation/mean_residual",
                                      "constraints/ineq_violation", "constraints/eq_violation",
                                      "constraints/stationarity", "constraints/penalty",
                                      "constraints/multiplier/head_norm", "constraints/multiplier/mean_residual",
                                      "constraints/objective"])
    print(f"   metrics: {sqp_csv}")
    if missing:
        print(f"FAIL: metrics missing from {sqp_csv}: {missing}")
        ok = False
    last = read_csv(sqp_csv)[-1]
    stationarity = float(last.get("constraints/stationarity") or math.nan)
    print(f"   last logged stationarity {stationarity:.2e}")

    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
