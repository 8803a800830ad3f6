"""The continual-learning loop: train each task in order, evaluate every task after each one.

``run(config, out_dir)`` writes into ``out_dir`` (``run_state.RunFolder``): ``results.json`` when the
run is complete, ``log.jsonl``, ``predictions.jsonl``, TensorBoard events (``events.py``) and Orbax
``checkpoints/`` after every task and every ``train.checkpoint_every`` steps. ``run(..., resume=True)`` continues from the last
checkpoint and ends with the same results as an uninterrupted run: batches and dropout keys are
pure functions of ``(seed, task, step)``.

The batches come from ``pipeline.Stream`` (fixed shapes for the whole stream) and evaluation from
``evaluate.Evaluator``; this module owns the order of things and the device placement of the state.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxcl import data as jdata
from jaxcl import export as jexport
from jaxcl import methods as jmethods
from jaxcl.kernels import metrics as jmetrics
from jaxcl.methods import axes as jaxes
from jaxcl.methods.base import Method, MethodState, ModelInfo, StepContext, TaskInfo
from jaxcl.methods.seq_ft import BaseModel
from jaxcl.train import compilation, optim, sharding as jsharding, step as jstep
from jaxcl.train.config import RunConfig, check_resume, model_remat
from jaxcl.train.evaluate import Evaluator
from jaxcl.train.pipeline import Stream
from jaxcl.train.report import PHASE_SECONDS
from jaxcl.train.run_state import Progress, RunError, RunFolder

__all__ = ["Interrupted", "RunError", "run"]


class Interrupted(Exception):
    """Raised by the ``stop_after_steps`` hook that tests use to simulate a killed run."""


def load_tasks(cfg: RunConfig) -> list:
    """The tasks of ``cfg.data`` in training order (read before the model, so data errors come fast)."""
    d = cfg.data
    return jdata.load_stream(d.source, d.order if isinstance(d.order, str) else list(d.order), d.root,
                             cfg.eval.metric, task_name=d.task_name is not False, dataset_name=d.dataset_name is not False)


def peak_memory_gib(devices=None) -> Optional[float]:
    """The highest peak of device memory in use (GiB) over this process's devices since it started;
    None where the backend keeps no statistics (the CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in (devices or jax.local_devices())]
    peaks = [p for p in peaks if p is not None]
    return round(max(peaks) / 2**30, 3) if peaks else None


def _versions() -> dict:
    import importlib.metadata

    import flax
    import optax
    import orbax.checkpoint

    import jaxcl
    return {"jaxcl": jaxcl.__version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            # from the installed metadata: the version is all this needs, and importing transformers
            # can take seconds where torch is installed
            "orbax": orbax.checkpoint.__version__, "transformers": importlib.metadata.version("transformers"),
            "python": platform.python_version(), "backend": jax.default_backend(),
            "devices": [str(x) for x in jax.devices()], "device_kind": jax.devices()[0].device_kind}


def _eos_ids(spec_eos: int, model) -> tuple[int, ...]:
    """Every end-of-sequence id the tokenizer or the model declares (Llama 3 lists several)."""
    declared = model.config.eos_token_id
    declared = () if declared is None else (declared,) if isinstance(declared, int) else tuple(declared)
    return tuple(sorted({int(spec_eos), *(int(e) for e in declared)}))


class _Runner:
    """The placed weights, the jitted programs and the state shardings of one run."""

    def __init__(self, cfg: RunConfig, tasks: list, model, tokenizer, method: Method, num_phases: int, mesh):
        self.cfg, self.method = cfg, method
        # The config's attention path, remat policy and layer loop go into the graph definition
        # only: the caller's model object keeps its own settings.
        own = model.attention, model.remat, model.scan_layers
        model.attention, model.remat, model.scan_layers = (cfg.attention, model_remat(cfg.remat, jax.default_backend()),
                                                            cfg.scan_layers)
        self.graphdef, weights = nnx.split(model)
        model.attention, model.remat, model.scan_layers = own
        self.mesh = mesh
        base = nnx.to_pure_dict(weights)
        base_shardings = jsharding.tree_shardings(self.mesh, base, _axes_leaves(model.param_axes()))
        trained, frozen = jstep.split_base(method, base)
        self.base_shardings = jstep.split_base(method, base_shardings)[0]
        self.frozen_base = jsharding.place(frozen, jstep.split_base(method, base_shardings)[1])
        # The train step donates what it trains: copy it so the caller's model stays intact.
        self.trained_base = jsharding.place(jax.tree.map(jnp.copy, trained), self.base_shardings)
        self.stream = Stream.prepare(cfg, tasks, tokenizer, model.is_encoder_decoder, self.mesh)
        self.key = jax.random.PRNGKey(cfg.train.seed)
        self.info = ModelInfo.of(model)
        try:
            boxed = method.init(jax.random.fold_in(self.key, 10**6), self.info, num_phases)
        except ValueError as e:  # options that do not fit this model (sites it lacks, too many layers)
            raise jmethods.MethodError(f"method {cfg.method!r} on this model: {e}") from None
        self.initial, axes = jaxes.split(boxed)
        self.method_shardings = MethodState(*(jsharding.tree_shardings(self.mesh, v, a)
                                              for v, a in zip(self.initial, axes)))
        self.evaluator = Evaluator(self.stream, self.graphdef, self.frozen_base, method, tokenizer,
                                   _eos_ids(self.stream.spec.eos_id, model))
        self.make_tx = lambda num_steps: method.optimizer(optim.optimizer(cfg.train, num_steps))
        params = {"method": self.initial.params, "base": trained}
        param_shardings = {"method": self.method_shardings.params, "base": self.base_shardings}
        opt_shape = jax.eval_shape(self.make_tx(1).init, params)
        opt_shardings = jsharding.follow_params(self.mesh, opt_shape, params, param_shardings)
        whole = jsharding.replicated(self.mesh)
        self.state_shardings = jstep.TrainState(param_shardings, opt_shardings,
                                                jax.tree.map(lambda _: whole, StepContext.start(0, 1, 0)))
        self.opt_init = compilation.Program(jax.jit(self.make_tx(1).init, out_shardings=opt_shardings))
        self.train_step = compilation.Program(jax.jit(
            functools.partial(jstep.train_step, graphdef=self.graphdef, method=method, make_tx=self.make_tx,
                              max_targets=self.stream.spec.max_answer_len),
            donate_argnums=(0,), out_shardings=(self.state_shardings, whole)))
        # placed like the train state, so that the step's arguments keep one signature
        self.step_key = jax.jit(lambda key, phase, step: jax.random.fold_in(jax.random.fold_in(key, phase), step),
                                out_shardings=whole)

    @property
    def programs(self) -> list[compilation.Program]:
        return [self.opt_init, self.train_step, *self.evaluator.programs]

    def compile_ahead(self) -> None:
        """Start compiling every program of the run for the shapes the stream fixes, in parallel
        (``compilation.Program``), with arguments placed as the loop places them; in the order the
        run first calls them (the base model's evaluation comes first)."""
        params = jsharding.abstract({"method": self.initial.params, "base": self.trained_base},
                                    self.state_shardings.params)
        fixed = jsharding.abstract(self.initial.fixed, self.method_shardings.fixed)
        ctx = jsharding.place(StepContext.start(0, 1, 0), self.state_shardings.ctx)
        base = BaseModel().init(None, None, 0)
        self.evaluator.compile_ahead(params, fixed, {"method": base.params, "base": params["base"]}, base.fixed, ctx)
        self.opt_init.ahead(params)
        opt_state = jsharding.abstract(jax.eval_shape(self.make_tx(1).init, params), self.state_shardings.opt_state)
        tstate = jstep.TrainState(params, opt_state, ctx)
        key = self.step_key(self.key, 0, 0)
        for batch in self.stream.train_examples():
            self.train_step.ahead(tstate, self.frozen_base, fixed, batch, key)

    def place_state(self, state: MethodState) -> MethodState:
        return jsharding.place(state, self.method_shardings)

    def placed(self, state: MethodState, trained_base: dict) -> tuple[dict, Any]:
        """``(params, fixed)`` of the run's method placed as the train step places them."""
        state = self.place_state(state)
        return jsharding.place({"method": state.params, "base": trained_base}, self.state_shardings.params), state.fixed

    def model(self, trained_base: dict):
        return jstep.bind(self.graphdef, jstep.merge_base(trained_base, self.frozen_base))


def _axes_leaves(tree):
    """A model's ``param_axes()`` (tuples of names) as a tree of ``Axes`` leaves."""
    return jax.tree.map(lambda names: jaxes.Axes(tuple(names)), tree,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def make_mesh(cfg: RunConfig):
    """The run's device mesh, with the batch sizes checked against it (before anything is loaded)."""
    mesh = jsharding.make_mesh(cfg.mesh)
    jsharding.check_batch_size(mesh, cfg.train.batch_size // cfg.train.grad_accum,
                               "train.batch_size / train.grad_accum")
    jsharding.check_batch_size(mesh, cfg.eval.batch_size, "eval.batch_size")
    return mesh


def run(cfg: RunConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
        stop_after_steps: Optional[int] = None, model_and_tokenizer=None,
        allow_changed: tuple[str, ...] = ()) -> dict:
    """Run ``cfg`` and write ``out_dir/results.json``; returns the results dict.

    Args:
      cfg: the run configuration.
      out_dir: output folder (created); must not hold another run unless ``resume``.
      resume: continue from the last checkpoint in ``out_dir`` (from scratch if there is none).
      progress: show progress bars.
      stop_after_steps: raise ``Interrupted`` after this many optimizer steps of this invocation,
        right after a checkpoint (tests use it to simulate a killed run).
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` (else ``cfg.model`` is loaded).
      allow_changed: config fields (``config.RESUMABLE_CHANGES``) a resumed run may change; any other
        difference from the checkpointed run's config is refused.
    """
    from jaxcl.models import load_model

    jsharding.initialize_distributed()  # a multi-host run when the environment names a coordinator
    compilation.enable_cache(cfg.compile_cache)
    clock = compilation.Clock()
    peak_at_start = peak_memory_gib()  # the peak is the process's: a driver may run several runs in one
    method = jmethods.build(cfg.method, cfg.method_args)
    folder = RunFolder(out_dir, resume, tensorboard=cfg.tensorboard)
    saved = folder.saved_config() if resume else None
    if saved is not None:
        check_resume(saved, cfg, tuple(allow_changed))
    mesh = make_mesh(cfg)
    if jax.process_count() > 1:  # every process looks at the folder before any of them writes to it
        multihost_utils.sync_global_devices("jaxcl: output folder checked")
    setup = {"data_seconds": time.time()}  # before the run's clock starts: reading, loading, preparing
    tasks = load_tasks(cfg)
    setup["model_seconds"] = time.time()
    if model_and_tokenizer is None:
        model_and_tokenizer = load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
    model, tokenizer = model_and_tokenizer
    phases = [list(range(len(tasks)))] if method.joint else [[i] for i in range(len(tasks))]
    setup["prepare_seconds"] = time.time()
    r = _Runner(cfg, tasks, model, tokenizer, method, len(phases), mesh)
    setup = dict(zip(setup, np.diff([*setup.values(), time.time()]).round(2).tolist()))
    stream, evaluator = r.stream, r.evaluator
    r.compile_ahead()
    initial = r.initial if not cfg.train.init_adapter else jexport.start_from_adapter(
        model, method, r.initial, cfg.train.init_adapter)  # (read before the folder is created)
    folder.open([t.name for t in tasks])
    folder.write_config(cfg.to_dict())

    # placed as every later task's state is, so a begin_task program compiles once, not again for task 1
    state, trained_base, restored_opt = r.place_state(initial), r.trained_base, None
    prog = Progress()
    latest = folder.resume() if resume else None
    if latest is not None:
        ck_step, prog = latest
        template = {"method": state.params, "base": jax.tree.map(lambda x: x, trained_base)}
        params = folder.restore(ck_step, "params", template)
        fixed = folder.restore(ck_step, "fixed", state.fixed)
        state, trained_base = MethodState(params["method"], fixed), jsharding.place(params["base"], r.base_shardings)
        if prog.step:  # a mid-task checkpoint: the optimizer state continues too
            restored_opt = folder.restore(ck_step, "opt", jax.eval_shape(r.make_tx(1).init, params))
    start_time = time.time() - prog.seconds

    def evaluate(method_now: Method, params: dict, fixed: Any, after: str) -> Any:
        result = evaluator.evaluate(method_now, params, fixed)  # (placed by the caller)
        prog.eval_seconds += result.seconds
        folder.predictions(prog, after, result.predictions)
        folder.log(prog, {"event": "eval", "after": after, "scores": result.scores,
                          "routing_accuracy": result.routing, "seconds": round(result.seconds, 3)})
        return result

    def task_hook(event: str, phase: int, hook: Callable[[], MethodState]) -> MethodState:
        """Runs a method's per-task hook and logs its seconds: the work a method does between the
        tasks' steps (a scoring pass, a routing fit, a router update) is timed apart from training."""
        t0 = time.time()
        new_state = jax.block_until_ready(hook())
        seconds = time.time() - t0
        prog.hook_seconds += seconds
        folder.log(prog, {"event": event, "phase": phase, "seconds": round(seconds, 3)})
        return new_state

    def save(items: dict) -> None:
        prog.seconds = time.time() - start_time
        folder.save(prog, items)

    if prog.base_scores is None:
        base = BaseModel().init(None, None, 0)
        placed = jsharding.place(trained_base, r.base_shardings)
        prog.base_scores = evaluate(BaseModel(), {"method": base.params, "base": placed}, base.fixed, "base").scores

    steps_this_call = 0
    for phase in range(prog.phase, len(phases)):
        members = phases[phase]
        past = [i for ph in phases[:phase] for i in ph]
        name = "+".join(stream.tasks[i].name for i in members)
        info = TaskInfo(phase, len(phases), name, batches=functools.partial(stream.task_batches, members),
                        validation_batches=functools.partial(stream.task_batches, members, "validation"),
                        model=r.model(trained_base), total_steps=prog.total_steps)
        steps = stream.phase_steps(members, method.replay, past)
        if restored_opt is None:
            state = task_hook("begin_task", phase,
                              lambda: method.begin_task(jax.random.fold_in(r.key, 2 * phase + 1), state, info))
        params, fixed = r.placed(state, trained_base)
        opt_state = r.opt_init(params) if restored_opt is None else jsharding.place(restored_opt, r.state_shardings.opt_state)
        ctx = StepContext.start(phase, steps, prog.total_steps, prog.step)
        tstate = jstep.TrainState(params, opt_state, jsharding.place(ctx, r.state_shardings.ctx))
        restored_opt = None
        feed = stream.train_feed(phase, members, past, method.replay)
        bar = _progress(progress and folder.primary, steps, prog.step, name)
        t_phase = time.time()
        t_last = t_phase
        lr = optim.schedule(cfg.train, steps)  # the optimizer's count restarts with every task

        def record(s: int, m: dict) -> None:
            """Log step ``s``: reading its metrics back waits for that step (and only that step)."""
            nonlocal t_last
            values, now = {k: float(v) for k, v in m.items()}, time.time()
            folder.log(prog, {"event": "step", "phase": phase, "step": s + 1, "seconds": round(now - t_last, 4),
                              "lr": float(lr(s))} | values)
            if not np.isfinite(values["loss"]):
                # step s + 1 ran on the parameters step s made: a checkpoint of those is not good
                if last_save is not None and last_save[0] == s:
                    folder.drop(last_save[1])
                raise RunError(f"training diverged: loss {values['loss']} at task {name!r}, step {s + 1}; the last "
                               f"good checkpoint is kept in {out_dir} (resume it with --resume, e.g. with a lower lr)")
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.3f}", steps_per_s=f"{1.0 / max(now - t_last, 1e-9):.2f}")
                bar.update(1)
            t_last = now

        # Step s is logged after step s + 1 is dispatched, so the host builds the next batch while
        # the device computes: no step waits for the host.
        pending = None
        last_save = None  # (phase step, checkpoint number) of this phase's newest mid-task checkpoint
        for s in range(prog.step, steps):
            tstate, m = r.train_step(tstate, r.frozen_base, fixed, feed(s), r.step_key(r.key, phase, s))
            if pending is not None:
                record(*pending)
            pending = (s, m)
            prog.step, prog.total_steps = s + 1, prog.total_steps + 1
            steps_this_call += 1
            stopping = stop_after_steps is not None and steps_this_call >= stop_after_steps
            every = cfg.train.checkpoint_every
            if s + 1 < steps and (stopping or (every and (s + 1) % every == 0)):
                record(*pending)  # a checkpoint covers every step logged before it
                pending = None
                save({"params": tstate.params, "fixed": fixed, "opt": tstate.opt_state})
                last_save = (s + 1, prog.checkpoint)
                if stopping:
                    raise Interrupted(f"stopped after {steps_this_call} steps (phase {phase}, step {s + 1})")
        if pending is not None:
            record(*pending)
        if bar is not None:
            bar.close()
        prog.train_seconds += time.time() - t_phase
        trained_base = tstate.params["base"]
        task_ctx = jsharding.place(StepContext.start(phase, steps, prog.total_steps), r.state_shardings.ctx)
        prog.val_loss += [evaluator.validation_loss(tstate.params, fixed, i, task_ctx) for i in members]
        info = dataclasses.replace(info, model=r.model(trained_base), total_steps=prog.total_steps)
        state = task_hook("end_task", phase, lambda: method.end_task(MethodState(tstate.params["method"], fixed), info))
        result = evaluate(method, *r.placed(state, trained_base), name)
        prog.rows.append(result.scores)
        prog.routing.append(result.routing)
        prog.phase, prog.step = phase + 1, 0
        save({"params": {"method": state.params, "base": trained_base}, "fixed": state.fixed})
        if stop_after_steps is not None and steps_this_call >= stop_after_steps and phase + 1 < len(phases):
            raise Interrupted(f"stopped after phase {phase}")

    matrix = np.array(prog.rows)
    if method.joint:
        summary = {"AP": float(matrix[-1].mean()), "BWT": None, "FWT": None, "forgetting": None}
    else:
        summary = jmetrics.summarize(matrix, np.array(prog.base_scores))
    results = {
        "method": cfg.method, "model": cfg.model, "tasks": [t.name for t in stream.tasks], "matrix": prog.rows,
        "base_scores": prog.base_scores,
        "metrics": {k: (None if v is None else float(v)) for k, v in summary.items()},
        "validation_loss": prog.val_loss, "method_report": method.report(state),
        # row i, column j: % of task j's test prompts routed to task j after training task i
        "routing_accuracy": prog.routing if any(x is not None for x in prog.routing) else None,
        "seconds": round(time.time() - start_time, 1), "train_seconds": round(prog.train_seconds, 1),
        "eval_seconds": round(prog.eval_seconds, 1), "hook_seconds": round(prog.hook_seconds, 1),
        # this invocation's XLA compilations (a resumed run counts only its own), seconds summed over
        # the threads that compile in parallel
        "compile_seconds": round(clock.seconds(), 1), "compilations": clock.count(),
        "peak_memory_gib": peak_memory_gib(),
        # the process's peak before this run: where it equals peak_memory_gib, an earlier run of the
        # same process (experiments/run_benchmark.py) set the peak and this run's own is not known
        "peak_memory_gib_at_start": peak_at_start,
        # this invocation's set-up before the clock of ``seconds``: tasks read, model loaded, stream
        # tokenized and weights placed (``prepare``)
        **setup,
        "config": cfg.to_dict(), "versions": _versions(),
    }
    folder.log(prog, {"event": "end", **{k: results[k] for k in _TIMINGS}})
    folder.write_results(results)
    folder.close()
    return results


# What the log's last line ("event": "end") repeats from results.json.
_TIMINGS = ("seconds", *PHASE_SECONDS, "compilations", "peak_memory_gib", "data_seconds", "model_seconds",
            "prepare_seconds")


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="step", leave=True)
