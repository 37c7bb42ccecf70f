"""A class-conditional EDM U-Net on Fashion-MNIST (60k train / 10k test, 28x28 grey;
`make data`) sized for a CPU: 32 channels at 28x28, 64 at 14x14 and 7x7, one residual
block per level, self-attention at 7x7; Heun sampling with 18 steps (35 NFE), the EMA
weights; fid_classifier on 10k samples, as the GAN's."""

from aigc_jax.families.diffusion import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=28, channels=1, width=32, channel_mults=(1, 2, 2),
                 blocks_per_level=1, attention_levels=(2,), head_dim=32, dropout=0.1,
                 num_classes=10, groups=8)
  c.data.update(name="fashion_mnist", order="epochs")
  c.loss.update(ema_decay=0.999)
  c.optim.update(lr=2e-3, warmup_steps=200)
  c.train.update(steps=4000, batch_size=64, log_every=100, eval_every=1000,
                 checkpoint_every=1000)
  c.fid.update(samples=10000, steps_sweep=(5, 10, 25, 50))
  return c
