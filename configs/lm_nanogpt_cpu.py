"""nanoGPT's published CPU shape (4 layers, 4 heads, width 128, context 64, batch 12) on the
code corpus; the SwiGLU width 344 keeps the FLOPs of nanoGPT's 4x GELU MLP."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=128, mlp_dim=344)
  c.data.update(seq_len=64)
  c.train.update(steps=2000, batch_size=12, log_every=100, eval_every=500, eval_batches=20,
                 checkpoint_every=1000)
  c.optim.update(lr=1e-3, warmup_steps=100)
  return c
