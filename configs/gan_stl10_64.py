"""DCGAN at 64x64 colour on STL-10 (its labelled 5k train / 8k test images, 96x96 resized
to 64x64) for a GPU: WGAN-GP with a layer-norm critic, five critic updates per generator
update, Adam(1e-4, betas 0.0/0.9).

Needs the tfds extra and STL-10 prepared offline (`tfds build stl10`, then set
data.tfds_data_dir): nothing is downloaded at run time.
"""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(arch="dcgan", image_size=64, channels=3, z_dim=128, width=64,
                 g_norm="batch", d_norm="layer")
  c.data.update(name="tfds", tfds_name="stl10")
  c.loss.update(name="wgan", n_critic=5, gp_weight=10.0, ema_decay=0.999)
  c.optim.update(g_lr=1e-4, d_lr=1e-4, b1=0.0, b2=0.9)
  c.train.update(steps=40000, batch_size=64, log_every=200, eval_every=5000,
                 checkpoint_every=5000)
  c.fid.update(samples=8000, classifier_epochs=15)
  return c
