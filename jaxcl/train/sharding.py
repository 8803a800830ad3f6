"""Device mesh, parameter sharding rules, sharded batches and the multi-host start.

Distribution is ``jax.jit`` over arrays placed with ``NamedSharding`` on one mesh with the axes

  ``data``   pure data parallelism (weights replicated),
  ``fsdp``   data parallelism whose weights are also split (gathered by XLA where a layer uses them),
  ``tensor`` Megatron-style splitting of the projections inside a layer,

built with ``Auto`` axis types: placement is explicit at the inputs and XLA propagates it through
the step. Batches are split over ``('data', 'fsdp')``.

Weight rules (by the parameter's path in ``nnx.to_pure_dict`` of a Llama or T5, applied to the
trailing dimensions, so stacked ``(num_layers, ...)`` weights keep their layer axis whole):

  projections into a layer (``q k v gate up wi wi_0 wi_1``), ``(d_in, d_out)``: ``(fsdp, tensor)``
  projections out of a layer (``o down wo``), ``(d_in, d_out)``:               ``(tensor, fsdp)``
  token embedding (``embed``, ``shared``), ``(vocab, d)``:                     ``(tensor, fsdp)``
  ``lm_head``, ``(d, vocab)``:                                                 ``(fsdp, tensor)``
  everything else (norms, the T5 relative-position table, scalars):           replicated

Adapters follow their base weight: a leaf named ``a`` (``(..., r, d_in)``, the LoRA layout of
``jaxcl.kernels.lora``) under a site key such as ``attn.q`` is split along ``d_in`` like the site's
weight, and a leaf named ``b`` (``(..., d_out, r)``) along ``d_out``; other method-state leaves are
replicated. The same rules place optimizer states (their paths end like the parameter's). A mesh axis
that does not divide a dimension leaves that dimension whole (tiny test models stay placeable).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Environment that starts a multi-host run (``jax.distributed.initialize`` reads the address itself).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXCL_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXCL_PROCESS_ID"

_INTO_LAYER = r"q|k|v|gate|up|wi|wi_0|wi_1"
_OUT_OF_LAYER = r"o|down|wo"
# (pattern on the last path key, spec of the trailing dims)
_WEIGHT_RULES = (
    (re.compile(rf"(?:^|_)(?:{_INTO_LAYER})$"), ("fsdp", "tensor")),
    (re.compile(rf"(?:^|_)(?:{_OUT_OF_LAYER})$"), ("tensor", "fsdp")),
    (re.compile(r"^(?:embed|shared)$"), ("tensor", "fsdp")),
    (re.compile(r"^lm_head$"), ("fsdp", "tensor")),
)
# An adapter site key (``attn.q``, ``encoder.self_attn.v``, ``decoder.mlp.wi_0``) -> its projection.
_SITE = re.compile(r"^(?:[a-z_]+\.)+([a-z_0-9]+)$")


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


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _trailing(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` on the last ``len(spec)`` dims of ``shape``, in the canonical form XLA gives outputs.

    Axes of size 1 and axes that do not divide their dimension are dropped, and so are trailing
    ``None``s: a jitted step whose outputs come back with exactly its input shardings compiles once.
    """
    if len(shape) < len(spec):
        return PartitionSpec()
    lead = (None,) * (len(shape) - len(spec))
    fitted = [axis if axis is not None and mesh.shape[axis] > 1 and shape[len(lead) + i] % mesh.shape[axis] == 0
              else None for i, axis in enumerate(spec)]
    dims = list(lead) + fitted
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def _projection_spec(name: str) -> Optional[tuple]:
    for pattern, spec in _WEIGHT_RULES[:2]:
        if pattern.search(name):
            return spec
    return None


def leaf_spec(path: Sequence[str], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of one array by its path keys (see the module docstring)."""
    if not path or not shape:
        return PartitionSpec()
    last = path[-1]
    if last in ("a", "b") and len(path) >= 2:
        site = next((k for k in reversed(path[:-1]) if _SITE.match(k)), None)
        if site is not None:
            weight_spec = _projection_spec(_SITE.match(site).group(1))
            if weight_spec is None:
                return PartitionSpec()
            # a: (..., r, d_in) follows the weight's d_in axis; b: (..., d_out, r) its d_out axis.
            spec = (weight_spec[0],) if last == "a" else (weight_spec[1], None)
            return _trailing(spec, shape, mesh)
    for pattern, spec in _WEIGHT_RULES:
        if pattern.search(last):
            return _trailing(spec, shape, mesh)
    return PartitionSpec()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """A ``NamedSharding`` for every array leaf of ``tree`` (params, method or optimizer state)."""
    def sharding(path, leaf):
        keys = [_key_name(k) for k in path]
        return NamedSharding(mesh, leaf_spec(keys, tuple(np.shape(leaf)), mesh))
    return jax.tree_util.tree_map_with_path(sharding, tree)


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    # Every process holds the same full value; each one contributes its own devices' pieces.
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(mesh: Mesh, tree: Any) -> Any:
    """``tree`` with every array leaf placed by the rules (``None`` leaves stay ``None``)."""
    return jax.tree.map(_put, tree, tree_shardings(mesh, tree))


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
