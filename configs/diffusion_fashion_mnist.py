"""A class-conditional EDM U-Net on Fashion-MNIST (60k train / 10k test, 28x28 grey;
`make data`) sized for a CPU: 16 channels at 28x28, 32 at 14x14, 64 at 7x7 with
self-attention, one residual block per level (~0.6 s per step of 64 images on 2 cores);
Heun sampling with 10 steps (19 NFE) from the EMA weights. fid_classifier on 2,000
samples at each evaluation (sampling is the expensive part on a CPU); the comparison
with the GAN and the VAE on 10,000 is `python -m benchmarks.image_models`."""

from aigc_jax.families.diffusion import default_config


def get_config():
  c = default_config()
  c.model.update(image_size=28, channels=1, width=16, channel_mults=(1, 2, 4),
                 blocks_per_level=1, attention_levels=(2,), head_dim=32, dropout=0.1,
                 num_classes=10, groups=8)
  c.data.update(name="fashion_mnist", order="epochs")
  c.loss.update(ema_decay=0.999)
  c.optim.update(lr=1e-3, warmup_steps=200)
  c.train.update(steps=3000, batch_size=64, log_every=100, eval_every=1000,
                 checkpoint_every=500)
  c.sample.update(num=100, steps=10)
  c.fid.update(samples=2000)
  return c
