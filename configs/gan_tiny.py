"""A tiny DCGAN on scikit-learn's 8x8 digits: tests, seconds on CPU."""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=8, channels=1, z_dim=16, width=16)
  c.data.update(name="digits")
  c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.sample.update(num=16)
  return c
