"""Device mesh and shardings. One code path from 1 CPU to many devices: batches are
sharded over the 'data' axis, parameters and optimizer state replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (-1: all)."""
  devices = jax.devices()
  n = len(devices) if num_devices in (-1, 0) else num_devices
  if not 1 <= n <= len(devices):
    raise UserError(f"mesh.num_devices={num_devices}, but JAX sees {len(devices)} device(s)")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a whole copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """Raises UserError unless `batch_size` splits evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise UserError(f"{field}={batch_size} is not divisible by the {n} devices of the data "
                    f"axis: use a multiple of {n}")


def put_batch(batch, mesh: Mesh):
  """Host arrays of the whole global batch (every process builds the same one from the
  shared seed) -> global arrays sharded over 'data'; each process places only the rows of
  its own devices."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)


def put_replicated(tree, mesh: Mesh):
  """`tree` placed whole on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))
