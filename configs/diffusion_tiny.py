"""A tiny class-conditional EDM U-Net on scikit-learn's 8x8 digits: tests, seconds on CPU."""

from aigc_jax.families.diffusion import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=8, channels=1, width=16, channel_mults=(1, 2),
                 attention_levels=(1,), head_dim=8, groups=4, dropout=0.0)
  c.data.update(name="digits")
  c.loss.update(ema_decay=0.99)  # short runs: an EMA that keeps up
  c.train.update(steps=20, batch_size=32, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.optim.update(lr=2e-3, warmup_steps=5)
  c.sample.update(num=20, steps=6)
  c.fid.update(samples=359, classifier_epochs=10)  # the whole digits test split
  return c
