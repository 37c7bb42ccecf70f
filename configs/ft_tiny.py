"""A tiny fine-tuning run for tests: set pretrained.path to a small Hugging Face Llama
folder (tests write one with random weights)."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.pretrained.format = "hf"
  c.data.update(limit_files=40, val_fraction=0.2, seq_len=160, max_eval_examples=16,
                max_body_lines=12)
  c.lora.update(rank=4, alpha=8.0, dropout=0.0)
  c.train.update(steps=16, batch_size=8, log_every=4, eval_every=16, checkpoint_every=8)
  c.optim.update(lr=2e-2, warmup_steps=2)
  c.sample.update(num=1, max_new_tokens=8)
  return c
