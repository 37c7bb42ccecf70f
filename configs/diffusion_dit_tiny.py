"""A tiny class-conditional DiT (EDM objective) on scikit-learn's 8x8 digits: tests,
seconds on CPU. 16 tokens of 2x2 pixels, 2 blocks of width 32."""

from aigc_jax.families.diffusion import default_config


def get_config():
  c = default_config()
  c.model.update(arch="dit", image_size=8, channels=1, patch_size=2, dim=32, depth=2,
                 head_dim=8, mlp_dim=64, dropout=0.0)
  c.data.update(name="digits")
  c.loss.update(ema_decay=0.99)  # short runs: an EMA that keeps up
  c.train.update(steps=20, batch_size=32, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.sample.update(num=20, steps=6)
  c.fid.update(samples=359, classifier_epochs=10)  # the whole digits test split
  return c
