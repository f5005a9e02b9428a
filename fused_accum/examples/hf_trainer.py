"""Hugging Face Trainer with ``FusedAccumTrainer``: one changed line.

A tiny GPT-2 (built from a config: no weights are downloaded) learns the Python standard
library's source as bytes, in sequences of uneven length (the same text as ``byte_gpt.py``).
Every optimizer step sees 16 sequences; the loss per byte on held-out text is measured after
every few steps:

- ``large batch``: the stock ``Trainer``, 16 sequences per batch, no accumulation;
- ``fused_accum``: ``FusedAccumTrainer`` (was: ``Trainer``), 2 sequences per micro-batch,
  ``gradient_accumulation_steps=8``;
- ``stock Trainer, 2 x 8``: the stock Trainer accumulating the same way (its token mean is right
  in recent transformers; an fp32 model's ``.grad`` sums in fp32).

Run it: ``python -m fused_accum.examples.hf_trainer [--quick]``, or in a clone of the
repository ``python examples/hf_trainer.py [--quick]``.
"""
from __future__ import annotations

import tempfile

import torch
import transformers

transformers.logging.set_verbosity_error()
from fused_accum import examples  # noqa: E402
from fused_accum.examples.byte_gpt import IGNORE, LONGEST, corpus, windows  # noqa: E402
from fused_accum.integrations.transformers import FusedAccumTrainer  # noqa: E402

LR = 1e-3


def make_model(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=LONGEST + 1, n_embd=64,
                                     n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def collate(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padded to the longest; the model shifts the labels itself (each byte predicts the next)."""
    width = max(len(s) for s in sequences)
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE)
    for row, s in enumerate(sequences):
        inputs[row, :len(s)], labels[row, :len(s)] = s, s
    return {"input_ids": inputs, "labels": labels, "attention_mask": (labels != IGNORE).long()}


class HeldOutLoss(transformers.TrainerCallback):
    """Appends the held-out loss per byte to ``curve`` every ``every`` optimizer steps."""

    def __init__(self, model, held_out, every: int):
        self.model, self.every, self.held_out = model, every, collate(held_out)
        self.curve = [self.loss()]

    def loss(self) -> float:
        with torch.no_grad():
            return self.model(**self.held_out).loss.item()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.curve.append(self.loss())


def train(trainer_class, per_device: int, accumulation: int, steps: int, every: int) -> list[float]:
    text = corpus()
    split = int(len(text) * 0.9)
    sequences = [s for w in windows(text[:split], steps, seed=1) for s in w]
    held_out = [s for w in windows(text[split:], 4, seed=2) for s in w]
    model = make_model()
    callback = HeldOutLoss(model, held_out, every)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=LR,
            lr_scheduler_type="constant", weight_decay=0.1, max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
            data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=args, train_dataset=sequences,
                                data_collator=collate, callbacks=[callback])
        trainer.remove_callback(transformers.PrinterCallback)   # the demo prints its own summary
        trainer.train()
    return callback.curve


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """The demo's task; ``steps``: that many optimizer steps instead (a smoke run)."""
    count, every = (20, 2) if quick else (200, 10)
    if steps:
        count, every = steps, min(every, steps)
    curves = {"large batch": train(transformers.Trainer, 16, 1, count, every),
              "fused_accum": train(FusedAccumTrainer, 2, 8, count, every),
              "stock Trainer, 2 x 8": train(transformers.Trainer, 2, 8, count, every)}
    return [{"name": "transformers Trainer, GPT-2 (tiny), 2 x 8 sequences", "curves": curves,
             "x_label": "optimizer steps of 16 sequences", "x_step": every,
             "y_label": "held-out loss per byte"}]


def main(argv: list[str] | None = None) -> None:
    examples.main(run, __doc__, "20 steps instead of 200", argv)


if __name__ == "__main__":
    main()
