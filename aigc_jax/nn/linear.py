"""A bias-free dense layer with an optional low-rank adapter (LoRA, Hu et al. 2021).

y = x @ kernel + (alpha / rank) * dropout(x) @ lora.a @ lora.b

The adapter is added to a built model by `add_lora` (so the base weights keep their
paths, `...q_proj.kernel`, and load from pretrained files unchanged); `lora.b` starts at
zero, so at initialization the model computes exactly what the base model computes. The
adapter's dropout is module-held (`dropout_layer`): `model.train()` turns it on,
`model.eval()` off.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.nn.dense import dense
from aigc_jax.nn.partitioning import annotate, variable_names


def dropout_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """`nnx.Dropout(rate)` built in evaluation mode (`model.train()` turns it on) and holding
  its own key stream, tagged 'dropout' (so `nnx.reseed(model, dropout=key)` reseeds it),
  forked from the 'dropout' stream of `rngs` (or its default stream). With rate 0 it holds
  no stream and never draws."""
  if not rate:
    return nnx.Dropout(rate, deterministic=True)
  try:
    key = rngs.dropout()
  except (AttributeError, KeyError) as e:
    raise UserError(f"dropout {rate} needs a 'dropout' key stream: build the model with "
                    "rngs=nnx.Rngs(params=..., dropout=...) (or nnx.Rngs(seed))") from e
  return nnx.Dropout(rate, deterministic=True, rngs=nnx.RngStream(key, tag="dropout"))


class LoraAdapter(nnx.Module):
  """a [I, r] (Kaiming-uniform, as PEFT) and b [r, O] (zeros), scaled by alpha / r;
  `axes`: the logical names of the adapted kernel's (I, O) axes."""

  def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
               dropout: float, *, axes=(None, None), rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_features)
    self.a = annotate(nnx.Param(jax.random.uniform(rngs.params(), (in_features, rank),
                                                   jnp.float32, -bound, bound)),
                      (axes[0], "lora_rank"))
    self.b = annotate(nnx.Param(jnp.zeros((rank, out_features), jnp.float32)),
                      ("lora_rank", axes[1]))
    self.scale = alpha / rank
    self.dropout = dropout_layer(dropout, rngs)

  def __call__(self, x_NI):
    x_NI = self.dropout(x_NI)
    h_NR = dense(x_NI, self.a[...].astype(x_NI.dtype))
    return dense(h_NR, (self.scale * self.b[...]).astype(x_NI.dtype))


class Linear(nnx.Module):
  """x [..., I] -> [..., O] in the compute `dtype`; the kernel is stored in `param_dtype`.
  Initialised as `nnx.Linear` (LeCun normal, same key use), so the two load each other's
  weights. `axes`: the kernel's logical axis names (see `nn.partitioning`)."""

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, kernel_init=None, axes=(None, None),
               rngs: nnx.Rngs):
    kernel_init = kernel_init or nnx.initializers.lecun_normal()
    self.kernel = annotate(nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                                 param_dtype)), axes)
    self.dtype = dtype
    self.lora: LoraAdapter | None = nnx.data(None)  # a submodule once `add_lora` adds it

  def __call__(self, x_NI: jax.Array) -> jax.Array:
    x_NI = x_NI.astype(self.dtype)
    y_NO = dense(x_NI, self.kernel[...].astype(self.dtype))
    if self.lora is not None:
      y_NO = y_NO + self.lora(x_NI)
    return y_NO

  def merged_kernel(self) -> jax.Array:
    """kernel [I, O] (+ alpha / r * a @ b with an adapter) in the compute dtype: the
    matrix this layer multiplies by when its adapter's dropout is off."""
    kernel = self.kernel[...]
    if self.lora is not None:
      kernel = kernel + self.lora.scale * (self.lora.a[...] @ self.lora.b[...])
    return kernel.astype(self.dtype)


def module_paths(model: nnx.Module, kind=Linear) -> dict[str, nnx.Module]:
  """{'blocks.0.attn.q_proj': module, ...}: every `kind` submodule by its dotted path."""
  return {".".join(map(str, path)): m for path, m in nnx.iter_graph(model)
          if isinstance(m, kind) and path}


def match_paths(paths, patterns, what: str) -> list[str]:
  """The paths that any pattern (a regular expression, `re.search`) matches; a pattern
  that matches nothing is an error listing a few of the paths there are."""
  paths = list(paths)
  matched = set()
  for pattern in patterns:
    try:
      hits = [p for p in paths if re.search(pattern, p)]
    except re.error as e:
      raise UserError(f"{what} pattern '{pattern}' is not a regular expression ({e})") from e
    if not hits:
      kinds = sorted({re.sub(r"\.\d+\.", ".N.", p) for p in paths})  # one per layer kind
      examples = ", ".join(kinds[:12]) + (", ..." if len(kinds) > 12 else "")
      raise UserError(f"{what} pattern '{pattern}' matches nothing; the paths look like: "
                      f"{examples}")
    matched.update(hits)
  return [p for p in paths if p in matched]


def add_lora(model: nnx.Module, targets, rank: int, alpha: float, dropout: float = 0.0, *,
             rngs: nnx.Rngs) -> list[str]:
  """Adds a rank-`rank` adapter to every `Linear` whose path matches a target pattern
  (e.g. r'attn\\.(q|v)_proj$'); returns the adapted paths. The adapters' dropout starts in
  the model's mode (training if any of its dropout layers is on); a dropout > 0 needs a
  'dropout' stream in `rngs`."""
  if rank < 1:
    raise UserError(f"LoRA rank must be >= 1, got {rank}")
  layers = module_paths(model)
  paths = match_paths(layers, targets, "LoRA target")
  deterministic = all(m.deterministic for _, m in nnx.iter_graph(model)
                      if isinstance(m, nnx.Dropout))
  for path in paths:
    layer = layers[path]
    in_features, out_features = layer.kernel.shape
    layer.lora = LoraAdapter(in_features, out_features, rank, alpha, dropout,
                             axes=variable_names(layer.kernel), rngs=rngs)
    layer.lora.dropout.deterministic = deterministic
  return paths


def merge_lora(params: dict, alpha: float) -> dict:
  """Pure-dict parameters with every adapter folded into its kernel
  (kernel + alpha / r * a @ b) and removed: the base model's layout, for export."""
  if not isinstance(params, dict):
    return params
  out = {k: merge_lora(v, alpha) for k, v in params.items() if k != "lora"}
  if "lora" in params:
    a, b = params["lora"]["a"], params["lora"]["b"]
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    out["kernel"] = params["kernel"] + (alpha / a.shape[1]) * delta
  return out
