"""Continual-learning methods, one file each, built by name.

``build("olora", {"lambda1": 0.5})`` returns the method; ``replay+<method>`` and ``mist+<method>``
wrap the inner method (their options are the ``replay_*`` / ``mist_*`` keys), and plain ``replay``
is ``replay+seq_lora``. PEFT's names are accepted for the LoRA options: ``r`` (rank),
``lora_alpha`` (alpha), ``lora_dropout`` (dropout) and ``target_modules`` (sites).

Adding a method: one file with a final frozen dataclass subclassing ``Method`` (typed state made by
``axes.logical``), its line in ``REGISTRY`` below, and its tests (``tests/methods/test_contract.py``
runs every registered method through the common contract).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Optional

from jaxcl.methods.any_ssr import AnySSR
from jaxcl.methods.base import Method, MethodState, ModelInfo, ReplaySpec, StepContext, TaskInfo, Wrapper
from jaxcl.methods.inc_lora import IncLoRA
from jaxcl.methods.l2_lora import L2LoRA
from jaxcl.methods.mist import MIST
from jaxcl.methods.mtl import MTL
from jaxcl.methods.oa_adapter import OAAdapter
from jaxcl.methods.olora import OLoRA
from jaxcl.methods.per_task import PerTask
from jaxcl.methods.replay import Replay
from jaxcl.methods.sapt import SAPT
from jaxcl.methods.seq_ft import BaseModel, SeqFT
from jaxcl.methods.seq_lora import SeqLoRA
from jaxcl.methods.smat import SMAT

REGISTRY = {m.name: m for m in (SeqFT, SeqLoRA, IncLoRA, OLoRA, L2LoRA, MTL, PerTask, AnySSR, OAAdapter, SAPT, SMAT)}
WRAPPERS = {"replay": Replay, "mist": MIST}
PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "sites"}


class MethodError(ValueError):
    """Unknown method name or bad method argument."""


def build(name: str, args: Optional[dict] = None) -> Method:
    """The method ``name`` (``olora``, ``replay+olora``, ``mist+any_ssr``, ...) with ``args``.

    Raises:
      MethodError: naming the unknown method or the bad argument.
    """
    args = dict(args or {})
    prefix, plus, rest = name.partition("+")
    if prefix in WRAPPERS:
        wrapper = WRAPPERS[prefix]
        mine = {k[len(prefix) + 1:]: args.pop(k) for k in list(args) if k.startswith(prefix + "_")}
        if "inner" in mine:
            raise MethodError(f"method_args.{prefix}_inner: not an option of {prefix}; the wrapped method is "
                              f"named in the method name ({prefix}+<method>)")
        inner = build(rest if plus else "seq_lora", args)
        return _construct(wrapper, dict(mine, inner=inner), f"{prefix}_", prefix)
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; known: {sorted(REGISTRY)} "
                          f"(and {', '.join(w + '+<method>' for w in WRAPPERS)})")
    for peft, ours in PEFT_NAMES.items():
        if peft in args:
            if ours in args:
                raise MethodError(f"method_args: give {peft!r} or {ours!r}, not both")
            args[ours] = args.pop(peft)
    return _construct(REGISTRY[name], args, "", name)


def _construct(cls: type, args: dict, prefix: str, name: str) -> Method:
    hints = typing.get_type_hints(cls)
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.name != "inner")
    for k, v in args.items():
        if k == "inner":
            continue
        if k not in fields:
            raise MethodError(f"method_args.{prefix}{k}: not an option of {name}; known: {[prefix + f for f in fields]}")
        args[k] = _typed(v, hints[k], f"method_args.{prefix}{k}")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise MethodError(f"method_args for {name}: {e}") from None


def _typed(value, tp, where: str):
    """``value`` as the field type ``tp`` (YAML lists become tuples; ints are valid floats)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if options:  # Optional[X]: None, or a value of X
        if value is None and type(None) in options:
            return None
        (tp,) = [t for t in options if t is not type(None)]
    if tp is tuple and isinstance(value, str):
        return (value,)
    if tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise MethodError(f"{where}: expected {tp.__name__}, got {value!r}")


__all__ = ["Method", "MethodState", "ModelInfo", "ReplaySpec", "StepContext", "TaskInfo", "Wrapper", "BaseModel",
           "SeqFT", "SeqLoRA", "IncLoRA", "OLoRA", "L2LoRA", "MTL", "PerTask", "AnySSR", "OAAdapter", "SAPT", "MIST",
           "SMAT", "Replay", "REGISTRY", "WRAPPERS", "build", "MethodError"]
