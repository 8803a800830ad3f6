"""Continual-learning methods, one file each, built by name.

``build("olora", {"lambda1": 0.5})`` returns ``(method, replay)`` where ``replay`` is a
``ReplayConfig`` for names of the form ``replay+<method>`` (and for plain ``replay``), else None.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Optional

from jaxcl.methods.any_ssr import AnySSR
from jaxcl.methods.base import Method, TaskInfo
from jaxcl.methods.inc_lora import IncLoRA
from jaxcl.methods.lora_bank import LoRABank
from jaxcl.methods.mist import MIST
from jaxcl.methods.mtl import MTL
from jaxcl.methods.oa_adapter import OAAdapter
from jaxcl.methods.olora import OLoRA
from jaxcl.methods.per_task import PerTask
from jaxcl.methods.replay import ReplayConfig
from jaxcl.methods.sapt import SAPT
from jaxcl.methods.seq_ft import SeqFT
from jaxcl.methods.seq_lora import SeqLoRA
from jaxcl.methods.smat import SMAT

REGISTRY = {m.name: m for m in (SeqFT, SeqLoRA, IncLoRA, OLoRA, MTL, PerTask, AnySSR, OAAdapter, SAPT, SMAT)}


class MethodError(ValueError):
    """Unknown method name or bad method argument."""


def build(name: str, args: Optional[dict] = None) -> tuple[Method, Optional[ReplayConfig]]:
    args = dict(args or {})
    replay = None
    if getattr(REGISTRY.get(name), "episodic", False):
        name = "replay+" + name  # trains over the tasks seen so far (SMAT): replay is part of the method
    if name == "replay" or name.startswith("replay+"):
        name = name.partition("+")[2] or "seq_lora"
        replay_args = {k[len("replay_"):]: args.pop(k) for k in list(args) if k.startswith("replay_")}
        try:
            replay = ReplayConfig(**replay_args)
        except TypeError as e:
            raise MethodError(f"method_args: bad replay option ({e}); known: replay_fraction, replay_per_task") from None
    mist_args = None
    if name.startswith("mist+"):
        name = name[len("mist+"):]
        mist_args = {k[len("mist_"):]: args.pop(k) for k in list(args) if k.startswith("mist_")}
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; known: {sorted(REGISTRY)} (and replay+<method>, mist+<method>)")
    cls = REGISTRY[name]
    hints = typing.get_type_hints(cls)
    fields = sorted(f.name for f in dataclasses.fields(cls))
    for k, v in args.items():
        if k not in fields:
            raise MethodError(f"method_args.{k}: not an option of {name}; known: {fields}")
        args[k] = _typed(v, hints[k], f"method_args.{k}")
    try:
        method = cls(**args)
    except (TypeError, ValueError) as e:
        raise MethodError(f"method_args for {name}: {e}") from None
    return (method if mist_args is None else _mist(method, mist_args)), replay


def _mist(inner: Method, options: dict) -> MIST:
    """``inner`` wrapped in MIST with the ``mist_*`` options (prefix removed)."""
    hints = typing.get_type_hints(MIST)
    known = sorted(f.name for f in dataclasses.fields(MIST) if f.name != "inner")
    for k, v in options.items():
        if k not in known:
            raise MethodError(f"method_args.mist_{k}: not a MIST option; known: {['mist_' + f for f in known]}")
        options[k] = _typed(v, hints[k], f"method_args.mist_{k}")
    try:
        return MIST.wrap(inner, **options)
    except (TypeError, ValueError) as e:
        raise MethodError(f"method_args for mist: {e}") from None


def _typed(value, tp, where: str):
    """``value`` as the field type ``tp`` (YAML lists become tuples; ints are valid floats)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if options:  # Optional[X]: None, or a value of X
        if value is None and type(None) in options:
            return None
        (tp,) = [t for t in options if t is not type(None)]
    if tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise MethodError(f"{where}: expected {tp.__name__}, got {value!r}")


__all__ = ["Method", "TaskInfo", "LoRABank", "SeqFT", "SeqLoRA", "IncLoRA", "OLoRA", "MTL", "PerTask",
           "AnySSR", "OAAdapter", "SAPT", "MIST", "SMAT", "ReplayConfig", "REGISTRY", "build", "MethodError"]
