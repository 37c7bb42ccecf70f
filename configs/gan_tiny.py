"""A tiny DCGAN on scikit-learn's 8x8 digits: tests, seconds on CPU (FID ~400 -> ~35 in
1,000 steps)."""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=8, channels=1, z_dim=32, width=32)
  c.data.update(name="digits")
  c.loss.update(ema_decay=0.99)  # short runs: an EMA that keeps up
  c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.sample.update(num=16)
  c.fid.update(samples=359, classifier_epochs=10)  # the whole digits test split
  return c
