"""The decoder beside the encoder on opinion monitoring's three classes: SmolLM2-135M-
Instruct with LoRA adapters and a linear head on the last token (as ft_sentiment_smollm2),
on the same NYT + tweets split as configs/ft_opinion_minilm.py."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.task.update(name="classify", num_classes=3)
  c.data.update(name="opinion", seq_len=64, max_eval_examples=0)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05)
  c.train.update(steps=200, batch_size=16, grad_accum_steps=2, log_every=20, eval_every=200,
                 checkpoint_every=100, eval_at_start=False)
  c.optim.update(lr=5e-4, warmup_steps=20, weight_decay=0.01)
  c.sample.num = 0
  return c
