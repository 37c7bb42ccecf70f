"""The train state's shardings, derived from its parameters' logical axis names.

A family names the axes of its parameters (`Family.param_names()`: a pure dict like the
parameters, each leaf a tuple of logical names); the mesh's rules turn the names into a
`PartitionSpec` per parameter. The rest of the state inherits: every part of it (optimizer
moments, an EMA copy, frozen base weights, a second optimizer's state) whose nested-dict
structure and shapes equal those of the parameters, or of a sub-dict of them, takes the
matching parameters' shardings; anything else (step counters, keys, small statistics) is
replicated. Nothing is materialised before its sharding is known: the loop evaluates the
state's shapes with `jax.eval_shape` and initialises it under `jax.jit` with these
shardings as `out_shardings`.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax.errors import UserError


def logical_spec(names: tuple, shape: tuple, mesh: Mesh, rules: dict, path: str) -> P:
  """The PartitionSpec of one parameter: each named dimension split over the mesh axes
  the rules give it. UserError (naming the parameter) when a dimension does not divide
  evenly or a mesh axis would split two dimensions."""
  if len(names) != len(shape):
    raise UserError(f"parameter '{path}' has shape {shape} but {len(names)} logical names "
                    f"{names}")
  spec, used = [], {}
  for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
    axes = tuple(a for a in (rules.get(name, ()) if name else ()) if mesh.shape.get(a, 1) > 1)
    for axis in axes:
      if axis in used:
        raise UserError(f"parameter '{path}': mesh axis '{axis}' would split both its "
                        f"'{used[axis]}' and '{name}' dimensions: map one of them to another "
                        "axis (or '') in mesh.rules")
      used[axis] = name
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
      sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise UserError(f"parameter '{path}' dimension {dim} ('{name}', size {size}) does not "
                      f"split over the mesh axes {sizes}: choose sizes it divides, or map "
                      f"'{name}' to '' in mesh.rules")
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _dict_paths(tree, prefix=()):
  """(path tuple, value) for every nested-dict node and leaf of `tree`."""
  yield prefix, tree
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _dict_paths(value, (*prefix, key))


def _signature(tree):
  """Structure, shapes and dtypes: two trees with equal signatures can share shardings."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x))))
                        for x in leaves)


def param_shardings(params, names, mesh: Mesh, rules: dict):
  """A tree like `params` (a nested dict of arrays or ShapeDtypeStructs) of
  NamedShardings from the logical `names` (a nested dict mirroring a superset of
  `params`: the model's full parameter dict); names=None: all replicated."""

  flat = {".".join(map(str, path)): node for path, node in _dict_paths(names or {})
          if isinstance(node, tuple)}

  def one(path, leaf):
    dotted = ".".join(str(_key(k)) for k in path)
    shape = tuple(leaf.shape)
    leaf_names = flat.get(dotted, (None,) * len(shape))
    return NamedSharding(mesh, logical_spec(leaf_names, shape, mesh, rules, dotted))

  return jax.tree_util.tree_map_with_path(one, params)


def _key(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def state_shardings(abstract_state, names, mesh: Mesh, rules: dict):
  """NamedShardings for every leaf of a train state (abstract or concrete): parameters and
  frozen weights by their names; other parts by structure (see the module docstring)."""
  replicated = NamedSharding(mesh, P())
  params = getattr(abstract_state, "params", None)
  frozen = getattr(abstract_state, "frozen", None) or {}
  if params is None:
    return jax.tree.map(lambda _: replicated, abstract_state)
  param_sh = param_shardings(params, names, mesh, rules)
  frozen_sh = param_shardings(frozen, names, mesh, rules)
  table: dict = {}
  for tree, shardings in ((params, param_sh), (frozen, frozen_sh)):
    for path, node in _dict_paths(tree):
      sub_sh = shardings
      for key in path:
        sub_sh = sub_sh[key]
      sig = _signature(node)
      if sig in table and _specs(table[sig]) != _specs(sub_sh):
        table[sig] = None  # ambiguous: two parts with this shape, sharded differently
      elif sig not in table:
        table[sig] = sub_sh

  def inherit(node):
    match = table.get(_signature(node))
    return match if match is not None else jax.tree.map(lambda _: replicated, node)

  def is_match(node):
    return table.get(_signature(node)) is not None

  rest = {f: getattr(abstract_state, f) for f in ("step", "opt_state", "rng", "extra")}
  inherited = {f: jax.tree.map(inherit, v, is_leaf=is_match) for f, v in rest.items()}
  return abstract_state.replace(params=param_sh, frozen=frozen_sh, **inherited)


def _specs(shardings):
  return tuple(s.spec for s in jax.tree.leaves(shardings))


def device_bytes(tree) -> dict:
  """{device: bytes of `tree`'s shards on it} over this process's devices (each array's
  addressable shards, so nothing is gathered)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    for shard in leaf.addressable_shards:
      size = math.prod(len(range(*index.indices(dim)))
                       for index, dim in zip(shard.index, leaf.shape, strict=True))
      out[shard.device] = out.get(shard.device, 0) + size * leaf.dtype.itemsize
  return out


def max_device_bytes(tree) -> int:
  """The most bytes of `tree` any one (local) device holds."""
  per_device = device_bytes(tree)
  return max(per_device.values()) if per_device else 0
