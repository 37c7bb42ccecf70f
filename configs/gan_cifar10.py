"""SNGAN-style DCGAN on CIFAR-10 (32x32 colour) for a GPU: hinge loss, spectral-norm
discriminator, two critic updates per generator update, Adam(2e-4, betas 0.0/0.9).

Needs the tfds extra and CIFAR-10 prepared offline (`tfds build cifar10` on a machine with
network access, then point data.tfds_data_dir at it): nothing is downloaded at run time.
"""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(arch="dcgan", image_size=32, channels=3, z_dim=128, width=128,
                 g_norm="batch", d_norm="spectral")
  c.data.update(name="tfds", tfds_name="cifar10")
  c.loss.update(name="hinge", n_critic=2, ema_decay=0.9999)
  c.optim.update(g_lr=2e-4, d_lr=2e-4, b1=0.0, b2=0.9)
  c.train.update(steps=50000, batch_size=128, log_every=200, eval_every=5000,
                 checkpoint_every=5000)
  c.fid.update(samples=10000, classifier_epochs=10)
  return c
