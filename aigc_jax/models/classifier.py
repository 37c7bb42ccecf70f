"""Sequence classifiers: a linear head on the hidden state of each row's last real token
of a transformer language model (`SequenceClassifier`), or on the pooled hidden states of
a BERT encoder (`EncoderClassifier`). Both take right-padded tokens [B, T] and lengths
[B], so a fine-tuning task feeds either the same batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.models.transformer import Transformer
from aigc_jax.nn.linear import Linear


class SequenceClassifier(nnx.Module):
  """tokens [B, T], lengths [B] -> class logits [B, C] float32 from the hidden state of
  each row's last real token (right padding). The language model's parameters sit under
  `lm`, the head's under `head`; dropout is the language model's (`train()` / `eval()`)."""

  def __init__(self, lm: Transformer, num_classes: int, *, rngs: nnx.Rngs):
    self.lm = lm
    self.head = Linear(lm.cfg.embed_dim, num_classes, rngs=rngs, axes=("embed", "classes"),
                       kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    h_BTD = self.lm.hidden_states(tokens_BT)
    last_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return self.head(last_BD.astype(jnp.float32)).astype(jnp.float32)


class EncoderClassifier(nnx.Module):
  """tokens [B, T], lengths [B] -> class logits [B, C] float32 from the encoder's pooled
  hidden states (its `pool`: masked mean or [CLS]) of the real tokens (right padding).
  The encoder's parameters sit under `lm` (as the language model's do in
  `SequenceClassifier`, so fine-tuning finds them alike), the head's under `head`."""

  def __init__(self, encoder, num_classes: int, *, rngs: nnx.Rngs):
    self.lm = encoder
    self.head = Linear(encoder.cfg.hidden, num_classes, rngs=rngs, axes=("embed", "classes"),
                       kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    mask_BT = (jnp.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]).astype(jnp.int32)
    pooled_BD = self.lm.pool(self.lm(tokens_BT, mask_BT), mask_BT)
    return self.head(pooled_BD.astype(jnp.float32)).astype(jnp.float32)
