"""Model families' NNX modules, one file per family."""

from aigc_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
