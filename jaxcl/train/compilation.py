"""XLA compilation: programs compiled ahead in parallel, the persistent compilation cache, and a
clock of the compilations of a run.

A run knows every shape its programs will see before its first step (``pipeline.Stream`` fixes
them), so it compiles them all at once (``Program.ahead``): each is traced on the calling thread
and handed to a pool of threads for XLA, which compiles without holding the GIL. The first call then
waits only for its own program, while the others go on compiling behind it.

The cache (JAX's own) is on by default in a user folder, so a second run of the same config skips
its compilations; the run config's ``compile_cache`` names another folder or turns it off (null),
and the environment variable ``JAXCL_COMPILE_CACHE`` (a folder, or ``off``) overrides both.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable, Hashable, Optional

import jax

DEFAULT_CACHE = os.path.join("~", ".cache", "jaxcl", "xla")
ENV = "JAXCL_COMPILE_CACHE"
_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_totals = {"seconds": 0.0, "count": 0}
_listening = False


def enable_cache(folder: Optional[str]) -> Optional[str]:
    """Point JAX's persistent compilation cache at ``folder`` (None: leave it off); returns the folder used."""
    env = os.environ.get(ENV)
    if env is not None:
        folder = None if env.lower() in ("", "off", "none", "0") else env
    if folder is None:
        return None
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # cache every program worth a lookup, not only those over JAX's default second
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return folder


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _compile_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1), "jaxcl-compile")
        return _pool


def signature(args: tuple) -> Hashable:
    """What an executable is compiled for: the tree structure of ``args`` and each leaf's shape,
    dtype, weak type and sharding (leaves are arrays or ``jax.ShapeDtypeStruct``)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                           getattr(x, "sharding", None)) for x in leaves)


class Program:
    """A jitted function with executables compiled ahead of its calls.

    ``ahead(*args)`` traces the function for ``args`` (arrays or ``jax.ShapeDtypeStruct``s with
    their shardings) and compiles it on a background thread; a later call whose arguments have the
    same ``signature`` runs that executable (waiting for it if it is still compiling). Any other call
    goes through the jit as usual and is counted in ``misses``.

    Examples:
      >>> import jax.numpy as jnp
      >>> double = Program(jax.jit(lambda x: 2 * x))
      >>> double.ahead(jnp.zeros(3, jnp.float32))  # (compiles; does not run)
      >>> double(jnp.ones(3, jnp.float32)).tolist(), double.misses
      ([2.0, 2.0, 2.0], 0)
      >>> double(jnp.ones(2, jnp.float32)).tolist(), double.misses
      ([2.0, 2.0], 1)
    """

    def __init__(self, jitted: Callable):
        self.jitted = jitted
        self.misses = 0
        self._ahead: dict[Hashable, concurrent.futures.Future] = {}

    def ahead(self, *args: Any) -> None:
        key = signature(args)
        if key not in self._ahead:
            # tracing holds the GIL, so it stays on this thread; XLA's compilation does not
            self._ahead[key] = _compile_pool().submit(self.jitted.lower(*args).compile)

    def __call__(self, *args: Any) -> Any:
        future = self._ahead.get(signature(args)) if self._ahead else None
        if future is None:
            self.misses += 1
            return self.jitted(*args)
        return future.result()(*args)


def _listen(event: str, seconds: float, **_) -> None:
    if event == _EVENT:
        with _lock:
            _totals["seconds"] += seconds
            _totals["count"] += 1


class Clock:
    """Seconds spent in, and number of, XLA backend compilations since the clock was made (seconds
    summed over the threads that compile in parallel)."""

    def __init__(self):
        global _listening
        with _lock:
            if not _listening:
                jax.monitoring.register_event_duration_secs_listener(_listen)
                _listening = True
            self._start = dict(_totals)

    def seconds(self) -> float:
        return _totals["seconds"] - self._start["seconds"]

    def count(self) -> int:
        return _totals["count"] - self._start["count"]
