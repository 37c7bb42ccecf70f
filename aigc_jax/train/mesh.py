"""The device mesh and the rules that map logical axis names to its axes.

Three named mesh axes: `data` (batch split, parameters whole), `fsdp` (batch split,
parameters and optimizer state split too: ZeRO-3 / FSDP) and `tensor` (Megatron-style
tensor parallelism: attention heads, MLP width and vocabulary split). A run config's
`mesh` section sets their sizes (one may be -1: the devices left over) and the rules
table: logical name -> mesh axes ('' for none, 'fsdp', or 'data,fsdp'). A replicated run
is the same code with every parameter name mapped to '' (or every axis but `data` of
size 1).
"""

from __future__ import annotations

import math
import sys

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax.errors import UserError, did_you_mean
from aigc_jax.nn.partitioning import LOGICAL_AXES

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a global batch's rows are split over both

# FSDP over 'fsdp' (each weight's embedding or output-channel axis), Megatron tensor
# parallelism over 'tensor' (column-parallel Q/K/V/gate/up, row-parallel O/down,
# vocab-parallel embedding and output layer); small vectors stay whole.
DEFAULT_RULES = {
    "vocab": TENSOR_AXIS, "embed": FSDP_AXIS, "heads": TENSOR_AXIS, "kv_heads": TENSOR_AXIS,
    "mlp": TENSOR_AXIS, "norm": "", "lora_rank": "", "classes": "",
    "conv_in": "", "conv_out": FSDP_AXIS, "dense_in": "", "dense_out": FSDP_AXIS,
    "image_channels": "", "out": "",
    "act_batch": "data,fsdp", "act_length": "", "act_embed": "", "act_heads": TENSOR_AXIS,
    "act_kv_heads": TENSOR_AXIS, "act_mlp": TENSOR_AXIS, "act_vocab": TENSOR_AXIS,
}
assert set(DEFAULT_RULES) == set(LOGICAL_AXES)


def default_mesh_config() -> dict:
  """The `mesh` section every family's config has."""
  return dict(num_devices=-1,  # devices the mesh uses (-1: all)
              data=-1, fsdp=1, tensor=1,  # axis sizes; one -1 takes the devices left
              rules=dict(DEFAULT_RULES))


def axis_sizes(mesh_cfg, num_devices: int | None = None) -> dict[str, int]:
  """{axis: size} from a `mesh` section for `num_devices` devices (None: what
  mesh.num_devices and JAX say), with -1 resolved; UserError when they do not fit."""
  available = jax.device_count()
  n = mesh_cfg.get("num_devices", -1) if num_devices is None else num_devices
  n = available if n in (-1, 0) else n
  if not 1 <= n <= available:
    raise UserError(f"config 'mesh.num_devices'={n}, but JAX sees {available} device(s)")
  if n != available and jax.process_count() > 1:
    raise UserError("config 'mesh.num_devices' must be -1 (all devices) with several "
                    "processes")
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  free = [a for a, s in sizes.items() if s == -1]
  if bad or len(free) > 1:
    raise UserError(f"config 'mesh' axis sizes {sizes} must be positive, with at most one "
                    "-1 (the devices left over)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % known:
      raise UserError(f"config 'mesh' axis sizes {sizes}: the fixed sizes multiply to "
                      f"{known}, which does not divide the {n} devices")
    sizes[free[0]] = n // known
  elif known != n:
    raise UserError(f"config 'mesh' axis sizes {sizes} multiply to {known}, but the mesh "
                    f"has {n} devices: make data x fsdp x tensor = {n} (or set one to -1)")
  return sizes


def make_mesh(mesh_cfg=None, num_devices: int | None = None) -> Mesh:
  """The run's (data, fsdp, tensor) mesh, laid out by `jax.make_mesh` for the hardware.

  `mesh_cfg`: a config's `mesh` section (None: data parallel over `num_devices`); an int
  is read as `num_devices` with data parallelism (the older call)."""
  if mesh_cfg is None or isinstance(mesh_cfg, int):
    num_devices = mesh_cfg if isinstance(mesh_cfg, int) else num_devices
    mesh_cfg = {"data": -1, "fsdp": 1, "tensor": 1,
                "num_devices": -1 if num_devices is None else num_devices}
  sizes = axis_sizes(mesh_cfg, num_devices)
  shape = tuple(sizes[a] for a in MESH_AXES)
  devices = jax.devices()[:math.prod(shape)]
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def make_mesh_for_reading(mesh_cfg) -> Mesh:
  """The run's mesh, or, when this machine cannot build it (a run trained on more
  devices), data parallelism over the devices it has: checkpoints restore onto any mesh,
  so evaluation and sampling need not match the training topology (said on stderr)."""
  try:
    return make_mesh(mesh_cfg)
  except UserError as e:
    print(f"note: {e}; evaluating on the {jax.device_count()} device(s) here instead",
          file=sys.stderr)
    return make_mesh(None)


def rules_from_config(mesh_cfg) -> dict[str, tuple[str, ...]]:
  """{logical name: tuple of mesh axes} from a `mesh.rules` section (strings: '' none,
  'fsdp', 'data,fsdp'); UserError for an unknown name or axis."""
  raw = mesh_cfg.get("rules", DEFAULT_RULES) if mesh_cfg is not None else DEFAULT_RULES
  raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
  rules = {}
  for name, value in raw.items():
    if name not in LOGICAL_AXES:
      raise UserError(f"config 'mesh.rules' has an unknown logical axis name "
                      f"{name!r}{did_you_mean(name, LOGICAL_AXES)}; known: "
                      f"{', '.join(LOGICAL_AXES)}")
    axes = tuple(a.strip() for a in (value or "").split(",") if a.strip())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown or len(set(axes)) != len(axes):
      raise UserError(f"config 'mesh.rules.{name}'={value!r}: each entry must be one of the "
                      f"mesh axes {MESH_AXES}, at most once ('' for none)")
    rules[name] = axes
  return {**{n: () for n in LOGICAL_AXES if n not in rules}, **rules}


def shards_of(name: str, mesh: Mesh, rules: dict) -> int:
  """Into how many pieces the rules split a dimension with logical name `name`."""
  return math.prod(mesh.shape.get(a, 1) for a in rules.get(name, ()))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a whole copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over (those of `data`, `fsdp` it has)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data' and 'fsdp'."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces a batch is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """Raises UserError unless `batch_size` splits evenly over the batch axes."""
  n = batch_shards(mesh)
  if batch_size % n:
    raise UserError(f"{field}={batch_size} is not divisible by the {n} devices of the mesh "
                    f"axes data x fsdp: use a multiple of {n}")


def host_rows(global_batch: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this process's devices hold (contiguous: devices
  are ordered by process along the batch axes); all rows with one process."""
  if jax.process_count() == 1:
    return slice(0, global_batch)
  sharding = batch_sharding(mesh)
  indices = sharding.addressable_devices_indices_map((global_batch,)).values()
  starts = sorted({idx[0].start or 0 for idx in indices})
  stops = sorted({idx[0].stop or global_batch for idx in indices})
  start, stop = starts[0], stops[-1]
  if stop - start != len(starts) * (global_batch // batch_shards(mesh)):
    raise UserError("this process's devices do not hold one contiguous block of the batch: "
                    "order the mesh's devices by process")
  return slice(start, stop)


def put_batch(batch, mesh: Mesh):
  """Host arrays -> global arrays with rows split over 'data' and 'fsdp'. `batch` holds
  the whole global batch, or (several processes) only this process's rows
  (`host_rows`)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def put_replicated(tree, mesh: Mesh):
  """`tree` placed whole on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))
