"""XLA compilation: the persistent compilation cache, and a clock of the compilations of a run.

The cache (JAX's own) is on by default in a user folder, so a second run of the same config skips
its compilations; the run config's ``compile_cache`` names another folder or turns it off (null),
and the environment variable ``JAXCL_COMPILE_CACHE`` (a folder, or ``off``) overrides both.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

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


def _listen(event: str, seconds: float, **_) -> None:
    if event == _EVENT:
        with _lock:
            _totals["seconds"] += seconds
            _totals["count"] += 1


class Clock:
    """Seconds spent in, and number of, XLA backend compilations since the clock was made."""

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
