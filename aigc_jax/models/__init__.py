"""Pure NNX models, one file per model kind, with their losses. Names load lazily.

  Transformer, TransformerConfig      decoder-only LM (models/transformer.py)
  generate, generate_arrays           KV-cache sampling (models/sampling.py)
  SequenceClassifier                  a classification head on a Transformer
  GanConfig, DCGANGenerator, DCGANDiscriminator, build_gan, gan_losses
  VAE, VaeConfig, vae_losses

Modes follow NNX: `model.train()` / `model.eval()` switch dropout, BatchNorm statistics
and the spectral norm's power iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aigc_jax._lazy import lazy_exports

_EXPORTS = {
    "Transformer": "aigc_jax.models.transformer",
    "TransformerConfig": "aigc_jax.models.transformer",
    "generate": "aigc_jax.models.sampling",
    "generate_arrays": "aigc_jax.models.sampling",
    "sample_logits": "aigc_jax.models.sampling",
    "SequenceClassifier": "aigc_jax.models.classifier",
    "GanConfig": "aigc_jax.models.gan",
    "DCGANGenerator": "aigc_jax.models.gan",
    "DCGANDiscriminator": "aigc_jax.models.gan",
    "build_gan": "aigc_jax.models.gan",
    "VAE": "aigc_jax.models.vae",
    "VaeConfig": "aigc_jax.models.vae",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see (re-exports)
  # ruff: noqa: F401
  from aigc_jax.models import gan_losses, vae_losses
  from aigc_jax.models.classifier import SequenceClassifier
  from aigc_jax.models.gan import DCGANDiscriminator, DCGANGenerator, GanConfig, build_gan
  from aigc_jax.models.sampling import generate, generate_arrays, sample_logits
  from aigc_jax.models.transformer import Transformer, TransformerConfig
  from aigc_jax.models.vae import VAE, VaeConfig
