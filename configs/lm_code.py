"""The demo: a small code LM trained on the Python standard library's source on 2 CPU
cores in about five minutes (byte-level, context 128, grouped-query attention)."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, mlp_dim=344)
  c.data.update(seq_len=128)
  c.train.update(steps=1200, batch_size=16, log_every=50, eval_every=300, eval_batches=16,
                 checkpoint_every=300)
  c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  # Generation stays within the trained context of 128 bytes.
  c.sample.update(prompt="def ", num=2, max_new_tokens=120, temperature=0.7, top_p=0.95)
  return c
