"""Sentiment classification (the market-sentiment use case): SmolLM2-135M-Instruct with
LoRA adapters and a linear head on the last token, on VADER's movie-review snippets
(positive vs negative); evaluation reports accuracy beside TF-IDF + logistic regression."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.task.update(name="classify", num_classes=2)
  c.data.update(name="vader", vader_set="movies", seq_len=64, max_eval_examples=0)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05)
  c.train.update(steps=400, batch_size=16, log_every=20, eval_every=200, checkpoint_every=100)
  c.optim.update(lr=5e-4, warmup_steps=30, weight_decay=0.01)
  c.sample.num = 0
  return c
