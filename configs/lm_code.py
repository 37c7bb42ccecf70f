"""The demo: a small code LM trained on the Python standard library's source on 2 CPU
cores in a few minutes (byte-level, context 128)."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=6, num_kv_heads=2, embed_dim=192, mlp_dim=512,
                 max_seq_len=512)
  c.data.update(seq_len=128)
  c.train.update(steps=1500, batch_size=16, log_every=50, eval_every=500, eval_batches=16,
                 checkpoint_every=500)
  c.optim.update(lr=2e-3, warmup_steps=100, weight_decay=0.1)
  c.sample.update(prompt="def ", num=2, max_new_tokens=200, temperature=0.7, top_p=0.95)
  return c
