"""Compute dtypes by config name. Parameters stay float32; layers compute in the chosen
dtype and the models return float32 outputs, so losses and metrics run in float32."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def layer_dtype(name: str):
  """The `dtype` to give Flax layers: None for float32 (they follow their inputs and
  parameters, so float64 checks stay float64), else the 16-bit type."""
  return None if name == "float32" else DTYPES[name]


def at_least_float32(x):
  """16-bit activations back to float32 (float32 and float64 unchanged)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
