"""ConstraintMonitor and the constrained optimizers under PyTorch Lightning's Trainer (CPU)."""
import csv
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

import constrained_optim as co
from constrained_optim.certificate import Certificate, Status
from constrained_optim.lightning import ConstraintMonitor, _certificate_metrics

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

F64 = torch.float64
W_TRUE = torch.tensor([[1.0, 2.0, 0.0, 1.0]], dtype=F64)      # ‖w*‖ > 1: the unit-norm bound is active


def _data(n=128, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = x @ W_TRUE.T + 0.3 + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


def _loader(batch_size=128, n=128, dtype=F64):
    return DataLoader(TensorDataset(*_data(n, dtype)), batch_size=batch_size, shuffle=False)


def _trainer(**options):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(options)
    return pl.Trainer(**defaults)


def _violations(module):
    """(max(‖w‖ − 1, 0), |b|) at the module's current parameters, computed here, not by the optimizer."""
    with torch.no_grad():
        return max(float(module.lin.weight.norm()) - 1.0, 0.0), abs(float(module.lin.bias.sum()))


class Regression(pl.LightningModule):
    """Least squares with ‖w‖ <= 1 ("unit_norm", active) and b = 0 ("zero_bias")."""

    def __init__(self, make_optimizer, dtype=F64):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1).to(dtype)
        self.constraints = [co.ineq(lambda: self.lin.weight.norm() - 1.0, name="unit_norm"),
                            co.eq(lambda: self.lin.bias.sum(), name="zero_bias")]
        self.make_optimizer = make_optimizer
        self.calls = []            # (global_step, first input row) of every training_step call

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls.append((self.trainer.global_step, x[0].clone()))
        return F.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self)


def _alm_sgd(module):
    # full batch, SGD inside: reaches the bound to 1e-9 in 60 steps (Adam at a fixed lr oscillates)
    return co.AugmentedLagrangian(module.parameters(), module.constraints, optimizer=torch.optim.SGD, lr=0.1,
                                  penalty=10.0, update_every=5)


def _sqp(module):
    return co.ConstrainedSQP(module.parameters(), module.constraints)


def _csv_rows(logger):
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


ALM_METRICS = ["constraints/violation/unit_norm", "constraints/violation/zero_bias", "constraints/ineq_violation",
               "constraints/eq_violation", "constraints/penalty", "constraints/multiplier/unit_norm",
               "constraints/multiplier/zero_bias", "constraints/objective"]


# ------------------------------------------------------------------------------------------ (a) ALM, feasibility
def test_alm_reaches_feasible_point_and_logs_metrics(tmp_path):
    module = Regression(_alm_sgd)
    logger = CSVLogger(tmp_path, name="alm")
    trainer = _trainer(max_steps=60, logger=logger, log_every_n_steps=1, callbacks=[ConstraintMonitor()])
    trainer.fit(module, _loader())
    ineq, eq = _violations(module)
    assert ineq <= 1e-6 and eq <= 1e-6
    assert float(module.lin.weight.detach().norm()) > 1.0 - 1e-6          # the bound is active

    rows = _csv_rows(logger)
    columns = set(rows[0])
    assert set(ALM_METRICS) <= columns
    # the per-step certificate does not measure stationarity (NaN): not logged
    assert "constraints/stationarity" not in columns
    logged = [row for row in rows if row["constraints/ineq_violation"] != ""]
    assert len(logged) == 60                                              # one row per training batch
    cert = trainer.optimizers[0].certificate
    last = logged[-1]
    assert float(last["constraints/ineq_violation"]) == pytest.approx(cert.ineq_violation, rel=1e-6, abs=1e-12)
    assert float(last["constraints/violation/unit_norm"]) == pytest.approx(cert.violations["unit_norm"],
                                                                           rel=1e-6, abs=1e-12)
    assert float(last["constraints/multiplier/unit_norm"]) == pytest.approx(float(cert.multipliers["unit_norm"]),
                                                                            rel=1e-6)
    assert float(last["constraints/penalty"]) == pytest.approx(10.0)
    assert float(last["constraints/objective"]) == pytest.approx(cert.objective, rel=1e-6)
    assert float(last["constraints/multiplier/unit_norm"]) > 0          # active constraint, positive multiplier
    assert set(ALM_METRICS) <= set(trainer.logged_metrics)


def test_epoch_interval_and_prog_bar():
    module = Regression(_alm_sgd)
    trainer = _trainer(max_epochs=3, callbacks=[ConstraintMonitor(logging_interval="epoch", prog_bar=True)])
    trainer.fit(module, _loader(batch_size=32))                          # 4 batches per epoch
    assert set(ALM_METRICS) <= set(trainer.logged_metrics)
    assert trainer.optimizers[0].certificate.iteration == 12
    bar = set(trainer.progress_bar_metrics)
    assert {"constraints/ineq_violation", "constraints/eq_violation"} <= bar
    assert "constraints/violation/unit_norm" not in bar                  # per-constraint metrics: loggers only


# ------------------------------------------------------------------------------ (b) SQP stops on its certificate
def test_sqp_full_batch_stops_with_converged_certificate(tmp_path):
    module = Regression(_sqp)
    logger = CSVLogger(tmp_path, name="sqp")
    trainer = _trainer(max_steps=200, max_epochs=-1, logger=logger, log_every_n_steps=1,
                       callbacks=[ConstraintMonitor(stop_on_certificate=True)])
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert opt.certificate.converged
    assert trainer.global_step < 200
    ineq, eq = _violations(module)
    assert ineq <= 1e-8 and eq <= 1e-8
    # every closure call re-ran training_step: one call per evaluation of the SQP
    assert len(module.calls) == opt.nfev
    assert opt.nfev > trainer.global_step                               # the line search evaluated trial points
    rows = [row for row in _csv_rows(logger) if row.get("constraints/stationarity")]
    assert float(rows[-1]["constraints/stationarity"]) <= opt.certificate.tol_opt


def test_terminal_sqp_keeps_training_without_stop_on_certificate():
    # after a terminal status ConstrainedSQP.step still calls the closure (and changes nothing), which
    # automatic optimization requires: training runs to max_steps, parameters fixed at the certified point
    module = Regression(_sqp)
    trainer = _trainer(max_steps=40, max_epochs=-1, callbacks=[ConstraintMonitor()])
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert opt.certificate.converged and trainer.global_step == 40
    assert len(module.calls) > opt.nfev          # the extra closure calls after convergence


def test_lightning_requires_step_to_call_the_closure():
    """The Lightning fact behind the test above: in automatic optimization a step() that does not call the
    closure fails the training loop (loops/optimization/closure.py: 'The closure hasn't been executed')."""
    class Lazy(torch.optim.SGD):
        def step(self, closure=None):
            return None

    trainer = _trainer(max_steps=3)
    with pytest.raises(Exception, match="closure hasn't been executed"):
        trainer.fit(Regression(lambda module: Lazy(module.parameters(), lr=0.1)), _loader())


def test_sqp_line_search_reruns_training_step_on_the_same_batch():
    module = Regression(_sqp)
    trainer = _trainer(max_steps=6, callbacks=[ConstraintMonitor()])
    trainer.fit(module, _loader(batch_size=32))                          # 4 different batches
    by_step = {}
    for step, first_row in module.calls:
        by_step.setdefault(step, []).append(first_row)
    assert any(len(rows) > 1 for rows in by_step.values())
    for rows in by_step.values():
        assert all(torch.equal(r, rows[0]) for r in rows)
    firsts = [rows[0] for rows in by_step.values()]
    assert not torch.equal(firsts[0], firsts[1])                         # the steps did see different batches


@pytest.mark.parametrize("stop", [True, False])
def test_first_order_optimizer_stops_after_certify_in_optimizer_step(stop):
    """The documented recipe: certify right after the step, on the optimizer itself."""
    x_all, y_all = _data()

    class Certified(Regression):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            optimizer.optimizer.certify(lambda: F.mse_loss(self.lin(x_all), y_all))

    def alm_lbfgs(module):
        def lbfgs(groups):
            return torch.optim.LBFGS(groups, lr=1.0, max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-15,
                                     line_search_fn="strong_wolfe")
        return co.AugmentedLagrangian(module.parameters(), module.constraints, optimizer=lbfgs, update_every=1,
                                      penalty_growth=10.0)

    module = Certified(alm_lbfgs)
    trainer = _trainer(max_steps=30, max_epochs=-1, callbacks=[ConstraintMonitor(stop_on_certificate=stop)])
    trainer.fit(module, _loader())
    assert trainer.optimizers[0].certificate.converged
    assert trainer.global_step < 30 if stop else trainer.global_step == 30


def _converged_sqp(converge=True):
    x = torch.tensor([2.0, 0.5], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1.0, name="sum")])

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    for _ in range(50 if converge else 1):
        opt.step(closure)
    assert opt.certificate.converged == converge
    return opt


def test_stop_needs_every_constrained_optimizer_converged():
    done, running = _converged_sqp(True), _converged_sqp(False)
    monitor = ConstraintMonitor(stop_on_certificate=True, logging_interval="epoch")
    for optimizers, expected in (([done, running], False), ([done, torch.optim.SGD([torch.zeros(1)], lr=1)], True),
                                 ([done, done], True), ([torch.optim.SGD([torch.zeros(1)], lr=1)], False)):
        trainer = types.SimpleNamespace(optimizers=optimizers, should_stop=False,
                                        strategy=types.SimpleNamespace(reduce_boolean_decision=lambda d, all: d))
        monitor.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.should_stop is expected


# ----------------------------------------------------------------------------------- (c) gradient accumulation
class RecordingSGD(torch.optim.SGD):
    """SGD that records, at every step, the parameters and the gradient it is about to use."""

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self.records = []

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.records.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))
        return super().step(closure)


def _merit_gradient(params, batches, scale=1.0):
    """Σ_b ∇(mse_b · scale) + Jᵀw with w = (ρc)₊ / ρc (λ = 0, ρ = 1), at ``params`` = (weight, bias)."""
    weight, bias = (p.detach().clone().requires_grad_(True) for p in params)
    loss = sum(F.mse_loss(x @ weight.T + bias, y) * scale for x, y in batches)
    c_ineq, c_eq = weight.norm() - 1.0, bias.sum()
    merit = loss + 0.5 * c_ineq.clamp(min=0) ** 2 + 0.5 * c_eq ** 2  # ∇: ∇f + (c_I)₊∇c_I + c_E∇c_E
    return torch.autograd.grad(merit, [weight, bias])


def test_gradient_accumulation_steps_on_the_sum_of_the_batches_gradients():
    k = 3
    recorder = []

    def alm(module):
        def inner(groups):
            recorder.append(RecordingSGD(groups, lr=0.05))
            return recorder[-1]
        return co.AugmentedLagrangian(module.parameters(), module.constraints, optimizer=inner)

    module = Regression(alm)
    trainer = _trainer(max_steps=2, accumulate_grad_batches=k, callbacks=[ConstraintMonitor()])
    x, y = _data(96)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False))   # 6 batches, 2 steps
    records = recorder[0].records
    assert len(records) == 2
    for step, (params, grads) in enumerate(records):
        window = [(x[16 * b:16 * b + 16], y[16 * b:16 * b + 16]) for b in range(k * step, k * step + k)]
        # Lightning divides each closure's loss by k; the optimizer adds Jᵀw once, at the step's point
        expected = _merit_gradient(params, window, scale=1.0 / k)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
        last_only = _merit_gradient(params, window[-1:], scale=1.0 / k)
        assert not torch.allclose(grads[0], last_only[0])


def test_sqp_refuses_gradient_accumulation():
    trainer = _trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[ConstraintMonitor()])
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer.fit(Regression(_sqp), _loader(batch_size=32))


def test_sqp_refuses_gradient_clipping():
    trainer = _trainer(max_steps=2, gradient_clip_val=1.0, callbacks=[ConstraintMonitor()])
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.fit(Regression(_sqp), _loader())


# ---------------------------------------------------------------- (d) SQP without a closure: fp16 AMP / direct call
def test_sqp_step_without_closure_says_what_to_do():
    module = Regression(_sqp)
    opt = _sqp(module)
    with pytest.raises(ValueError, match=r"needs a closure that computes the loss and calls backward"):
        opt.step(None)


def test_16_mixed_on_cpu_becomes_bf16():
    with pytest.warns(UserWarning, match="bf16-mixed"):
        trainer = _trainer(precision="16-mixed")
    assert isinstance(trainer.precision_plugin, MixedPrecision)
    assert trainer.precision_plugin.precision == "bf16-mixed" and trainer.precision_plugin.scaler is None


def test_sqp_with_fp16_grad_scaler_is_refused_with_advice():
    # on CPU, Lightning turns precision="16-mixed" into bf16; the GradScaler path needs the plugin itself
    trainer = _trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[ConstraintMonitor()])
    assert trainer.precision_plugin.scaler is not None
    module = Regression(_sqp, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"GradScaler.*precision=.64-true."):
        trainer.fit(module, _loader(dtype=torch.float32))
    assert module.calls == []                                            # refused before any training step


def test_alm_with_fp16_grad_scaler_steps_on_unscaled_gradients():
    recorder = []

    def alm(module):
        def inner(groups):
            recorder.append(RecordingSGD(groups, lr=0.05))
            return recorder[-1]
        return co.AugmentedLagrangian(module.parameters(), module.constraints, optimizer=inner)

    module = Regression(alm, dtype=torch.float32)
    trainer = _trainer(max_steps=10, plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[ConstraintMonitor()])
    x, y = _data(dtype=torch.float32)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=128))
    records = recorder[0].records
    assert 0 < len(records) <= 10                                        # the scaler may skip the first steps
    assert math.isnan(trainer.optimizers[0].certificate.objective)       # step() ran without a closure
    for params, grads in records:
        expected = _merit_gradient([p.double() for p in params], [(x.double(), y.double())])
        for g, e in zip(grads, expected):
            # fp16 forward: agreement to fp16 accuracy, and certainly not the 2^16-scaled gradient
            assert float((g.double() - e).norm()) <= 1e-2 * float(e.norm())


# ----------------------------------------------------------------------------------------- (e) bf16 mixed precision
def test_bf16_mixed_with_alm():
    module = Regression(_alm_sgd, dtype=torch.float32)
    trainer = _trainer(max_steps=60, precision="bf16-mixed", callbacks=[ConstraintMonitor()])
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.scaler is None
    trainer.fit(module, _loader(dtype=torch.float32))
    opt = trainer.optimizers[0]
    assert opt.certificate.iteration == 60
    assert math.isfinite(opt.certificate.objective)                      # the closure was passed to step
    ineq, eq = _violations(module)
    assert ineq <= 1e-4 and eq <= 1e-4
    assert set(ALM_METRICS) <= set(trainer.logged_metrics)


# ------------------------------------------------------------------------------------ (f) several optimizers
class TwoLayers(pl.LightningModule):
    """Manual optimization with two optimizers, one per layer; ``kinds`` says which are constrained."""

    def __init__(self, kinds):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 1).double()
        self.b = torch.nn.Linear(4, 1).double()
        self.kinds = kinds

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt, layer in zip(self.optimizers(), (self.a, self.b)):
            def closure(opt=opt, layer=layer):
                opt.zero_grad()
                loss = F.mse_loss(layer(x), y)
                self.manual_backward(loss)
                return loss
            opt.step(closure=closure)

    def configure_optimizers(self):
        optimizers = []
        for kind, layer, name in zip(self.kinds, (self.a, self.b), ("a_norm", "b_norm")):
            if kind == "alm":
                constraint = co.ineq(lambda layer=layer: layer.weight.norm() - 1.0, name=name)
                optimizers.append(co.AugmentedLagrangian(layer.parameters(), [constraint], lr=0.05))
            else:
                optimizers.append(torch.optim.Adam(layer.parameters(), lr=0.05))
        return optimizers


def test_two_constrained_optimizers_get_indexed_names():
    trainer = _trainer(max_steps=6, callbacks=[ConstraintMonitor()])
    trainer.fit(TwoLayers(("alm", "alm")), _loader(batch_size=32))
    logged = set(trainer.logged_metrics)
    for i, name in ((0, "a_norm"), (1, "b_norm")):
        assert {f"constraints/{i}/violation/{name}", f"constraints/{i}/ineq_violation",
                f"constraints/{i}/multiplier/{name}", f"constraints/{i}/objective"} <= logged
    assert not any(key.startswith("constraints/violation") for key in logged)


def test_one_constrained_optimizer_among_others_is_not_indexed():
    trainer = _trainer(max_steps=6, callbacks=[ConstraintMonitor()])
    trainer.fit(TwoLayers(("adam", "alm")), _loader(batch_size=32))
    logged = set(trainer.logged_metrics)
    assert {"constraints/violation/b_norm", "constraints/ineq_violation"} <= logged
    assert not any(key.startswith("constraints/1/") or key.startswith("constraints/0/") for key in logged)


# ---------------------------------------------------------------------------------------------- metrics of one certificate
def test_certificate_metrics():
    cert = Certificate(stationarity=float("nan"), ineq_violation=0.5, eq_violation=0.0, objective=float("nan"),
                       penalty=3.0, multipliers={"one": torch.tensor([-2.0]), "many": torch.tensor([1.0, -4.0, 2.0]),
                                                 "unfitted": torch.tensor([float("nan")])},
                       violations={"one": 0.5, "many": 0.0, "unfitted": 0.0}, status=Status.IN_PROGRESS)
    assert _certificate_metrics(cert) == {
        "violation/one": 0.5, "violation/many": 0.0, "violation/unfitted": 0.0, "ineq_violation": 0.5,
        "eq_violation": 0.0, "penalty": 3.0, "multiplier/one": -2.0, "multiplier/many": 4.0}
    cert.stationarity, cert.objective = 1e-3, 7.0
    metrics = _certificate_metrics(cert)
    assert metrics["stationarity"] == 1e-3 and metrics["objective"] == 7.0
    cert.stationarity = float("inf")
    assert "stationarity" not in _certificate_metrics(cert)
    assert _certificate_metrics(Certificate()) == {}                     # nothing evaluated yet: nothing logged


# ---------------------------------------------------------------------------------------------- (g) arguments
@pytest.mark.parametrize("kwargs, name", [
    (dict(stop_on_certificate="yes"), "stop_on_certificate"),
    (dict(logging_interval="batch"), "logging_interval"),
    (dict(logging_interval=None), "logging_interval"),
    (dict(prog_bar=1), "prog_bar"),
    (dict(sync_dist="yes"), "sync_dist"),
])
def test_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConstraintMonitor(**kwargs)


def test_defaults():
    monitor = ConstraintMonitor()
    assert (monitor.stop_on_certificate, monitor.logging_interval, monitor.prog_bar, monitor.sync_dist) == \
        (False, "step", False, None)


# ---------------------------------------------------------------------------------------------- (h) lazy import
def test_import_constrained_optim_does_not_import_lightning():
    code = ("import sys, constrained_optim; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'lightning_fabric')); print(bad); assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_certify_through_lightnings_optimizer_wrapper_reaches_the_optimizer():
    """LightningOptimizer copies the optimizer's __dict__; certify() called on the wrapper must update the
    certificate the optimizer (and the monitor) sees."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = co.AugmentedLagrangian([x], [co.ineq(lambda: x.sum() - 2.0)])
    wrapper = LightningOptimizer(opt)

    def closure():
        opt.zero_grad()
        loss = ((x - 2) ** 2).sum()
        loss.backward()
        return loss
    assert wrapper.certify(closure).converged
    assert opt.certificate.converged and opt.certificate is wrapper.certificate
