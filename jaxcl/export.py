"""PEFT LoRA adapter folders: export a run's LoRAs, and start a run's LoRA from one.

A PEFT LoRA folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<transformers module>.lora_A.weight`` ``(r, d_in)`` and ``...lora_B.weight``
``(d_out, r)``: the torch layout, which is also jaxcl's (``kernels.lora``), so no array is
transposed. Both scale the LoRA by ``alpha / r``; PEFT takes r as the adapter's whole rank, so an
export of T concatenated rank-r LoRAs (IncLoRA, O-LoRA) writes ``lora_alpha = T·alpha`` to keep
jaxcl's per-adapter ``alpha / r``.

What each LoRA method exports:
  seq_lora, l2_lora, mtl: the one LoRA.
  inc_lora, olora: the finished tasks' LoRAs concatenated along the rank (rank T·r), one adapter
    equal to their sum (O-LoRA merges its LoRAs the same way when it saves).
  per_task, any_ssr: one adapter per finished task. Any-SSR's router (which adapter a prompt gets)
    has no PEFT form: the folders hold the adapters only, and the user picks one.
``replay+<method>`` exports as its inner method. Other methods change the model in ways a LoRA
adapter cannot hold, and ``ExportError`` says so.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods.any_ssr import AnySSR
from jaxcl.methods.inc_lora import IncLoRA
from jaxcl.methods.l2_lora import L2LoRA
from jaxcl.methods.lora_bank import Current, LoRA
from jaxcl.methods.olora import OLoRA
from jaxcl.methods.per_task import PerTask
from jaxcl.methods.replay import Replay
from jaxcl.methods.seq_lora import OneLoRA
from jaxcl.models.sites import resolve_sites
from jaxcl.train.checkpoint import write_json_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# What ``base_model_name_or_path`` names for jaxcl's offline default (a GGUF conversion of it).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ExportError(ValueError):
    """The run or adapter folder cannot be exported / imported (one line, exit status 2)."""


class PeftLoRA(NamedTuple):
    """One PEFT adapter in jaxcl's layout: ``lora {site: LoRA(a (L, R, d_in), b (L, d_out, R))}``
    scaled by ``alpha / rank`` (R = rank)."""

    lora: dict
    rank: int
    alpha: float


def _lora_method(method):
    """The method whose state the LoRAs are in (``replay+`` keeps its inner method's state)."""
    return method.inner if isinstance(method, Replay) else method


# the methods whose params are ``Current`` LoRAs and whose trained LoRAs a PEFT adapter can hold
_LORA_METHODS = (OneLoRA, L2LoRA, IncLoRA, OLoRA, PerTask, AnySSR)


def _check_exportable(method) -> None:
    if not isinstance(_lora_method(method), _LORA_METHODS):
        raise ExportError(f"method {method.name!r} has no PEFT LoRA form; export works for seq_lora, l2_lora, mtl, "
                          "inc_lora, olora, per_task and any_ssr (and replay+ of them)")


def adapters(method, state, finished: int) -> dict[Optional[int], PeftLoRA]:
    """The PEFT adapters of a LoRA method's ``state`` after ``finished`` tasks: ``{None: adapter}``
    for a method with one adapter, ``{task index: adapter}`` for per-task methods.

    Raises:
      ExportError: the method has no PEFT LoRA form, or no task has finished for a method whose
        adapters are its finished tasks'.
    """
    _check_exportable(method)
    inner = _lora_method(method)
    if isinstance(inner, (OneLoRA, L2LoRA)):
        return {None: PeftLoRA(state.params.lora, inner.rank, inner.alpha)}
    if finished < 1:
        raise ExportError(f"method {method.name!r} exports its finished tasks' LoRAs, and no task has finished yet")
    past = state.fixed.past
    if isinstance(inner, (IncLoRA, OLoRA)):
        # (L, T, r, d_in) -> (L, T·r, d_in); (L, T, d_out, r) -> (L, d_out, T·r), task-major as the rows of A
        joined = {site: LoRA(p.a[:, :finished].reshape(p.a.shape[0], -1, p.a.shape[3]),
                             jnp.moveaxis(p.b[:, :finished], 1, 2).reshape(p.b.shape[0], p.b.shape[2], -1))
                  for site, p in past.items()}
        return {None: PeftLoRA(joined, finished * inner.rank, finished * inner.alpha)}
    gate = 1.0
    if isinstance(inner, AnySSR):  # its feature layers get no LoRA: zero them so PEFT adds none there
        num_layers = next(iter(past.values())).a.shape[0]
        gate = (jnp.arange(num_layers) >= inner.depth(num_layers)).astype(jnp.float32)[:, None, None]
    return {t: PeftLoRA({site: LoRA(p.a[:, t], p.b[:, t] * gate) for site, p in past.items()}, inner.rank, inner.alpha)
            for t in range(finished)}


def note(method) -> Optional[str]:
    """What an export of ``method`` leaves out, to tell the user (None: nothing)."""
    if isinstance(_lora_method(method), AnySSR):
        return ("Any-SSR's router has no PEFT form: the folders hold its per-task adapters only, and which "
                "one a prompt needs is for the user to choose")
    return None


def _peft_names(model, sites: list[str]) -> list[str]:
    """PEFT ``target_modules`` for exactly ``sites``: the short names when they select these sites and
    no others, else every adapted module's full name."""
    names = sorted({p for site in sites for p, suffix in model.peft_names.items() if site.endswith(suffix)})
    if resolve_sites(model.site_shapes(), names, model.peft_names) == sorted(sites):
        return names
    num_layers = {site: shape[0] for site, shape in model.site_shapes().items()}
    return [model.hf_module(site, i) for site in sorted(sites) for i in range(num_layers[site])]


def _key(model, site: str, layer: int, matrix: str) -> str:
    return f"base_model.model.{model.hf_module(site, layer)}.lora_{matrix}.weight"


def peft_tensors(model, lora: dict) -> dict[str, np.ndarray]:
    """``{PEFT key: float32 array}`` of ``lora`` ``{site: LoRA}`` (stacked over layers)."""
    out = {}
    for site, l in sorted(lora.items()):
        a, b = np.asarray(l.a, np.float32), np.asarray(l.b, np.float32)
        for i in range(a.shape[0]):
            out[_key(model, site, i, "A")] = np.ascontiguousarray(a[i])
            out[_key(model, site, i, "B")] = np.ascontiguousarray(b[i])
    return out


def peft_config(model, adapter: PeftLoRA, dropout: float, base_model: str) -> dict:
    """The ``adapter_config.json`` of ``adapter`` (PEFT ``LoraConfig`` fields)."""
    return {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": DEFAULT_MODEL_ID if base_model == "default" else base_model,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": dropout,
        "target_modules": _peft_names(model, list(adapter.lora)), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "inference_mode": True, "modules_to_save": None,
    }


def write_adapter(directory: str, config: dict, tensors: dict) -> None:
    """Write one PEFT folder; each file appears whole (temporary file, then ``os.replace``)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{WEIGHTS_FILE}")
    save_file(tensors, tmp, metadata={"format": "pt"})  # PEFT's loader reads torch-format metadata
    os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))
    write_json_atomic(os.path.join(directory, CONFIG_FILE), config)


def export(model, method, state, finished: int, out: str, base_model: str, task: Optional[int] = None) -> list[str]:
    """Write the PEFT adapter(s) of a LoRA method's ``state``; returns the folders written.

    One adapter goes into ``out``; per-task methods write ``out/task_K`` for every finished task K,
    or only task ``task`` into ``out``. Everything is computed before the first file is written.
    """
    found = adapters(method, state, finished)
    if task is not None:
        if None in found:
            raise ExportError(f"--task: method {method.name!r} has one adapter, not one per task")
        if task not in found:
            raise ExportError(f"--task {task}: the run has finished tasks 0..{finished - 1}")
        found = {task: found[task]}
    dropout = _lora_method(method).dropout
    folders = {(out if k is None or task is not None else os.path.join(out, f"task_{k}")):
               (peft_config(model, a, dropout, base_model), peft_tensors(model, a.lora)) for k, a in found.items()}
    for directory, (config, tensors) in folders.items():
        write_adapter(directory, config, tensors)
    return list(folders)


def read_adapter(model, method, directory: str) -> dict:
    """The current LoRAs ``{site: LoRA}`` of a LoRA method, read from a PEFT LoRA folder.

    The folder must adapt the method's sites at its rank; a different ``lora_alpha`` is folded into
    B so that the adapter adds what it added under PEFT.

    Raises:
      ExportError: unreadable folder, other sites or rank, missing or misshapen tensor.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    inner = _lora_method(method)
    if not isinstance(inner, _LORA_METHODS):
        raise ExportError(f"train.init_adapter: method {method.name!r} has no LoRA to start from a PEFT adapter")
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ExportError(f"{directory}: not a readable PEFT LoRA folder ({e})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("r") != inner.rank:
        raise ExportError(f"{directory}: a {config.get('peft_type')} adapter of rank {config.get('r')}; "
                          f"method {method.name!r} needs a LoRA of rank {inner.rank}")
    theirs = config["lora_alpha"] / (np.sqrt(inner.rank) if config.get("use_rslora") else inner.rank)
    factor = theirs / (inner.alpha / inner.rank)
    shapes = model.site_shapes()
    out = {}
    for site in resolve_sites(shapes, inner.sites, model.peft_names):
        num_layers, d_in, d_out = shapes[site]
        a, b = ([_tensor(tensors, _key(model, site, i, m), shape, directory) for i in range(num_layers)]
                for m, shape in (("A", (inner.rank, d_in)), ("B", (d_out, inner.rank))))
        out[site] = LoRA(jnp.asarray(np.stack(a), jnp.float32), jnp.asarray(np.stack(b) * factor, jnp.float32))
    return out


def _tensor(tensors: dict, key: str, shape: tuple, directory: str) -> np.ndarray:
    if key not in tensors:
        raise ExportError(f"{directory}: no tensor {key} (the adapter does not cover the method's sites)")
    if tensors[key].shape != shape:
        raise ExportError(f"{directory}: {key} is {tensors[key].shape}, expected {shape}")
    return tensors[key]


def start_from_adapter(model, method, state, directory: str):
    """``state`` with its current LoRAs read from a PEFT folder (``train.init_adapter``)."""
    return state._replace(params=Current(read_adapter(model, method, directory)))


def export_run(run_dir: str, out: str, task: Optional[int] = None) -> tuple[list[str], Optional[str]]:
    """``jaxcl export``: the PEFT adapter(s) of the latest checkpoint of the finished run in ``run_dir``;
    returns the folders written and the run method's ``note``."""
    from flax import nnx

    from jaxcl import methods as jmethods
    from jaxcl.methods import axes as jaxes
    from jaxcl.methods.base import MethodState, ModelInfo
    from jaxcl.models import load_model
    from jaxcl.train import step as jstep
    from jaxcl.train.checkpoint import Checkpointer
    from jaxcl.train.report import ReportError, load_results

    try:
        results = load_results(run_dir)
        cfg = results["config"]
    except (ReportError, KeyError) as e:
        raise ExportError(f"{run_dir}: export needs a finished run, whose results.json holds its config "
                          f"({e})") from None
    method = jmethods.build(cfg["method"], cfg["method_args"])
    _check_exportable(method)  # before the model is loaded
    model, _ = load_model(cfg["model"], dtype=jnp.float32, tokenizer=None)
    num_phases = 1 if method.joint else len(results["tasks"])
    template, _ = jaxes.split(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), num_phases))
    trained, _ = jstep.split_base(method, nnx.to_pure_dict(nnx.state(model)))
    checkpoints = Checkpointer(run_dir)
    try:
        latest = checkpoints.latest()
        if latest is None:
            raise ExportError(f"{run_dir}: no checkpoint in {checkpoints.directory}")
        step, meta = latest
        params = checkpoints.restore(step, "params", {"method": template.params, "base": trained})
        fixed = template.fixed  # the run folder leaves empty items out of a checkpoint (Orbax refuses them)
        if jax.tree.leaves(fixed):
            fixed = checkpoints.restore(step, "fixed", fixed)
    finally:
        checkpoints.close()
    folders = export(model, method, MethodState(params["method"], fixed), meta["phase"], out, cfg["model"], task)
    return folders, note(method)
