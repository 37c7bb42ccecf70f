"""aigc_jax: generative models in JAX on one compiled, sharded training core."""

from aigc_jax.xla_flags import apply_fast_cpu_flags

apply_fast_cpu_flags()  # before anything starts a JAX backend

# ruff: noqa: E402

from aigc_jax.errors import UserError
from aigc_jax.models import Transformer, TransformerConfig
from aigc_jax.models.sampling import generate, sample_logits
from aigc_jax.train import TrainState, make_supervised_step, open_run, train

__version__ = "0.1.0"

__all__ = ["Transformer", "TransformerConfig", "TrainState", "UserError", "generate",
           "make_supervised_step", "open_run", "sample_logits", "train"]
