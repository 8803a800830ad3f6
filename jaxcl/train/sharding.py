"""Device mesh, parameter sharding rules, sharded batches and the multi-host start.

Distribution is ``jax.jit`` over arrays placed with ``NamedSharding`` on one mesh with the axes

  ``data``   pure data parallelism (weights replicated),
  ``fsdp``   data parallelism whose weights are also split (gathered by XLA where a layer uses them),
  ``tensor`` Megatron-style splitting of the projections inside a layer,

built with ``Auto`` axis types: placement is explicit at the inputs and XLA propagates it through
the step. Batches are split over ``('data', 'fsdp')``.

Weights and every method's state declare the logical name of each array dimension where they are
created (the models' weight tables, ``jaxcl.methods.axes.logical``); one table, ``RULES``, maps
the names to mesh axes:

  ``embed`` (the model width), ``mask`` (MIST's entries), ``expansion`` (Any-SSR's features): ``fsdp``
  ``q_heads``, ``kv_heads``, ``mlp``, ``vocab``: ``tensor``, else ``fsdp``
  everything else (``layers``, ``tasks``, ``rank``, ``experts``, ...): never split

A dimension takes its first mesh axis when no other dimension of the array took it, and its later
ones in a second pass: a projection ``(embed, q_heads)`` is ``(fsdp, tensor)``, its LoRA ``b``
``(q_heads, rank)`` is ``((tensor, fsdp), -)``, so under ``fsdp`` every large leaf is split. A mesh
axis that does not divide a dimension leaves it whole (tiny test models stay placeable). Optimizer
states follow their parameters: a leaf of the state whose path ends with a parameter's path and has
its shape gets that parameter's sharding; the rest (step counts) is replicated.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcl.methods.axes import Axes

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Environment that starts a multi-host run (``jax.distributed.initialize`` reads the address itself).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXCL_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXCL_PROCESS_ID"

# logical axis -> mesh axes, in order of preference
RULES = {
    "embed": ("fsdp",), "mask": ("fsdp",), "expansion": ("fsdp",),
    "q_heads": ("tensor", "fsdp"), "kv_heads": ("tensor", "fsdp"), "mlp": ("tensor", "fsdp"),
    "vocab": ("tensor", "fsdp"),
}


class MeshError(ValueError):
    """The mesh does not fit the devices, or a batch does not split over it."""


def initialize_distributed(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Join a multi-host run when the environment names a coordinator; a no-op otherwise.

    Reads ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAXCL_NUM_PROCESSES`` and
    ``JAXCL_PROCESS_ID`` (left to JAX's cluster detection, e.g. SLURM, when unset). CPU processes
    exchange collectives through gloo. Must run before anything touches a JAX backend.

    Returns:
      True when this process is (now) part of a multi-process run.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    address = env.get(COORDINATOR_ENV)
    if not address:
        return False

    def integer(name: str) -> Optional[int]:
        value = env.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise MeshError(f"environment variable {name}: expected an integer, got {value!r}") from None

    num_processes, process_id = integer(NUM_PROCESSES_ENV), integer(PROCESS_ID_ENV)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    return True


def make_mesh(config: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ``('data', 'fsdp', 'tensor')`` mesh of ``config`` (a ``MeshConfig``) over ``devices``.

    Args:
      config: sizes ``data``, ``fsdp``, ``tensor``; one of them may be -1 (all remaining devices).
      devices: the devices (all of ``jax.devices()`` by default, every process's in a multi-host run).

    Raises:
      MeshError: naming the sizes and the device count when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(s) for s in dataclasses.astuple(config)]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) == 1:
        if known <= 0 or len(devices) % known:
            raise MeshError(f"mesh {dict(zip(AXES, sizes))}: {len(devices)} devices do not split into "
                            f"groups of {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s <= 0 for s in sizes) or int(np.prod(sizes)) != len(devices):
        raise MeshError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                        f"there are {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices)


def logical_spec(names: Sequence[Optional[str]], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions have the logical ``names`` (see ``RULES``).

    Trailing ``None``s are dropped (the canonical form XLA gives outputs, so a jitted step whose
    outputs come back with its input shardings compiles once).
    """
    if len(names) != len(shape):
        raise ValueError(f"sharding: {len(names)} axis names {tuple(names)} for shape {shape}")
    dims: list[list[str]] = [[] for _ in shape]
    used: set[str] = set()
    size = [int(n) for n in shape]
    for rank in range(2):  # first choices first, then second choices
        for i, name in enumerate(names):
            options = RULES.get(name, ())
            if rank < len(options):
                axis = options[rank]
                ways = int(np.prod([mesh.shape[a] for a in dims[i]] or [1])) * mesh.shape[axis]
                if axis not in used and mesh.shape[axis] > 1 and size[i] % ways == 0:
                    dims[i].append(axis)
                    used.add(axis)
    spec = [None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in dims]
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, Axes)


def tree_shardings(mesh: Mesh, values: Any, axes: Any) -> Any:
    """A ``NamedSharding`` for every array leaf of ``values`` from the ``Axes`` leaves of ``axes``
    (same structure; ``None`` leaves of ``values`` stay ``None``)."""
    return jax.tree.map(lambda a, v: NamedSharding(mesh, logical_spec(a.names, tuple(np.shape(v)), mesh)),
                        axes, values, is_leaf=_is_axes)


def follow_params(mesh: Mesh, state: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has its
    shape gets that parameter's sharding, every other leaf is replicated."""
    table = {}
    for (path, value), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                       jax.tree.leaves(param_shardings)):
        table[jax.tree_util.keystr(path)] = (tuple(np.shape(value)), sharding)

    longest_first = sorted(table.items(), key=lambda item: -len(item[0]))

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, (shape, sharding) in longest_first:
            if key.endswith(suffix) and tuple(np.shape(leaf)) == shape:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, state)


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    # Every process holds the same full value; each one contributes its own devices' pieces.
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` with every array leaf placed by ``shardings`` (``None`` leaves stay ``None``)."""
    return jax.tree.map(_put, tree, shardings)


def abstract(tree: Any, shardings: Any) -> Any:
    """What ``place(tree, shardings)`` would give, as ``jax.ShapeDtypeStruct`` leaves (nothing moved)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s,
                                                          weak_type=bool(getattr(x, "weak_type", False))),
                        tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole (e.g. outputs read back on every host)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split dimension ``batch_axis`` of an ``ndim``-dim array over ``('data', 'fsdp')``."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the ``data`` and ``fsdp`` sizes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(mesh: Mesh, size: int, field: str) -> None:
    """Raise ``MeshError`` naming the config ``field`` unless ``size`` splits evenly over the mesh."""
    ways = batch_parallelism(mesh)
    if size % ways:
        raise MeshError(f"{field} = {size} must be a multiple of mesh data x fsdp = {ways}")


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], batch_axis: int = 0) -> slice:
    """The rows (along ``batch_axis``) that this process's devices hold: one contiguous range."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    spans = sorted({index[batch_axis].indices(global_shape[batch_axis])[:2] for index in indices})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise MeshError(f"this process's batch rows {spans} are not one contiguous range")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], batch_axis: int = 0) -> dict[str, jax.Array]:
    """Global arrays from a batch that every process computes in full (host-side numpy).

    Each process hands over only its own rows (``jax.make_array_from_process_local_data``), as a
    per-host data loader would.

    Args:
      mesh: the mesh.
      batch: ``{name: array}`` whose dimension ``batch_axis`` is the global batch.
      batch_axis: the batch dimension (1 for the ``(grad_accum, micro, ...)`` train batches).
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim, batch_axis)
        rows = local_rows(sharding, value.shape, batch_axis)
        local = value[(slice(None),) * batch_axis + (rows,)]
        out[name] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out
