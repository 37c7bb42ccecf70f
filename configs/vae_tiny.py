"""A tiny conv VAE on scikit-learn's 8x8 digits (dynamically binarized): tests, seconds on
CPU."""

from aigc_jax.families.vae import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=8, channels=1, latent_dim=8, width=16, hidden=64)
  c.data.update(name="digits")
  c.train.update(steps=30, batch_size=32, log_every=5, eval_every=15, eval_batches=4,
                 checkpoint_every=15)
  c.optim.update(warmup_steps=5)
  c.iwae.update(k=20, final_k=50, chunk=25, images=64)
  c.sample.update(num=16)
  return c
