"""Lightning with the FusedAccumulation callback: Lightning's own windows, schedulers and
checkpoints, with fp32 accumulation and clipping in the kernels, against stock Lightning with
torch's optimizer (fp32: relative 1e-4 or better), on the CPU."""
import os

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

import fused_accum  # noqa: E402
from fused_accum.integrations.lightning import FusedAccumulation  # noqa: E402
from fused_accum.placeholders import is_placeholder  # noqa: E402
from integration_helpers import assert_ranks_match_stock, assert_same_model, run_script  # noqa: E402

VOCAB, DIM = 29, 16


class TinyLM(pl.LightningModule):
    def __init__(self, make_optimizer=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.make_optimizer = make_optimizer
        self.norms = []     # the pre-clip norm of every window, as Lightning's loop sees it

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(h + self.down(torch.nn.functional.gelu(self.up(self.norm(h)))))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens).float().flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        if self.make_optimizer is not None:
            return self.make_optimizer(self)
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
            "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        if any(is_placeholder(p.grad) for p in self.parameters()):
            return   # .grad holds placeholders, which refuse reads: the callback logs grad_norm
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:   # stock Lightning: the window's gradient, before clipping
            self.norms.append(torch.nn.utils.get_total_norm(grads).item())

    def log(self, name, value, *args, **kwargs):
        if name == "grad_norm":   # what the callback logs
            self.norms.append(float(value))
        return super().log(name, value, *args, **kwargs)


def _loader(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, VOCAB, (5,), generator=g), torch.randint(0, VOCAB, (5,), generator=g))
            for _ in range(2 * n)]
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def _trainer(callbacks=(), **overrides):
    settings = dict(max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.05,
                    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    settings.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **settings)


def _fit(module, callbacks=(), ckpt_path=None, **overrides):
    trainer = _trainer(callbacks, **overrides)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_windows_schedulers_and_clipping_as_stock_lightning():
    stock, ours = TinyLM(), TinyLM()
    _fit(stock)
    trainer = _fit(ours, [FusedAccumulation()])
    assert_same_model(ours, stock)
    assert trainer.global_step == 8   # windows of 3, 3, 3 and 1 in each epoch
    assert len(ours.norms) == len(stock.norms) == 8 and min(stock.norms) > 0.05   # clipping acts
    torch.testing.assert_close(ours.norms, stock.norms, rtol=1e-5, atol=0)
    opt = trainer.optimizers[0]
    assert isinstance(opt, fused_accum.FusedAccumulator) and opt.fused and opt.max_grad_norm == 0.05
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 0.7**8)
    assert trainer.gradient_clip_val == 0.05   # put back after fit


def test_a_fused_optimizer_from_configure_optimizers():
    stock = TinyLM(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    ours = TinyLM(lambda m: fused_accum.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    _fit(stock, gradient_clip_val=None, max_epochs=1)
    _fit(ours, [FusedAccumulation()], gradient_clip_val=None, max_epochs=1)
    assert_same_model(ours, stock)


def test_a_window_counted_twice_is_refused_naming_both_settings():
    module = TinyLM(lambda m: fused_accum.AdamW(m.parameters(), accumulation_steps=3))
    with pytest.raises(ValueError, match=r"accumulation_steps=3.*accumulate_grad_batches"):
        _fit(module, [FusedAccumulation()])


def test_stock_lightning_with_a_fused_optimizer_is_stock_lightning():
    """Without the callback, accumulation_steps=1 leaves gradients in .grad: Lightning
    accumulates and clips them as with torch's AdamW; the fused kernels step them."""
    stock = TinyLM(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    ours = TinyLM(lambda m: fused_accum.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    _fit(stock)
    _fit(ours)
    assert_same_model(ours, stock)
    assert min(stock.norms) > 0.05   # clipping acts
    torch.testing.assert_close(ours.norms, stock.norms, rtol=1e-5, atol=0)


def test_clipping_by_value_and_manual_optimization_are_refused():
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        _fit(TinyLM(), [FusedAccumulation()], gradient_clip_algorithm="value")

    class Manual(TinyLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(Manual(), [FusedAccumulation()], accumulate_grad_batches=1, gradient_clip_val=None)


def test_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    straight = TinyLM()
    _fit(straight, [FusedAccumulation()])
    first = TinyLM()
    trainer = _fit(first, [FusedAccumulation()], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = TinyLM()
    _fit(resumed, [FusedAccumulation()], ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_same_model(resumed, straight, rtol=1e-6)


def test_bf16_mixed_precision():
    stock, ours = TinyLM(), TinyLM()
    _fit(stock, precision="bf16-mixed", max_epochs=1)
    _fit(ours, [FusedAccumulation()], precision="bf16-mixed", max_epochs=1)
    assert_same_model(ours, stock)


def test_16_mixed_grad_scaler_becomes_the_optimizer_s_loss_scaling():
    from lightning.pytorch.plugins import MixedPrecision
    stock, ours = TinyLM(), TinyLM()   # fp16 autocast on the CPU, GradScaler("cpu")
    _fit(stock, plugins=[MixedPrecision("16-mixed", "cpu")], max_epochs=1)
    trainer = _fit(ours, [FusedAccumulation()], plugins=[MixedPrecision("16-mixed", "cpu")],
                   max_epochs=1)
    assert trainer.optimizers[0].loss_scale is not None
    assert_same_model(ours, stock)


DDP_SCRIPT = r'''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lightning import TinyLM, _fit
from fused_accum.integrations.lightning import FusedAccumulation
fused = sys.argv[1] == "fused"
module = TinyLM()
trainer = _fit(module, [FusedAccumulation()] if fused else [], strategy="ddp", devices=2,
               max_epochs=1)
torch.save([p.detach() for p in module.parameters()], f"{{sys.argv[2]}}.rank{{trainer.global_rank}}")
'''


def test_ddp_on_two_cpu_ranks_as_stock_lightning_ddp(tmp_path):
    """Lightning's DDP strategy (gloo) launches the second rank itself."""
    assert_ranks_match_stock(tmp_path, DDP_SCRIPT.format(tests=os.path.dirname(__file__)))


MID_WINDOW_CHECKPOINT_SCRIPT = r'''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lightning import TinyLM, _loader, _trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from fused_accum.integrations.lightning import FusedAccumulation

class Validated(TinyLM):
    def validation_step(self, batch, batch_idx):
        self.log("val", torch.tensor(1.0), sync_dist=True)

saves = []
class Spy(ModelCheckpoint):   # what each save holds, on every rank
    def _save_checkpoint(self, trainer, filepath):
        state = trainer.optimizers[0].state_dict()["fused_accum"]
        saves.append((state["micro_batches"], state["window"] is not None))
        super()._save_checkpoint(trainer, filepath)

module = Validated()
trainer = _trainer([FusedAccumulation(), Spy(dirpath=sys.argv[2] + ".ckpt", save_top_k=-1)],
                   strategy="ddp", devices=2, max_epochs=1, accumulate_grad_batches=3,
                   val_check_interval=2, limit_val_batches=1, enable_checkpointing=True)
trainer.fit(module, _loader(), _loader(n=1))
torch.save(saves, f"{{sys.argv[2]}}.rank{{trainer.global_rank}}")
'''


def test_ddp_checkpoints_in_the_middle_of_a_window(tmp_path):
    """Lightning validates (and ModelCheckpoint saves) every 2 batches, windows are 3: a save in
    the middle of a window, under DDP, sums the window over both ranks on both (a collective the
    strategy's state dumps run on every rank)."""
    saves = run_script(tmp_path, MID_WINDOW_CHECKPOINT_SCRIPT.format(tests=os.path.dirname(__file__)),
                       "fused")
    assert saves[0] == saves[1]
    assert (0, True) in saves[0]   # mid-window: a window driven by Lightning, micro-batches uncounted
