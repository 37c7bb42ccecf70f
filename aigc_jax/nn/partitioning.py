"""Logical axis names: parameters and activations say what their dimensions mean
('vocab', 'embed', 'heads', ...); a rules table elsewhere (`aigc_jax.train.mesh`) maps the
names to mesh axes. Modules need no mesh: the names are metadata on the parameters (NNX's
`out_sharding`, so `nnx.get_partition_spec` reads them), and `constrain` does nothing
unless a caller has opened `activation_sharding` around tracing.

Parameter names (MaxText's vocabulary where it has one):
  vocab, embed, heads (query heads x head_dim, flattened), kv_heads (likewise), mlp,
  norm, lora_rank, classes; convolutions: conv_in, conv_out (kernel height and width are
  unnamed); dense layers of conv nets: dense_in, dense_out; image channels (a model's
  input or output pixels) and scalar outputs: image_channels, out.
Activation names are separate, so that an activation's embedding axis is not split the
way a weight's is: act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp,
act_vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from flax import nnx

from aigc_jax.errors import UserError

Names = tuple  # one logical name (or None) per dimension

PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp", "norm", "lora_rank", "classes",
              "conv_in", "conv_out", "dense_in", "dense_out", "image_channels", "out")
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads",
                   "act_mlp", "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
# NNX's metadata key for the names; older Flax releases used the other two.
_METADATA_KEYS = ("out_sharding", "sharding", "sharding_names")


def annotate(variable: nnx.Variable, names: Sequence[str | None]) -> nnx.Variable:
  """Records one logical name (or None: never split) per dimension of `variable`;
  returns it."""
  names = tuple(names)
  shape = getattr(variable[...], "shape", ())
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match a parameter of shape {shape}")
  unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; known: {LOGICAL_AXES}")
  variable.set_metadata("out_sharding", names)
  # The names are logical, not mesh axes: NNX must not shard the value (or copies such as
  # nnx.Optimizer's moments) itself when a variable is created.
  variable.set_metadata("eager_sharding", False)
  return variable


def variable_names(variable: nnx.Variable) -> Names:
  """The logical names of a variable (all None when it has none)."""
  metadata = variable.get_metadata()
  for key in _METADATA_KEYS:
    names = metadata.get(key)
    if names:
      return tuple(names)
  return (None,) * len(getattr(variable[...], "shape", ()))


def param_names(module: nnx.Module) -> dict:
  """Pure dict mirroring `nnx.to_pure_dict(nnx.state(module, nnx.Param))`: each leaf the
  parameter's tuple of logical names. Works on abstract modules (`nnx.eval_shape`)."""
  state = nnx.state(module, nnx.Param)
  named = jax.tree.map(variable_names, state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return _to_nested_dict(named)


def _to_nested_dict(state) -> dict:
  if isinstance(state, tuple):
    return state
  items = state.items() if hasattr(state, "items") else state
  return {k: _to_nested_dict(v) for k, v in dict(items).items()}


def annotate_layers(module: nnx.Module, overrides: dict[str, Names] | None = None) -> None:
  """Names every unnamed parameter of a conv net by its layer type: convolution kernels
  (..., conv_in, conv_out), dense kernels (dense_in, dense_out), biases and norm scales by
  their output axis. `overrides`: {dotted parameter path: names} for parameters whose
  axes mean something else (a layer that outputs image channels or one logit)."""
  overrides = dict(overrides or {})
  for path, variable in nnx.iter_graph(module):
    if not isinstance(variable, nnx.Param):
      continue
    key = ".".join(map(str, path))
    if key in overrides:
      annotate(variable, overrides.pop(key))
      continue
    if any(n is not None for n in variable_names(variable)):
      continue
    ndim = len(variable[...].shape)
    if ndim >= 3:  # a convolution kernel [*window, in, out]
      annotate(variable, (None,) * (ndim - 2) + ("conv_in", "conv_out"))
    elif ndim == 2:
      annotate(variable, ("dense_in", "dense_out"))
    elif ndim == 1:
      annotate(variable, ("conv_out",))
  if overrides:
    raise ValueError(f"annotate_layers: no parameters at {sorted(overrides)}")


# --- activations --------------------------------------------------------------------------

_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules",
                                                                  default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: dict) -> Iterator[None]:
  """Within this context, `constrain` pins activations to `mesh` by `rules` ({logical
  name: mesh axis, tuple of axes, or None}). Open it around tracing (`jit(...).lower`)."""
  token = _ACTIVATION_RULES.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` with a sharding constraint from its logical names under the enclosing
  `activation_sharding`; `x` unchanged outside one (a module used on its own)."""
  current = _ACTIVATION_RULES.get()
  if current is None:
    return x
  mesh, rules = current
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match an activation of shape "
                     f"{x.shape}")
  spec = []
  for name, size in zip(names, x.shape, strict=True):
    axes = rules.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    # An activation dimension that does not split evenly (a batch of 1 while sampling)
    # stays whole rather than failing.
    n = 1
    for axis in axes:
      n *= mesh.shape[axis]
    spec.append(axes if axes and size % n == 0 else None)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  return jax.lax.with_sharding_constraint(x, sharding)


def check_names(names: Sequence[str], what: str) -> None:
  """Raises UserError for a name that is not a logical axis."""
  unknown = [n for n in names if n not in LOGICAL_AXES]
  if unknown:
    raise UserError(f"{what}: unknown logical axis name(s) {unknown}; known: "
                    f"{list(LOGICAL_AXES)}")
