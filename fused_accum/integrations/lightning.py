"""Lightning: the ``FusedAccumulation`` callback.

``Trainer(accumulate_grad_batches=k, gradient_clip_val=c, callbacks=[FusedAccumulation()])``
keeps Lightning's own windows (it divides each loss by k and steps at every k-th batch and at
the epoch's last), its schedulers and checkpoints, and changes what runs underneath:

- each optimizer ``configure_optimizers`` returns is stepped by fused_accum: a torch optimizer is
  wrapped in :class:`~fused_accum.FusedAccumulator` (``SGD``/``Adam``/``AdamW`` by the kernels,
  any other by its own step after fp32 accumulation; the schedulers attached to it keep driving
  it), a fused one is used as it is; gradients accumulate in fp32 whatever the model's dtype;
- ``gradient_clip_val`` clips in the kernels (Lightning's clipping would find no ``.grad``), and
  the real pre-clip norm is logged as ``grad_norm`` at every window's end;
- ``precision="16-mixed"`` (torch.amp.GradScaler) becomes fused_accum's dynamic loss scaling with
  the scaler's settings, under the same fp16 autocast; the backward pass then goes through the
  optimizer (an overridden ``LightningModule.backward`` is not called);
- a fused optimizer with ``accumulation_steps > 1`` is refused (every window would be counted
  twice), as are ``gradient_clip_algorithm="value"`` and manual optimization.

Under the DDP strategy the optimizer finds the DDP module Lightning made, switches its
reduction off and reduces once per window over the same ranks.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .. import DynamicLossScale
from ._common import fused, unwrap


class FusedAccumulation(pl.Callback):
    """Lightning's gradient accumulation, run by fused_accum's optimizer.

    ``log_grad_norm``: the name under which the window's pre-clip gradient norm is logged
    (None: not logged).  ``fuse_linear``: the module's ``nn.Linear`` layers accumulate their weight
    gradients inside their GEMMs (docs/fused-linear.md).
    """

    def __init__(self, log_grad_norm: str | None = "grad_norm", fuse_linear: bool = True) -> None:
        self.log_grad_norm = log_grad_norm
        self.fuse_linear = fuse_linear
        self._clip: float | None = None
        self._optimizers: list = []
        self._window_ends = False   # the current batch is the last of its window

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        algorithm = trainer.gradient_clip_algorithm   # None: Lightning's default, "norm"
        if trainer.gradient_clip_val and algorithm is not None and str(algorithm.value
                                                                       if hasattr(algorithm, "value")
                                                                       else algorithm) != "norm":
            raise ValueError("fused_accum: gradient_clip_algorithm='value' is not supported; "
                             "fused_accum clips the window's global norm (the 'norm' algorithm)")
        self._clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("fused_accum: FusedAccumulation drives Lightning's automatic "
                             "optimization; with manual optimization, use a fused optimizer "
                             "with accumulation_steps=k directly")
        loss_scale = self._take_over_fp16(trainer)
        wrapper_args = {} if loss_scale is None else {"loss_scale": loss_scale}
        self._optimizers = [
            fused(opt, accumulation_setting="Trainer(accumulate_grad_batches=...)",
                  max_grad_norm=self._clip, clip_setting="Trainer(gradient_clip_val=...)",
                  **wrapper_args)
            for opt in trainer.optimizers]
        if loss_scale is not None and any(o._scaler is None for o in self._optimizers):
            raise ValueError("fused_accum: precision='16-mixed' needs loss scaling in the "
                             "optimizer: build it with loss_scale='dynamic'")
        trainer.optimizers = self._optimizers
        trainer.gradient_clip_val = None   # the optimizers clip, in their step
        if self.fuse_linear:
            for opt in self._optimizers:
                opt.fuse_linear(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._window_ends = not _accumulates(trainer, batch_idx)
        for opt in self._optimizers:
            opt.final_micro_batch = self._window_ends

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.log_grad_norm is None or not self._window_ends:
            return
        for i, opt in enumerate(self._optimizers):
            if opt.stepped and opt.grad_norm is not None:
                name = self.log_grad_norm if len(self._optimizers) == 1 else f"{self.log_grad_norm}_{i}"
                pl_module.log(name, opt.grad_norm, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.gradient_clip_val = self._clip   # as the user set it, for a later fit()

    @staticmethod
    def _take_over_fp16(trainer: pl.Trainer) -> DynamicLossScale | None:
        """16-mixed: the optimizer takes the GradScaler's place (which would look for .grad)."""
        plugin = trainer.strategy.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        loss_scale = DynamicLossScale(
            init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
            backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval())
        plugin.scaler = None   # its steps become plain ones; fp16 autocast stays

        def backward(tensor: Any, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
            unwrap(optimizer).backward(tensor, *args, **kwargs)   # scales the loss
        plugin.backward = backward
        return loss_scale


def _accumulates(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning accumulates after this batch (does not step)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(epoch_loop, "_should_accumulate"):
        return epoch_loop._should_accumulate()
    return (batch_idx + 1) % trainer.accumulate_grad_batches != 0
