"""Conv VAE on Fashion-MNIST's 8-bit grey levels: a discretized logistic likelihood per
pixel (no binarization), 32 latents; bits per dimension comparable with other 8-bit
image models."""

from aigc_jax.families.vae import default_config


def get_config():
  c = default_config()
  c.model.update(arch="conv", image_size=28, channels=1, latent_dim=32, width=32, hidden=512,
                 likelihood="logistic")
  c.data.update(name="fashion_mnist")
  c.train.update(steps=4000, batch_size=128, log_every=100, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000)
  c.iwae.update(k=100, final_k=1000, chunk=100, images=512)
  return c
