"""PyTorch Lightning integration: :class:`ConstraintMonitor` logs each constrained optimizer's certificate.

This module imports Lightning (``pip install lightning``); ``import constrained_optim`` does not. Any
constrained optimizer of this library can be returned from ``LightningModule.configure_optimizers``; the
callback reads its ``certificate`` after every training batch (or epoch) and logs, per optimizer,

    constraints/violation/<name>     max violation of each named constraint (``certificate.violations``)
    constraints/ineq_violation       max_i max(c_I,i, 0)
    constraints/eq_violation         max_j |c_E,j|
    constraints/stationarity         relative KKT residual (left out while it is not measured: NaN)
    constraints/penalty              the optimizer's penalty (μ of the SQP, ρ of the augmented Lagrangian)
    constraints/multiplier/<name>    the multiplier of each constraint: the value if it has one element,
                                     else its largest absolute value
    constraints/objective            the loss of the evaluated point (left out when unknown: NaN)

and, with ``stop_on_certificate=True``, stops training once the certificates have converged. With more
than one constrained optimizer the names carry the optimizer's index in ``trainer.optimizers``:
``constraints/1/violation/<name>``, ...

How Lightning drives these optimizers
-------------------------------------
What follows was read in the source of Lightning 2.6.6 (paths relative to ``lightning/pytorch``, line
numbers of that release) and, where it says *measured*, also run on CPU with torch 2.13 (most of those
runs are tests in ``tests/test_lightning.py``).

* **The closure is the whole training step.** In automatic optimization ``LightningModule.optimizer_step``
  calls ``optimizer.step(closure=optimizer_closure)`` (``core/module.py:1368``; the precision plugin passes
  it on, ``plugins/precision/precision.py:122-123``). Each call of that closure runs ``training_step``,
  then ``zero_grad`` (on the first batch of an accumulation window only), then ``backward``
  (``loops/optimization/automatic.py:129-142``), and returns a *detached* copy of the loss
  (``automatic.py:56-59, 145-147``). After every call the plugin also runs ``on_before_optimizer_step`` and
  gradient clipping (``precision.py:96-111``). So when :class:`~constrained_optim.ConstrainedSQP` evaluates
  trial points in its line search, Lightning re-runs ``training_step`` on the *same* batch, once per
  evaluation (measured: ``training_step`` calls == ``optimizer.nfev``). The SQP therefore needs a
  deterministic, full-batch ``training_step`` (a loader that yields the whole data set as one batch, no
  dropout, no data augmentation) and no ``gradient_clip_val`` (clipping would change the gradients it
  reads).
* **Gradient accumulation** (``accumulate_grad_batches=k > 1``). On the first k−1 batches of a window
  Lightning calls the closure itself, without the optimizer (``automatic.py:174-185``); on the k-th it
  calls ``optimizer.step(closure)``. Each closure divides the loss by k (``automatic.py:80-83, 329``) and
  only the window's first batch zeroes the grads (``automatic.py:220-222``), so the grads add up to the
  gradient of the mean of the k batch losses. The first-order optimizers (``AugmentedLagrangian``,
  ``Penalty``, ``ProjectedGradient``) do not zero the grads before calling the closure, so they step on
  that accumulated gradient, plus ``Jᵀw`` evaluated once at the step's point (measured, to rounding).
  ``ConstrainedSQP`` evaluates points itself and zeroes the grads before each evaluation, so it would see
  only the last batch, divided by k: it needs ``accumulate_grad_batches=1`` (the monitor refuses other
  values).
* **fp16 mixed precision** (``precision="16-mixed"``) uses a ``GradScaler`` (``plugins/precision/amp.py:53-54``):
  the plugin runs the closure itself (``amp.py:79``), unscales the grads (``amp.py:84-88``) and then calls
  ``scaler.step(optimizer)``, which calls ``optimizer.step()`` *without* a closure, or skips it when the
  grads hold inf/NaN (``amp.py:95``; ``torch/amp/grad_scaler.py:372``). The first-order optimizers work
  there: they step on the unscaled grads of that closure (measured: the same gradient as in float32, to
  fp16 accuracy); their per-step certificate then has no objective (NaN, not logged). ``ConstrainedSQP``
  cannot (it must evaluate its own trial points): ``ConstraintMonitor`` refuses the combination with a
  ``ValueError`` at ``on_fit_start``. Without the monitor, torch 2.13 makes ``scaler.step`` call
  ``ConstrainedSQP.step()``, which raises ``TypeError`` (missing ``closure``).
  On CPU, Lightning replaces ``"16-mixed"`` by ``"bf16-mixed"`` with a warning
  (``trainer/connectors/accelerator_connector.py:478-483``); the fp16/GradScaler path can still be forced
  there with ``plugins=[MixedPrecision("16-mixed", "cpu")]`` (measured: it runs, and skips the first steps
  while the scale calibrates).
* **bf16 mixed precision** (``precision="bf16-mixed"``) has no scaler and passes the closure on
  (``amp.py:74-76``), so every optimizer runs (measured on CPU, also with ``AugmentedLagrangian``
  reaching its bound to 1e-4). Under autocast the float32 layers compute in bfloat16 (about 3 significant
  digits): fine for the first-order optimizers, not for ``ConstrainedSQP``, whose line search then fails
  (measured on a 4-variable least-squares problem: ``STALLED_INFEASIBLE``, violation 6e-2). Autocast leaves
  float64 layers alone (measured: ``CONVERGED``, as without it). For a certificate give the SQP float64
  parameters (``precision="64-true"`` or a float64 module); in float32 it ends ``STALLED_FEASIBLE`` when
  float32 cannot resolve ``tol_opt`` (measured on the same problem).
* **Manual optimization.** ``LightningOptimizer.step()`` without a closure passes a closure that returns
  ``None`` (``core/optimizer.py:150-155``); the first-order optimizers then step on the gradients of the
  user's ``self.manual_backward``, as with ``step()``. Several optimizers need manual optimization
  (``core/optimizer.py:354-360``).

Convergence and ``stop_on_certificate``
---------------------------------------
``ConstrainedSQP`` certifies every step, so ``stop_on_certificate=True`` stops training on its own when the
KKT conditions hold. The first-order optimizers report ``IN_PROGRESS`` after every step (stationarity is
not measured per step) and converge only after ``opt.certify(closure)`` was called on a full, deterministic
closure. The monitor reads the certificates in ``on_train_batch_end``, which Lightning calls for callbacks
*before* the LightningModule's own hook (``loops/training_epoch_loop.py:375-376``), and the next step
replaces the certificate: certify right after the step, in ``optimizer_step`` (on the wrapper the hook
receives or on ``optimizer.optimizer``: both update the same certificate)::

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if (batch_idx + 1) % 100 == 0:
            optimizer.certify(self.full_batch_closure)   # loss on all the data; backward optional

With several constrained optimizers training stops when all of them have converged. Under a distributed
strategy the decision is reduced over processes (every process must agree).

Once a ``ConstrainedSQP`` has a terminal status (``CONVERGED``, ``STALLED_*``, ``INFEASIBLE``, ``UNBOUNDED``) its
``step`` still calls the closure once, as automatic optimization requires (``loops/optimization/automatic.py:194``
fails a step that does not), and changes nothing.

Cost: reading the certificate of a first-order optimizer copies a few scalars to the host (one device
synchronisation per logged batch on a GPU); ``logging_interval="epoch"`` reads it once per epoch.
"""
from __future__ import annotations

import math

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as _err:  # pragma: no cover - exercised only without lightning installed
    raise ImportError("constrained_optim.lightning needs PyTorch Lightning: pip install lightning "
                      "(or pip install 'constrained_optim[lightning]')") from _err

from ._wrapped import ConstrainedOptimizer
from .certificate import Certificate
from .sqp import ConstrainedSQP

__all__ = ["ConstraintMonitor"]

_INTERVALS = ("step", "epoch")
_CONSTRAINED = (ConstrainedSQP, ConstrainedOptimizer)
_PROG_BAR = ("ineq_violation", "eq_violation", "stationarity")


class ConstraintMonitor(Callback):
    """Log the certificate of every constrained optimizer during ``Trainer.fit``; optionally stop training
    when the certificates have converged.

    Args:
        stop_on_certificate: set ``trainer.should_stop`` after a training batch at whose end every
            constrained optimizer's ``certificate.converged`` holds (False). The first-order optimizers
            converge only through ``certify(closure)``: see the module docstring.
        logging_interval: ``"step"`` (log after every training batch, ``on_step=True``) or ``"epoch"``
            (log at the end of every training epoch, ``on_epoch=True``). The stopping test runs after every
            batch either way.
        prog_bar: also show ``ineq_violation``, ``eq_violation`` and ``stationarity`` in the progress bar
            (False); the per-constraint metrics go to the loggers only.
        sync_dist: forwarded to ``LightningModule.log``. Default ``None``: True for epoch-level logging in a
            multi-process run (Lightning asks for it there), False otherwise. The optimizers reduce what they
            report over the ranks (:mod:`constrained_optim.distributed`), so every rank logs the same values
            and the reduction does not change them.

    Raises (at ``on_fit_start``) ``ValueError`` for a ``ConstrainedSQP`` trained with
    ``accumulate_grad_batches > 1``, with a GradScaler (fp16 mixed precision) or with gradient clipping,
    none of which lets it evaluate its own trial points correctly.
    """

    def __init__(self, stop_on_certificate: bool = False, logging_interval: str = "step", prog_bar: bool = False,
                 sync_dist: bool | None = None) -> None:
        super().__init__()
        for name, value in (("stop_on_certificate", stop_on_certificate), ("prog_bar", prog_bar)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if sync_dist is not None and not isinstance(sync_dist, bool):
            raise ValueError(f"sync_dist must be None, True or False, got {sync_dist!r}")
        if logging_interval not in _INTERVALS:
            raise ValueError(f"logging_interval must be 'step' or 'epoch', got {logging_interval!r}")
        self.stop_on_certificate = stop_on_certificate
        self.logging_interval = logging_interval
        self.prog_bar = prog_bar
        self.sync_dist = sync_dist

    # ----------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, opt in _constrained_optimizers(trainer):
            if isinstance(opt, ConstrainedSQP):
                _check_sqp_setup(trainer, index)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.logging_interval == "step":
            self._log(trainer, pl_module, on_step=True)
        optimizers = _constrained_optimizers(trainer)
        # the reduction is collective: every process makes the same call, so that none waits
        if self.stop_on_certificate:
            converged = bool(optimizers) and all(opt.certificate.converged for _, opt in optimizers)
            if trainer.strategy.reduce_boolean_decision(converged, all=True):
                trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            self._log(trainer, pl_module, on_step=False)

    # ------------------------------------------------------------------------------------------ logging
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        optimizers = _constrained_optimizers(trainer)
        sync = self.sync_dist if self.sync_dist is not None else (trainer.world_size > 1 and not on_step)
        for index, opt in optimizers:
            prefix = f"constraints/{index}/" if len(optimizers) > 1 else "constraints/"
            for name, value in _certificate_metrics(opt.certificate).items():
                pl_module.log(prefix + name, value, on_step=on_step, on_epoch=not on_step,
                              prog_bar=self.prog_bar and name in _PROG_BAR, sync_dist=sync,
                              batch_size=1)


def _constrained_optimizers(trainer: pl.Trainer) -> list[tuple[int, torch.optim.Optimizer]]:
    """``(index in trainer.optimizers, optimizer)`` of this library's optimizers."""
    return [(i, opt) for i, opt in enumerate(trainer.optimizers) if isinstance(opt, _CONSTRAINED)]


def _certificate_metrics(cert: Certificate) -> dict[str, float]:
    """The metrics of one certificate, without the ``constraints/`` prefix; empty before the optimizer has
    evaluated a point (its certificate has no named violations yet)."""
    if not cert.violations:
        return {}
    metrics = {f"violation/{name}": float(v) for name, v in cert.violations.items()}
    metrics["ineq_violation"] = float(cert.ineq_violation)
    metrics["eq_violation"] = float(cert.eq_violation)
    if math.isfinite(cert.stationarity):
        metrics["stationarity"] = float(cert.stationarity)
    metrics["penalty"] = float(cert.penalty)
    for name, lam in cert.multipliers.items():
        lam = lam.detach()
        if lam.numel() == 0:
            continue
        value = float(lam.reshape(())) if lam.numel() == 1 else float(lam.abs().max())
        if not math.isnan(value):       # NaN: the multiplier fit did not run
            metrics[f"multiplier/{name}"] = value
    if not math.isnan(cert.objective):
        metrics["objective"] = float(cert.objective)
    return metrics


def _check_sqp_setup(trainer: pl.Trainer, index: int) -> None:
    """ConstrainedSQP evaluates its own trial points through the closure: refuse the settings that break
    that (see the module docstring)."""
    where = f"trainer.optimizers[{index}] is a ConstrainedSQP"
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"{where}, which evaluates each trial point on one full batch, but "
                         f"accumulate_grad_batches={trainer.accumulate_grad_batches}; use accumulate_grad_batches=1 "
                         "and a loader that yields the whole data set as one batch")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(f"{where}, which needs step(closure), but the precision plugin uses a GradScaler "
                         "(fp16 mixed precision), which calls step() without a closure; use precision='64-true' "
                         "(or '32-true'), with float64 parameters for a certificate")
    if trainer.gradient_clip_val:
        raise ValueError(f"{where}, whose gradients must be exact, but gradient_clip_val="
                         f"{trainer.gradient_clip_val!r} clips them after every closure call; remove gradient_clip_val")
