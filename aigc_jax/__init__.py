"""aigc_jax: generative models in JAX on one compiled, sharded training core.

Importing the package (or any of its modules) changes nothing in the host process: no
environment variables, allocator settings, logging handlers or signal hooks. The names
below load their module on first use, so `import aigc_jax` imports neither JAX nor Orbax.
Process-wide tuning is opt-in: `aigc_jax.xla_flags.apply_fast_cpu_flags()` (before JAX
starts a backend) and `aigc_jax.train.memory.keep_step_memory()`; the `aigc-jax` CLI and
the benchmarks apply both.

Subpackages: `aigc_jax.nn` (shared layers), `aigc_jax.models` (NNX models and their
losses), `aigc_jax.train` (state, steps, mesh, checkpoints, the loop),
`aigc_jax.families` (models bound to the loop), `aigc_jax.data`, `aigc_jax.evaluation`,
`aigc_jax.pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aigc_jax._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "aigc_jax.errors",
    # Transformer LM, sampling, LoRA
    "Transformer": "aigc_jax.models.transformer",
    "TransformerConfig": "aigc_jax.models.transformer",
    "SequenceClassifier": "aigc_jax.models.classifier",
    "generate": "aigc_jax.models.sampling",
    "generate_arrays": "aigc_jax.models.sampling",
    "sample_logits": "aigc_jax.models.sampling",
    "add_lora": "aigc_jax.nn.linear",
    "merge_lora": "aigc_jax.nn.linear",
    # GAN and VAE models; their losses as modules
    "GanConfig": "aigc_jax.models.gan",
    "DCGANGenerator": "aigc_jax.models.gan",
    "DCGANDiscriminator": "aigc_jax.models.gan",
    "build_gan": "aigc_jax.models.gan",
    "VAE": "aigc_jax.models.vae",
    "VaeConfig": "aigc_jax.models.vae",
    "gan_losses": "aigc_jax.models",
    "vae_losses": "aigc_jax.models",
    # Training core: state, steps, mesh, checkpoints, families, the loop
    "TrainState": "aigc_jax.train.state",
    "make_supervised_step": "aigc_jax.train.steps",
    "guard_step": "aigc_jax.train.guard",
    "Checkpointer": "aigc_jax.train.checkpoint",
    "make_mesh": "aigc_jax.train.mesh",
    "batch_sharding": "aigc_jax.train.mesh",
    "replicated": "aigc_jax.train.mesh",
    "put_batch": "aigc_jax.train.mesh",
    "Family": "aigc_jax.train.family",
    "load_family": "aigc_jax.train.family",
    "open_run": "aigc_jax.train.loop",
    "train_and_evaluate": "aigc_jax.train.loop",
    "config_from_file": "aigc_jax.config",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see (re-exports)
  # ruff: noqa: F401
  from aigc_jax.config import config_from_file
  from aigc_jax.errors import UserError
  from aigc_jax.models import gan_losses, vae_losses
  from aigc_jax.models.classifier import SequenceClassifier
  from aigc_jax.models.gan import DCGANDiscriminator, DCGANGenerator, GanConfig, build_gan
  from aigc_jax.models.sampling import generate, generate_arrays, sample_logits
  from aigc_jax.models.transformer import Transformer, TransformerConfig
  from aigc_jax.models.vae import VAE, VaeConfig
  from aigc_jax.nn.linear import add_lora, merge_lora
  from aigc_jax.train.checkpoint import Checkpointer
  from aigc_jax.train.family import Family, load_family
  from aigc_jax.train.guard import guard_step
  from aigc_jax.train.loop import open_run, train_and_evaluate
  from aigc_jax.train.mesh import batch_sharding, make_mesh, put_batch, replicated
  from aigc_jax.train.state import TrainState
  from aigc_jax.train.steps import make_supervised_step
