"""LoRA SFT of SmolLM2-135M-Instruct on the stdlib instruction set (prompt = a function's
signature and docstring, response = its body; loss on response tokens only)."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.task.name = "sft"
  c.data.update(name="stdlib_functions", seq_len=256, max_eval_examples=128)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05)
  c.train.update(steps=150, batch_size=8, log_every=10, eval_every=75, checkpoint_every=75)
  c.optim.update(lr=3e-4, warmup_steps=15)
  c.sample.update(num=2, max_new_tokens=120)
  return c
