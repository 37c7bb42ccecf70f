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

from aigc_jax import models as _models
from aigc_jax import train as _train
from aigc_jax._lazy import lazy_exports

__version__ = "0.1.0"

# Every model of aigc_jax.models and every name of aigc_jax.train (both packages are lazy
# too: importing them here loads no model code), and a few more.
_EXPORTS = {
    **_models._EXPORTS,
    **_train._EXPORTS,
    "UserError": "aigc_jax.errors",
    "config_from_file": "aigc_jax.config",
    "add_lora": "aigc_jax.nn.linear",
    "merge_lora": "aigc_jax.nn.linear",
    "gan_losses": "aigc_jax.models",  # the GAN's objectives and penalties (a module)
    "vae_losses": "aigc_jax.models",  # the VAE's likelihoods, ELBO and IWAE (a module)
    "make_mesh": "aigc_jax.train.mesh",
    "batch_sharding": "aigc_jax.train.mesh",
    "replicated": "aigc_jax.train.mesh",
    "put_batch": "aigc_jax.train.mesh",
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
  from aigc_jax.train.loop import init_sharded_state, open_run, train_and_evaluate
  from aigc_jax.train.mesh import (
    batch_sharding,
    make_mesh,
    put_batch,
    replicated,
    rules_from_config,
  )
  from aigc_jax.train.sharding import state_shardings
  from aigc_jax.train.state import TrainState
  from aigc_jax.train.steps import make_supervised_step
