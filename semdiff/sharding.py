"""Device mesh and shardings: one parallelism path, jit over a `Mesh`.

The mesh has a data axis and a fully-sharded-parameter axis (``data``,
``fsdp``). Batches are split along ``data`` x ``fsdp`` (every device holds a
distinct slice of the batch); parameters and optimiser state are split along
``fsdp`` through logical axis rules, so memory per device falls with the fsdp
size while the computation stays data-parallel.
"""

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis. Unlisted axes are replicated.
LOGICAL_RULES = {"embed": "fsdp"}


def make_mesh(config, devices=None) -> Mesh:
  """The mesh from ``config.mesh`` (one of data/fsdp may be -1: the rest).

  Raises one clear ValueError when the shape does not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [int(config.mesh.data), int(config.mesh.fsdp)]
  if shape.count(-1) > 1:
    raise ValueError(f"At most one of mesh.data/mesh.fsdp may be -1, got {shape}.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or n % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not fit {n} devices: "
                       f"{n} is not divisible by {known}.")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n or min(shape) < 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices "
                     f"but {n} are available; set --config.mesh.data/--config.mesh.fsdp so "
                     f"that their product is {n} (or one of them -1).")
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """The batch splits evenly over the devices (and, per device, over the micro-batches)."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % devices:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the {devices} "
                     f"devices of the mesh {dict(mesh.shape)}; use a multiple of {devices}.")
  if grad_accum_steps < 1:
    raise ValueError(f"train.grad_accum_steps={grad_accum_steps} must be at least 1.")
  if batch_size % (devices * grad_accum_steps):
    raise ValueError(f"train.batch_size={batch_size} does not split into "
                     f"train.grad_accum_steps={grad_accum_steps} micro-batches over the "
                     f"{devices} devices of the mesh; use a multiple of "
                     f"{devices * grad_accum_steps}.")


def _spec_for(logical, shape, mesh: Mesh) -> P:
  axes = []
  for name, dim in zip(logical, shape):
    axis = LOGICAL_RULES.get(name) if name else None
    if axis is not None and (axis in axes or dim % mesh.shape[axis]):
      axis = None  # indivisible or already used: replicate this dimension
    axes.append(axis)
  return P(*axes)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for a parameter State, from its logical axis metadata."""
  def one(var):
    shape = var.get_value().shape
    logical = getattr(var, "out_sharding", None) or (None,) * len(shape)
    return NamedSharding(mesh, _spec_for(logical, shape, mesh))
  return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(abstract_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings of a train state {params, opt_state, step, rng}.

  Optimiser moments mirror the parameters: an ``opt_state`` leaf whose path
  ends with a parameter's path (optax nests ``mu``/``nu`` trees shaped like the
  parameters) gets that parameter's sharding; everything else is replicated.
  """
  flat_params = {tuple(map(str, k)): v
                 for k, v in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}

  def for_leaf(path, _):
    keys = tuple(map(str, path))
    if keys and keys[-1] == ".value":  # an nnx.Variable flattens to its value
      keys = keys[:-1]
    for i in range(1, len(keys)):
      match = flat_params.get(keys[i:])
      if match is not None:
        return match
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """A global jax.Array batch from this process's slice (NumPy, copied)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
