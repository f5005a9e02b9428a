"""transformers.Trainer with FusedAccumTrainer: the same updates, logs and checkpoints as the stock
Trainer with torch's optimizer (fp32: relative 1e-4 or better; Adam turns rounding noise of
near-zero gradient elements into visible differences), tiny models from configs, on the CPU."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

import fused_accum  # noqa: E402
from fused_accum.integrations._common import unwrap  # noqa: E402
from fused_accum.integrations.transformers import FusedAccumMixin, FusedAccumTrainer  # noqa: E402
from integration_helpers import TORCHRUN, assert_ranks_match_stock, assert_same_model  # noqa: E402

VOCAB = 48


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def _dataset(n=20, seed=1):
    """Sequences of uneven length whose labels ignore some positions: uneven token counts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 17, (), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[torch.rand(length, generator=g) < 0.3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                    gradient_accumulation_steps=4, num_train_epochs=1, learning_rate=1e-2,
                    max_grad_norm=0.05, weight_decay=0.1, warmup_steps=1, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                    disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch")
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def _train(cls, tmp_path, model=None, **kwargs):
    model = model if model is not None else _model()
    train_kwargs = kwargs.pop("train_kwargs", {})
    trainer = cls(model=model, args=kwargs.pop("args", None) or _args(tmp_path),
                  train_dataset=_dataset(), data_collator=_collate, **kwargs)
    trainer.train(**train_kwargs)
    return trainer


def _logs(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_the_same_updates_logs_and_short_last_window_as_the_stock_trainer(tmp_path):
    stock = _train(transformers.Trainer, tmp_path)
    ours = _train(FusedAccumTrainer, tmp_path)
    assert stock.state.global_step == ours.state.global_step == 3   # windows of 4, 4 and 2
    assert_same_model(ours.model, stock.model, rtol=1e-4)
    torch.testing.assert_close(_logs(ours, "loss"), _logs(stock, "loss"), rtol=1e-5, atol=0)
    torch.testing.assert_close(_logs(ours, "learning_rate"), _logs(stock, "learning_rate"))
    norms, stock_norms = _logs(ours, "grad_norm"), _logs(stock, "grad_norm")
    assert min(stock_norms) > 0.05   # clipping acted in every window
    torch.testing.assert_close(norms, stock_norms, rtol=1e-5, atol=0)
    opt = unwrap(ours.optimizer)
    assert isinstance(opt, fused_accum.FusedAccumulator) and opt.fused
    assert opt.accumulation_steps == 1 and opt.max_grad_norm == 0.05
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in
                                                              stock.optimizer.param_groups]


def test_without_trainer_clipping_grad_norm_is_still_the_real_norm(tmp_path):
    stock = _train(transformers.Trainer, tmp_path, args=_args(tmp_path, max_grad_norm=0))
    ours = _train(FusedAccumTrainer, tmp_path, args=_args(tmp_path, max_grad_norm=0))
    assert unwrap(ours.optimizer).max_grad_norm is None
    torch.testing.assert_close(_logs(ours, "grad_norm"), _logs(stock, "grad_norm"), rtol=1e-5,
                               atol=0)
    assert_same_model(ours.model, stock.model, rtol=1e-4)


@pytest.mark.parametrize("optim", ["sgd", "adagrad"])
def test_other_optimizer_choices(optim, tmp_path):
    stock = _train(transformers.Trainer, tmp_path, args=_args(tmp_path, optim=optim))
    ours = _train(FusedAccumTrainer, tmp_path, args=_args(tmp_path, optim=optim))
    assert unwrap(ours.optimizer).fused == (optim == "sgd")   # adagrad: its own step
    assert_same_model(ours.model, stock.model, rtol=1e-4)


def test_a_torch_optimizer_passed_in_is_wrapped_and_its_scheduler_still_drives_it(tmp_path):
    def build(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    stock_model, our_model = _model(), _model()
    stock = _train(transformers.Trainer, tmp_path, model=stock_model, optimizers=build(stock_model))
    ours = _train(FusedAccumTrainer, tmp_path, model=our_model, optimizers=build(our_model))
    torch.testing.assert_close(_logs(ours, "learning_rate"), _logs(stock, "learning_rate"))
    assert_same_model(ours.model, stock.model, rtol=1e-4)


def test_a_window_counted_twice_is_refused_naming_both_settings(tmp_path):
    model = _model()
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=4)
    with pytest.raises(ValueError, match=r"accumulation_steps=4.*gradient_accumulation_steps"):
        FusedAccumTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(),
                          data_collator=_collate, optimizers=(opt, None))
    opt = fused_accum.AdamW(model.parameters(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0.*TrainingArguments.max_grad_norm"):
        FusedAccumTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(),
                          data_collator=_collate, optimizers=(opt, None))


def test_the_stock_trainer_with_a_fused_optimizer_counting_windows_is_refused(tmp_path):
    """accumulation_steps=4 inside the Trainer's own windows would count every window twice."""
    model = _model()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=4)
    with pytest.raises(RuntimeError, match=r"accelerate is forming accumulation windows.*"
                                           r"FusedAccumTrainer"):
        _train(transformers.Trainer, tmp_path, model=model, optimizers=(opt, None))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters()))


@pytest.mark.parametrize("accumulation", [4, 1])
def test_the_stock_trainer_with_a_fused_optimizer_is_the_stock_trainer(accumulation, tmp_path):
    """accumulation_steps=1 leaves gradients in .grad: the stock Trainer accumulates them, clips
    them and logs their norm as with torch's AdamW, and steps them through the fused kernels."""
    runs = []
    for make in (torch.optim.AdamW, fused_accum.AdamW):
        model = _model()
        runs.append(_train(transformers.Trainer, tmp_path, model=model,
                           optimizers=(make(model.parameters(), lr=1e-2), None),
                           args=_args(tmp_path, gradient_accumulation_steps=accumulation)))
    stock, ours = runs
    assert_same_model(ours.model, stock.model, rtol=1e-5)
    assert min(_logs(stock, "grad_norm")) > 0.05   # clipping acts
    torch.testing.assert_close(_logs(ours, "grad_norm"), _logs(stock, "grad_norm"), rtol=1e-5,
                               atol=0)


def test_checkpoints_save_and_resume_to_the_uninterrupted_result(tmp_path):
    args = lambda: _args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=2)
    straight = _train(FusedAccumTrainer, tmp_path, args=args())
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = _train(FusedAccumTrainer, tmp_path, args=args(),
                     train_kwargs={"resume_from_checkpoint": str(checkpoint)})
    assert resumed.state.global_step == straight.state.global_step == 6
    assert_same_model(resumed.model, straight.model, rtol=1e-6)


def test_a_mixin_in_front_of_another_trainer_subclass(tmp_path):
    class LoggingTrainer(transformers.Trainer):
        calls = 0

        def training_step(self, *args, **kwargs):
            LoggingTrainer.calls += 1
            return super().training_step(*args, **kwargs)

    class Ours(FusedAccumMixin, LoggingTrainer):
        pass
    stock = _train(transformers.Trainer, tmp_path)
    ours = _train(Ours, tmp_path)
    assert LoggingTrainer.calls == 10
    assert_same_model(ours.model, stock.model, rtol=1e-4)


def test_a_bf16_model_accumulates_in_fp32_with_fp32_masters(tmp_path):
    ours = _train(FusedAccumTrainer, tmp_path, model=_model(dtype=torch.bfloat16))
    opt = unwrap(ours.optimizer)
    buckets = opt._buffers.buckets
    assert buckets and all(b.dtype == torch.bfloat16 and b.acc.dtype == torch.float32
                           for b in buckets)
    assert all("master_param" in b.state for b in buckets)
    assert all(torch.isfinite(torch.tensor(_logs(ours, "loss"))))


def test_fp16_grad_scaler_becomes_the_optimizer_s_loss_scaling(tmp_path):
    """fp16=True on a GPU gives Trainer a GradScaler; here one is planted on the CPU."""
    class WithScaler(transformers.Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    class Ours(FusedAccumMixin, WithScaler):
        pass
    stock = _train(transformers.Trainer, tmp_path)
    ours = _train(Ours, tmp_path)
    opt = unwrap(ours.optimizer)
    assert ours.accelerator.scaler is None and opt.loss_scale == 2.0**10
    assert_same_model(ours.model, stock.model, rtol=1e-4)   # power-of-two scaling is exact


DDP_SCRIPT = r'''
import os, sys, pathlib, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
import transformers
from test_transformers import _args, _train, FusedAccumTrainer
tmp = pathlib.Path(sys.argv[2] + ".dir")
cls = FusedAccumTrainer if sys.argv[1] == "fused" else transformers.Trainer
trainer = _train(cls, tmp)
assert dist.get_world_size() == 2 and trainer.args.world_size == 2
torch.save([p.detach() for p in trainer.model.parameters()], f"{{sys.argv[2]}}.rank{{dist.get_rank()}}")
dist.barrier()
dist.destroy_process_group()
# gloo's threads abort now and then in the interpreter's teardown ("terminate called without an
# active exception", stock runs too): everything is saved, so skip the teardown
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def test_ddp_on_two_cpu_ranks_as_the_stock_trainer(tmp_path):
    """torchrun, two gloo ranks: Trainer wraps the model in DDP; the fused optimizer switches
    DDP's reduction off and averages each window itself (Trainer's loss, normalised by the
    window's global token count, makes that the exact global token mean)."""
    assert_ranks_match_stock(tmp_path, DDP_SCRIPT.format(tests=os.path.dirname(__file__)),
                             *TORCHRUN)
