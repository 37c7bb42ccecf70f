"""DCGAN on Fashion-MNIST (60k train / 10k test, 28x28 grey; Debian's dataset-fashion-mnist,
installed by `make data`): non-saturating loss, Adam(2e-4, beta1 0.5), EMA generator,
fid_classifier on 10k samples at every evaluation. About 10 steps/s on 2 CPU cores."""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(arch="dcgan", image_size=28, channels=1, z_dim=64, width=64)
  c.data.update(name="fashion_mnist")
  c.loss.update(name="nonsaturating", ema_decay=0.999)
  c.train.update(steps=6000, batch_size=64, log_every=100, eval_every=1000,
                 checkpoint_every=1000)
  c.fid.update(samples=10000)
  return c
