"""DCGAN on Fashion-MNIST (60k train / 10k test, 28x28 grey; Debian's dataset-fashion-mnist,
installed by `make data`): G 7x7x256 -> 14x14x128 -> 28x28 (width 128, ReLU, BatchNorm),
D with 4x4 stride-2 convolutions; Glorot-uniform kernels as in Keras' and PyTorch's DCGANs
(flax's LeCun-normal default left the trousers and shoes out), shuffled epochs;
non-saturating loss, Adam(2e-4, beta1 0.5), EMA generator, fid_classifier on 10k samples
at every evaluation. The sweep behind these choices: benchmarks/results/gan_sweep.md."""

from aigc_jax.families.gan import default_config


def get_config():
  c = default_config()
  c.model.update(arch="dcgan", image_size=28, channels=1, z_dim=64, width=128,
                 kernel_init="glorot_uniform")
  c.data.update(name="fashion_mnist", order="epochs")
  c.loss.update(name="nonsaturating", ema_decay=0.999)
  c.train.update(steps=6000, batch_size=64, log_every=100, eval_every=1000,
                 checkpoint_every=1000)
  c.fid.update(samples=10000)
  return c
