"""A tiny LM for tests: trains in seconds on a slice of the standard library's source."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, mlp_dim=128)
  c.data.update(limit_files=40, seq_len=32)
  c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.sample.update(num=2, max_new_tokens=16)
  return c
