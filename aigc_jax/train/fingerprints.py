"""A 64-bit fingerprint per array, computed on the devices that hold it: a wrapping sum
of hashes of (bits, global flat index), so it is bit-identical under any mesh or
sharding and nothing is gathered to the host but two 32-bit words per array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aigc_jax.errors import UserError

# Odd multipliers (bijections mod 2^32) and MurmurHash3's 32-bit finalizer: each element's
# hash is a bijection of its bits for a fixed index, so any single changed element changes
# the sum; two lanes make a 64-bit fingerprint.
_INDEX_MUL, _LANE_SEED = np.uint32(0x9E3779B1), np.uint32(0x27D4EB2F)
_LANE_MUL = (np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D))


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """The bits of `x` as uint32: x.shape for 1-, 2- and 4-byte dtypes (zero-extended),
  x.shape + (2,) for 8-byte ones; complex as (..., 2) real and imaginary parts."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:
    raise UserError(f"cannot fingerprint an array of dtype {x.dtype} in a checkpoint: store "
                    "it as a 1-, 2-, 4- or 8-byte dtype")
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint_one(x) -> jax.Array:
  """uint32 [2]: the wrapping sums over every element of two hashes of (bits, global flat
  index). Integer addition is associative, so the sum is the same bits whatever the
  sharding (each device sums its part; the partial sums are added)."""
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(words.ndim)):  # the row-major flat index, mod 2^32
    index = index + lax.broadcasted_iota(jnp.uint32, words.shape, dim) * np.uint32(stride)
    stride = stride * words.shape[dim] % 2**32
  key = _fmix32(index * _INDEX_MUL + np.uint32(1))
  lanes = (key, _fmix32(key ^ _LANE_SEED))
  return jnp.stack([jnp.sum(_fmix32((words ^ k) * m), dtype=jnp.uint32)
                    for k, m in zip(lanes, _LANE_MUL, strict=True)])


_fingerprint_leaves = jax.jit(lambda leaves: [_fingerprint_one(x) for x in leaves])


def fingerprints(tree) -> list[int]:
  """A 64-bit fingerprint per leaf of `tree` (in `jax.tree.leaves` order), computed by one
  compiled reduction on the devices that hold each array; only the scalars come to the
  host. Bit-identical for equal values under any mesh or sharding."""
  leaves = jax.tree.leaves(tree)
  groups: dict = {}  # one computation per device assignment (jit takes only one)
  for i, leaf in enumerate(leaves):
    groups.setdefault(_device_order(leaf), []).append(i)
  out = [0] * len(leaves)
  for indices in groups.values():
    sums = jax.device_get(_fingerprint_leaves([leaves[i] for i in indices]))
    for i, (lo, hi) in zip(indices, sums, strict=True):
      out[i] = int(hi) << 32 | int(lo)
  return out


def _device_order(leaf) -> tuple | None:
  """The device ids of a committed array in its sharding's order (None: uncommitted or a
  host value, which goes wherever the others are)."""
  if not (isinstance(leaf, jax.Array) and leaf.committed):
    return None
  sharding = leaf.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    return tuple(d.id for d in sharding.mesh.devices.flat)
  order = getattr(sharding, "_device_assignment", None) or sorted(
      sharding.device_set, key=lambda d: d.id)
  return tuple(d.id for d in order)


def fingerprint(x) -> int:
  """The 64-bit fingerprint of one array (see `fingerprints`)."""
  return fingerprints([x])[0]
