"""A class-conditional EDM U-Net on CIFAR-10 (32x32 colour) for a GPU: DDPM++-like widths
(128 channels, x1/x2/x2/x2, attention at 16x16 and 8x8), bfloat16 compute, Heun sampling
with 18 steps (35 NFE).

Needs the tfds extra and CIFAR-10 prepared offline (`tfds build cifar10` on a machine with
network access, then point data.tfds_data_dir at it): nothing is downloaded at run time.
"""

from aigc_jax.families.diffusion import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=32, channels=3, width=128, channel_mults=(1, 2, 2, 2),
                 blocks_per_level=2, attention_levels=(1, 2), head_dim=64, dropout=0.1,
                 num_classes=10, dtype="bfloat16", attention="jax")
  c.data.update(name="tfds", tfds_name="cifar10")
  c.loss.update(ema_decay=0.9999)
  c.optim.update(lr=2e-4, warmup_steps=1000)
  c.train.update(steps=200000, batch_size=256, log_every=500, eval_every=10000,
                 checkpoint_every=10000)
  c.fid.update(samples=10000, classifier_epochs=10, steps_sweep=(5, 10, 25, 50))
  return c
