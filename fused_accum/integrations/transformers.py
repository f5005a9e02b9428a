"""Hugging Face transformers: ``FusedAccumTrainer``, a drop-in for ``transformers.Trainer``, and
``FusedAccumMixin``, to put in front of any Trainer subclass (``class MyTrainer(FusedAccumMixin,
SFTTrainer)``).

Trainer keeps driving the windows (``gradient_accumulation_steps``, the short last window of an
epoch, its token-mean loss ``sum / num_items_in_batch``), the scheduler, logging and
checkpoints.  The mixin changes what runs underneath:

- the optimizer Trainer builds from ``TrainingArguments`` (its ``optim``, lr, betas, eps and
  weight-decay groups), or the one passed as ``optimizers=``, is stepped by fused_accum:
  ``adamw_torch``/``adamw_torch_fused``/``sgd`` by its kernels, any other torch optimizer after
  fp32 accumulation (:class:`~fused_accum.FusedAccumulator`); gradients accumulate in fp32
  whatever the model's dtype;
- ``args.max_grad_norm`` clips in the kernels, and the logged ``grad_norm`` is the real pre-clip
  norm (Trainer's own clipping would find no ``.grad`` and log 0.0);
- ``fp16=True`` (torch.amp.GradScaler, on GPUs) becomes fused_accum's dynamic loss scaling with
  GradScaler's settings; overflow windows are skipped in the kernels (the scheduler still steps);
- a fused optimizer that counts windows itself (``accumulation_steps > 1``) is refused: with
  Trainer accumulating too, every window would be counted twice.

Under DistributedDataParallel (torchrun), the optimizer finds the DDP wrapper Trainer makes,
switches its reduction off and reduces once per window; Trainer's loss, already normalised by
the window's global item count, then gives the exact global token mean.
"""
from __future__ import annotations

from typing import Any

import transformers

from .. import DynamicLossScale
from ._common import fused, unwrap


class FusedAccumMixin:
    """Mix in before a ``transformers.Trainer`` (sub)class; takes the same arguments.  The model's
    ``nn.Linear`` layers accumulate their weight gradients inside their GEMMs
    (docs/fused-linear.md); set the class attribute ``fuse_linear = False`` for the hook path."""

    fuse_linear = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fused_loss_scale = None
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:   # optimizers=(optimizer, scheduler): check it now
            self.optimizer = self._make_fused(self.optimizer)

    # -- building ----------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        scaler = self.accelerator.scaler
        if scaler is None:
            return
        # fp16=True: GradScaler would check .grad, which fused_accum empties; the optimizer
        # scales the loss itself, with GradScaler's rule and settings.
        self._fused_loss_scale = DynamicLossScale(
            init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
            backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval())
        self.accelerator.scaler = None
        plain_backward = self.accelerator.backward

        def backward(loss, **kwargs):
            optimizer = unwrap(self.optimizer) if self.optimizer is not None else None
            if optimizer is None or not hasattr(optimizer, "backward"):
                return plain_backward(loss, **kwargs)
            kwargs.pop("learning_rate", None)
            optimizer.backward(loss / self.accelerator.gradient_accumulation_steps, **kwargs)
        self.accelerator.backward = backward

    def create_optimizer(self, model: Any = None) -> Any:
        self.optimizer = self._make_fused(super().create_optimizer(model))
        return self.optimizer

    def _make_fused(self, optimizer: Any) -> Any:
        args = self.args
        wrapper_args = {}
        if self._fused_loss_scale is not None:
            wrapper_args["loss_scale"] = self._fused_loss_scale
        opt = fused(optimizer, accumulation_setting="TrainingArguments.gradient_accumulation_steps",
                    max_grad_norm=args.max_grad_norm if args.max_grad_norm else None,
                    clip_setting="TrainingArguments.max_grad_norm", **wrapper_args)
        if self._fused_loss_scale is not None and opt._scaler is None:
            raise ValueError("fused_accum: fp16=True needs loss scaling in the optimizer: build "
                             "it with loss_scale='dynamic' (GradScaler cannot see its gradients)")
        # Trainer marks each micro-batch before its forward pass (sync_gradients: the last one of
        # the window), which is when the optimizer asks.
        opt.final_micro_batch = lambda: self.accelerator.sync_gradients
        if self.fuse_linear and self.model is not None:
            opt.fuse_linear(self.model)
        return opt

    # -- clipping and the logged norm ---------------------------------------------------------

    def _clip_grad_norm(self, model: Any) -> Any:
        # Clipping happens inside optimizer.step(), right after this; the tensor returned is
        # filled in by that step, and Trainer reads it only when it logs, afterwards.
        return unwrap(self.optimizer).live_grad_norm()

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return unwrap(self.optimizer).live_grad_norm() if grad_norm is None else grad_norm


class FusedAccumTrainer(FusedAccumMixin, transformers.Trainer):
    """``transformers.Trainer`` with fused_accum's optimizer; the same arguments."""
