"""Run configuration: typed dataclasses read from YAML, with one clear error per bad field.

A config file looks like::

    method: olora              # or seq_lora, inc_lora, seq_ft, mtl, per_task, ...
    method_args: {lambda1: 0.5}
    model: default             # "default" | local HF dir | hub id | gguf:PATH
    dtype: float32
    attention: null            # null (masked attention) | cudnn (GPU flash attention) | xla
    remat: auto                # on GPU/TPU, off on CPU; or true / false / a jax.checkpoint_policies name
    scan_layers: true          # false unrolls the layer stack (faster steps on GPUs, longer compiles)
    data:
      source: bundled          # bundled | cl_benchmark | superni | trace
      root: null               # folder of the benchmark (not for bundled)
      order: wordnet           # an order name (data file) or a list of task names
    train: {steps_per_task: 40, batch_size: 8, lr: 1.0e-3}
    eval: {max_test_per_task: 100, max_new_tokens: 8}
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional, Union

import jax
import yaml

from jaxcl.data.stream import PREFIXED_SOURCES
from jaxcl.data.task import METRICS
from jaxcl.train.compilation import DEFAULT_CACHE


class ConfigError(ValueError):
    """A config file or field is not what jaxcl expects."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"
    root: Optional[str] = None
    order: Union[str, list] = "wordnet"
    max_train_per_task: Optional[int] = None
    validation_fraction: float = 0.1
    max_prompt_tokens: int = 96
    max_answer_tokens: int = 16
    # O-LoRA's "Task:<type>" / "Dataset:<name>" prompt lines (its scripts' add_task_name /
    # add_dataset_name); null: as the official scripts (CL_Benchmark layout and the bundled stream:
    # on; SuperNI and TRACE prompts have neither), false: left out
    task_name: Optional[bool] = None
    dataset_name: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps_per_task: Optional[int] = None   # when set, overrides epochs
    epochs: float = 1.0
    batch_size: int = 8                    # global batch per optimizer step
    grad_accum: int = 1                    # micro-batches per step (batch_size % grad_accum == 0)
    lr: float = 1e-3
    schedule: str = "constant"             # constant | warmup_cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"               # adamw | sgd
    momentum: float = 0.9                  # for sgd
    max_grad_norm: Optional[float] = None
    seed: int = 0
    checkpoint_every: int = 0              # steps; 0 = only at the end of each task
    init_adapter: Optional[str] = None     # a PEFT LoRA folder the first LoRA starts from (``jaxcl.export``)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_test_per_task: Optional[int] = None
    max_new_tokens: int = 50
    batch_size: int = 32
    metric: Optional[str] = None           # override the task's own metric


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes along ('data', 'fsdp', 'tensor') (see ``jaxcl.train.sharding``).

    One size may be -1: it takes every device the others leave. The product must equal the number
    of devices.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    method: str = "seq_lora"
    method_args: dict = dataclasses.field(default_factory=dict)
    model: str = "default"
    dtype: str = "float32"
    attention: Optional[str] = None        # None | "cudnn" | "xla": the models' uncached attention path
    # Recompute layers in the backward: True, a checkpoint policy, or "auto" (on where it pays: on a GPU
    # it cut the cl_std3 run's peak from 9.6 to 1.6-2.0 GiB at the same step time and compiled faster,
    # bench/RESULTS.md; on a CPU the recomputed forward is pure cost).
    remat: Union[bool, str] = "auto"
    scan_layers: bool = True               # False: the layers unrolled (no per-layer weight slicing)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    compile_cache: Optional[str] = DEFAULT_CACHE   # persistent XLA compilation cache folder; null = off
    tensorboard: bool = True               # TensorBoard event files in the run folder (``train/events.py``)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_remat(remat: Union[bool, str], backend: str) -> Union[bool, str]:
    """The models' ``remat`` attribute for a config's ``remat`` on ``backend`` (``jax.default_backend()``).

    Examples:
      >>> model_remat("auto", "gpu"), model_remat("auto", "cpu"), model_remat("dots_saveable", "cpu")
      (True, False, 'dots_saveable')
    """
    return backend != "cpu" if remat == "auto" else remat


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(t) for t in typing.get_args(tp))
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, dict, list):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"unsupported config type {tp}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return {type(None): "null", dict: "mapping", list: "list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls: type, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(values: dict, where: str = "config") -> RunConfig:
    """Build a ``RunConfig`` from a plain mapping, checking every field's type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(values).__name__}")
    cfg = _build(RunConfig, values, where)
    for field, value, ok, wanted in _ranges(cfg):
        if not ok:
            raise ConfigError(f"{where}.{field}: expected {wanted}, got {value!r}")
    order = cfg.data.order
    if isinstance(order, list) and (not order or not all(isinstance(name, str) for name in order)):
        raise ConfigError(f"{where}.data.order: expected an order name or a non-empty list of task names "
                          f"(strings), got {order!r}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"{where}.train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                          f"train.grad_accum ({cfg.train.grad_accum})")
    if cfg.train.schedule not in ("constant", "warmup_cosine"):
        raise ConfigError(f"{where}.train.schedule: expected 'constant' or 'warmup_cosine', got {cfg.train.schedule!r}")
    if cfg.train.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"{where}.train.optimizer: expected 'adamw' or 'sgd', got {cfg.train.optimizer!r}")
    sizes = dataclasses.astuple(cfg.mesh)
    if any(n == 0 or n < -1 for n in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"{where}.mesh: sizes must be positive, with at most one -1 (all remaining devices); "
                          f"got {cfg.mesh}")
    for field in ("task_name", "dataset_name"):
        if getattr(cfg.data, field) and cfg.data.source not in PREFIXED_SOURCES:
            raise ConfigError(f"{where}.data.{field}: {cfg.data.source} prompts have no such line "
                              f"(only {' and '.join(PREFIXED_SOURCES)} prompts do); expected null or false")
    if cfg.eval.metric is not None and cfg.eval.metric not in METRICS:
        raise ConfigError(f"{where}.eval.metric: expected null or one of {list(METRICS)}, got {cfg.eval.metric!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{where}.dtype: expected 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if cfg.attention not in (None, "cudnn", "xla"):
        raise ConfigError(f"{where}.attention: expected null, 'cudnn' or 'xla', got {cfg.attention!r}")
    if isinstance(cfg.remat, str) and cfg.remat != "auto" and not callable(getattr(jax.checkpoint_policies, cfg.remat, None)):
        raise ConfigError(f"{where}.remat: expected auto, true, false or a jax.checkpoint_policies name "
                          f"(e.g. 'dots_with_no_batch_dims_saveable'), got {cfg.remat!r}")
    return cfg


def _ranges(cfg: RunConfig) -> list[tuple[str, Any, bool, str]]:
    """``(field, value, whether it is in range, the range)`` of every numeric field with a range
    (NaN is in none: every comparison with it is false)."""
    t, e, d = cfg.train, cfg.eval, cfg.data
    return [
        ("train.steps_per_task", t.steps_per_task, t.steps_per_task is None or t.steps_per_task >= 1,
         "an integer >= 1 or null (then train.epochs counts)"),
        ("train.epochs", t.epochs, t.epochs > 0, "a number > 0"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, "an integer >= 1"),
        ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, "an integer >= 1"),
        ("train.lr", t.lr, t.lr > 0, "a learning rate > 0"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "an integer >= 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "a number >= 0"),
        ("train.momentum", t.momentum, 0 <= t.momentum < 1, "a number in [0, 1)"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or t.max_grad_norm > 0,
         "a number > 0 or null"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0,
         "an integer >= 0 (0: only at the end of each task)"),
        ("eval.max_new_tokens", e.max_new_tokens, e.max_new_tokens >= 1, "an integer >= 1"),
        ("eval.batch_size", e.batch_size, e.batch_size >= 1, "an integer >= 1"),
        ("eval.max_test_per_task", e.max_test_per_task,
         e.max_test_per_task is None or e.max_test_per_task >= 1, "an integer >= 1 or null"),
        ("data.max_train_per_task", d.max_train_per_task,
         d.max_train_per_task is None or d.max_train_per_task >= 1, "an integer >= 1 or null"),
        ("data.validation_fraction", d.validation_fraction, 0 <= d.validation_fraction < 1, "a number in [0, 1)"),
        ("data.max_prompt_tokens", d.max_prompt_tokens, d.max_prompt_tokens >= 1, "an integer >= 1"),
        ("data.max_answer_tokens", d.max_answer_tokens, d.max_answer_tokens >= 1, "an integer >= 1"),
    ]


# Fields a resumed run may change (``--allow-changed``): they alter neither the shapes of the saved
# state nor what the steps already taken computed.
RESUMABLE_CHANGES = ("train.lr", "train.checkpoint_every", "compile_cache", "attention", "remat",
                     "mesh.data", "mesh.fsdp", "mesh.tensor")


def flat_fields(values: dict, prefix: str = "") -> dict:
    """``{"train.lr": 0.001, ...}``: the leaves of a config mapping by dotted name."""
    out = {}
    for key, value in values.items():
        name = prefix + key
        if isinstance(value, dict) and key != "method_args":
            out.update(flat_fields(value, name + "."))
        else:
            out[name] = value
    return out


def check_resume(saved: dict, cfg: RunConfig, allowed: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming every field where ``cfg`` differs from the ``saved`` config of the run
    it resumes, except those in ``allowed`` (each must be one of ``RESUMABLE_CHANGES``)."""
    unsafe = sorted(set(allowed) - set(RESUMABLE_CHANGES))
    if unsafe:
        raise ConfigError(f"--allow-changed {','.join(unsafe)}: not a field a resumed run may change; "
                          f"those are {', '.join(RESUMABLE_CHANGES)}")
    old, new = flat_fields(saved), flat_fields(cfg.to_dict())
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allowed)
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise ConfigError(f"the config differs from the checkpointed run's in {shown}; resume with the same "
                          f"config (or --allow-changed FIELD,... for {', '.join(RESUMABLE_CHANGES)})")


def load(path: str) -> RunConfig:
    """Read a YAML config file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
    return from_dict(values or {}, where=path)
