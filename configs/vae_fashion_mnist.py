"""Conv VAE on dynamically binarized Fashion-MNIST (Debian's dataset-fashion-mnist, `make
data`): 20 latents, Bernoulli pixels, Adam 1e-3; at every evaluation the negative ELBO on
1,024 test images and the IWAE NLL on 512 of them (k = 100; k = 1000 at the end)."""

from aigc_jax.families.vae import default_config


def get_config():
  c = default_config()
  c.model.update(arch="conv", image_size=28, channels=1, latent_dim=20, width=32, hidden=512,
                 likelihood="bernoulli")
  c.data.update(name="fashion_mnist", binarize="dynamic")
  c.train.update(steps=4000, batch_size=128, log_every=100, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000)
  c.iwae.update(k=100, final_k=1000, chunk=100, images=512)
  return c
