"""The continual-learning loop: train each task in order, evaluate every task after each one.

``run(config, out_dir)`` writes into ``out_dir``:
  ``results.json`` (atomically, only when the run is complete), ``log.jsonl`` (one line per optimizer
  step and per evaluation), and Orbax ``checkpoints/`` after every task and every
  ``train.checkpoint_every`` steps. ``run(..., resume=True)`` continues from the last checkpoint and
  ends with the same results as an uninterrupted run: batches and dropout keys are pure functions of
  ``(seed, task, step)``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
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
from jaxcl import methods as jmethods
from jaxcl.data import batching, scoring, tokenization
from jaxcl.kernels import metrics as jmetrics
from jaxcl.methods.base import Method, TaskInfo
from jaxcl.train import optim, sharding as jsharding, step as jstep
from jaxcl.train.checkpoint import Checkpointer, write_json_atomic
from jaxcl.train.config import RunConfig


class RunError(ValueError):
    """The run cannot start (e.g. its output folder holds another run)."""


class Interrupted(Exception):
    """Raised by the ``stop_after_steps`` hook that tests use to simulate a killed run."""


@dataclasses.dataclass
class PreparedTask:
    name: str
    metric: str
    train: list            # TokenizedExample
    validation: list
    test: list
    golds: list            # per test example, tuple of gold strings


def load_tasks(cfg: RunConfig) -> list:
    """The tasks of ``cfg.data`` in training order (read before the model, so data errors come fast)."""
    d = cfg.data
    return jdata.load_stream(d.source, d.order if isinstance(d.order, str) else list(d.order), d.root)


def prepare_stream(cfg: RunConfig, tasks: list, tokenizer, encoder_decoder: bool) -> tuple[list[PreparedTask], Any]:
    """Split off the validation part of each task and tokenize everything."""
    d = cfg.data
    spec = tokenization.make_batch_spec(
        tokenizer, "seq2seq" if encoder_decoder else "decoder", d.max_prompt_tokens, d.max_answer_tokens,
        bucket_multiple=16)
    prepared = []
    for i, task in enumerate(tasks):
        train = task.train[: d.max_train_per_task] if d.max_train_per_task else task.train
        train, validation = jdata.split_validation(train, fraction=d.validation_fraction, seed=cfg.train.seed + i)
        test = task.test
        if cfg.eval.max_test_per_task and len(test) > cfg.eval.max_test_per_task:
            keep = np.sort(np.random.default_rng([cfg.train.seed, i]).permutation(len(test))[: cfg.eval.max_test_per_task])
            test = [test[j] for j in keep]
        prepared.append(PreparedTask(
            task.name, cfg.eval.metric or task.metric,
            tokenization.tokenize_examples(train, tokenizer, spec),
            tokenization.tokenize_examples(validation, tokenizer, spec),
            tokenization.tokenize_examples(test, tokenizer, spec),
            [e.golds for e in test]))
    return prepared, spec


def _versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint
    import transformers

    import jaxcl
    return {"jaxcl": jaxcl.__version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": orbax.checkpoint.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "backend": jax.default_backend(),
            "devices": [str(x) for x in jax.devices()]}


class _Runner:
    """Holds the jitted functions and the frozen parts of one run."""

    def __init__(self, cfg: RunConfig, tasks: list, model, tokenizer, method: Method, replay):
        self.cfg, self.tokenizer, self.method, self.replay = cfg, tokenizer, method, replay
        self.encoder_decoder = model.is_encoder_decoder
        self.site_shapes = model.site_shapes()
        # The config's attention path and remat policy go into the graph definition only: the
        # caller's model object keeps its own settings.
        own = model.attention, model.remat
        model.attention, model.remat = cfg.attention, cfg.remat
        self.graphdef, state = nnx.split(model)
        model.attention, model.remat = own
        base = nnx.to_pure_dict(state)
        trained, frozen = jstep.split_base(method, base)
        # -- sharding (jaxcl.train.sharding): weights by rule, batches over data x fsdp
        self.mesh = jsharding.make_mesh(cfg.mesh)
        jsharding.check_batch_size(self.mesh, cfg.train.batch_size // cfg.train.grad_accum,
                                   "train.batch_size / train.grad_accum")
        jsharding.check_batch_size(self.mesh, cfg.eval.batch_size, "eval.batch_size")
        self.frozen_base = self.place(frozen)
        # The train step donates what it trains; copy it so the caller's model stays intact.
        self.trained_base = self.place(jax.tree.map(jnp.copy, trained))
        self.tasks, self.spec = prepare_stream(cfg, tasks, tokenizer, self.encoder_decoder)
        self.eos = int(self.spec.eos_id)
        self.key = jax.random.PRNGKey(cfg.train.seed)
        gen = functools.partial(jstep.generate_step, graphdef=self.graphdef, max_new_tokens=cfg.eval.max_new_tokens,
                                eos_token_id=self.eos)
        # Evaluation outputs are replicated so that every host can read them back.
        whole = jsharding.replicated(self.mesh)
        self._generate = {m: jax.jit(functools.partial(gen, method=m), out_shardings=whole)
                          for m in {method, Method()}}
        self._route = jax.jit(functools.partial(jstep.route_step, graphdef=self.graphdef, method=method),
                              out_shardings=whole)
        self._eval_loss = jax.jit(functools.partial(self._nll, graphdef=self.graphdef, method=method,
                                                    max_targets=self.spec.max_answer_len), out_shardings=whole)

    def place(self, tree):
        """``tree`` (weights, method or optimizer state) placed on the mesh by the sharding rules."""
        return jsharding.place(self.mesh, tree)

    # -- training --------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def optimizer(self, steps: int):
        return self.method.optimizer(optim.optimizer(self.cfg.train, steps))

    @functools.lru_cache(maxsize=None)
    def train_step(self, steps: int):
        """The jitted step for phases of ``steps`` steps: one object per run and schedule, so tasks of
        equal length (and the fixed-shape method state) reuse one compiled program."""
        return jax.jit(functools.partial(jstep.train_step, graphdef=self.graphdef, method=self.method,
                                         tx=self.optimizer(steps), max_targets=self.spec.max_answer_len),
                       donate_argnums=(0,))

    # -- data ------------------------------------------------------------------------------------
    def phase_steps(self, members: list[int]) -> int:
        """Optimizer steps of a phase: ``train.steps_per_task`` per task, or ``epochs`` over its data."""
        t = self.cfg.train
        if t.steps_per_task:
            return t.steps_per_task * len(members)
        n = sum(len(self.tasks[i].train) for i in members)
        return max(1, math.ceil(t.epochs * batching.steps_per_epoch(n, t.batch_size)))

    def feed(self, phase: int, members: list[int], past: list[int]) -> Callable[[int], dict]:
        """``step -> batch`` for one phase: a pure function of (seed, phase, step)."""
        t = self.cfg.train
        train = [x for i in members for x in self.tasks[i].train]
        ids = np.concatenate([np.full(len(self.tasks[i].train), i, np.int32) for i in members])
        memory, memory_ids = [], []
        for i in (past if self.replay else []):
            keep = batching.memory_indices(len(self.tasks[i].train), self.replay.per_task, t.seed + i)
            memory += [self.tasks[i].train[k] for k in keep]
            memory_ids += [i] * len(keep)
        ids = np.concatenate([ids, np.asarray(memory_ids, np.int32)])
        seed = t.seed * 1000 + phase

        def batch(step: int) -> dict:
            if memory:
                b = batching.replay_batch(train, memory, t.batch_size, self.replay.fraction, seed, step, self.spec)
            else:
                b = batching.train_batch(train, t.batch_size, seed, step, self.spec)
            b["task_ids"] = ids[b.pop("example_index")]
            b.pop("position_ids", None)
            # (grad_accum, micro, ...) for the scan over micro-batches inside the step
            b = {k: v.reshape((t.grad_accum, -1) + v.shape[1:]) for k, v in b.items()}
            return jsharding.shard_batch(self.mesh, b, batch_axis=1)
        return batch

    def task_batches(self, members: list[int], split: str = "train"):
        """Every example of ``split`` (train or validation) of the tasks ``members`` once, in order
        (see ``TaskInfo.batches``)."""
        size = self.cfg.eval.batch_size
        rows = [(i, x) for i in members for x in getattr(self.tasks[i], split)]
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            real = np.arange(size) < len(chunk)
            chunk = chunk + [chunk[-1]] * (size - len(chunk))
            b = batching.collate_train([x for _, x in chunk], real, self.spec)
            b.pop("position_ids", None)
            yield dict(b, task_ids=np.array([i for i, _ in chunk], np.int32), real=real)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, method: Method, params: dict, fixed: dict) -> tuple[list[float], Optional[list[float]]]:
        """Score (%) on every task's test set, and the routing accuracy (%) per task for methods that
        route (``Method.route``), else None."""
        scores, routed = [], []
        fn = self._generate[method]
        params, fixed = self.place(params), self.place(fixed)
        routes = type(method).route is not Method.route
        for j, task in enumerate(self.tasks):
            preds, hits = [], []
            for indices, b in batching.eval_batches(task.test, self.cfg.eval.batch_size, self.spec):
                b = jsharding.shard_batch(self.mesh, {k: b[k] for k in ("input_ids", "attention_mask")})
                out = np.asarray(fn(params, self.frozen_base, fixed, b["input_ids"], b["attention_mask"], j))
                for row in out[: len(indices)]:
                    row = list(row)
                    row = row[: row.index(self.eos)] if self.eos in row else row
                    preds.append(scoring.extract_answer(self.tokenizer.decode(row, skip_special_tokens=True)))
                if routes:
                    picked = np.asarray(self._route(params, self.frozen_base, fixed, b["input_ids"], b["attention_mask"]))
                    hits.extend(picked[: len(indices)] == j)
            scores.append(float(scoring.score(task.metric, preds, task.golds)))
            routed.append(100.0 * float(np.mean(hits)) if routes else None)
        return scores, (routed if routes else None)

    @staticmethod
    def _nll(params, frozen_base, fixed, batch, *, graphdef, method, max_targets):
        model = jstep.bind(graphdef, jstep.merge_base(params["base"], frozen_base))
        state = {"train": params["method"], "fixed": fixed}
        return jstep.answer_nll(model, batch, method.adapter(state, method.train_ctx(model, state, batch)), max_targets)

    def validation_loss(self, params: dict, fixed: dict, index: int) -> Optional[float]:
        """Mean answer-token cross-entropy on the task's validation split (carved from train)."""
        task = self.tasks[index]
        if not task.validation:
            return None
        total, count = 0.0, 0.0
        params, fixed = self.place(params), self.place(fixed)
        for start in range(0, len(task.validation), self.cfg.eval.batch_size):
            rows = task.validation[start:start + self.cfg.eval.batch_size]
            real = np.ones(len(rows), bool)
            rows = rows + [rows[-1]] * (self.cfg.eval.batch_size - len(rows))
            real = np.concatenate([real, np.zeros(len(rows) - len(real), bool)])
            b = batching.collate_train(rows, real, self.spec)
            b.pop("position_ids", None)
            b["task_ids"] = np.full(len(rows), index, np.int32)
            nll, n = self._eval_loss(params, self.frozen_base, fixed, jsharding.shard_batch(self.mesh, b))
            total, count = total + float(nll), count + float(n)
        return total / max(count, 1.0)


def run(cfg: RunConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
        stop_after_steps: Optional[int] = None, model_and_tokenizer=None) -> dict:
    """Run ``cfg`` and write ``out_dir/results.json``; returns the results dict.

    Args:
      cfg: the run configuration.
      out_dir: output folder (created); must not hold another run unless ``resume``.
      resume: continue from the last checkpoint in ``out_dir`` (from scratch if there is none).
      progress: show progress bars.
      stop_after_steps: raise ``Interrupted`` after this many optimizer steps of this invocation,
        right after a checkpoint (tests use it to simulate a killed run).
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` (else ``cfg.model`` is loaded).
    """
    from jaxcl.models import load_model

    jsharding.initialize_distributed()  # a multi-host run when the environment names a coordinator
    method, replay = jmethods.build(cfg.method, cfg.method_args)
    results_path = os.path.join(out_dir, "results.json")
    has_run = os.path.exists(results_path) or os.path.isdir(os.path.join(out_dir, "checkpoints"))
    if has_run and not resume:
        raise RunError(f"{out_dir} already holds a run (results.json or checkpoints/); pass --resume to continue it "
                       "or choose another --out")
    if jax.process_count() > 1:  # every process looks at the folder before any of them writes to it
        multihost_utils.sync_global_devices("jaxcl: output folder checked")
    tasks = load_tasks(cfg)
    if model_and_tokenizer is None:
        model_and_tokenizer = load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
    model, tokenizer = model_and_tokenizer
    # Every process computes; only the first writes the log and results (Orbax coordinates its own).
    primary = jax.process_index() == 0
    r = _Runner(cfg, tasks, model, tokenizer, method, replay)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(out_dir)
    log_path = os.path.join(out_dir, "log.jsonl")

    phases = [list(range(len(r.tasks)))] if method.joint else [[i] for i in range(len(r.tasks))]
    state = method.init(jax.random.fold_in(r.key, 10**6), r.site_shapes, len(phases))
    trained_base = r.trained_base
    meta = {"phase": 0, "step": 0, "rows": [], "routing": [], "base_scores": None, "val_loss": [], "log_lines": 0,
            "checkpoint": 0, "seconds": 0.0}
    restored_opt = None
    latest = ckpt.latest() if resume else None
    if latest is not None:
        ck_step, meta = latest
        params = ckpt.restore(ck_step, "params")
        fixed = ckpt.restore(ck_step, "fixed") if ckpt.has(ck_step, "fixed") else {}
        state, trained_base = {"train": params["method"], "fixed": fixed}, params["base"]
        if meta["step"]:  # a mid-task checkpoint: the optimizer state continues too
            tx = r.optimizer(r.phase_steps(phases[meta["phase"]]))
            restored_opt = ckpt.restore(ck_step, "opt", jax.eval_shape(tx.init, params))
        if primary:
            _truncate_log(log_path, meta["log_lines"])
    start_time = time.time() - meta["seconds"]
    steps_this_call = 0

    def log(record: dict) -> None:
        meta["log_lines"] += 1
        if not primary:
            return
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save(params: dict, fixed: dict, opt_state=None) -> None:
        meta["checkpoint"] += 1
        meta["seconds"] = time.time() - start_time
        # Orbax refuses empty items: a method without fixed state (SeqLoRA) saves none.
        items = {"params": params} | ({"fixed": fixed} if fixed else {}) | ({} if opt_state is None else {"opt": opt_state})
        ckpt.save(meta["checkpoint"], items, meta)

    if meta["base_scores"] is None:
        meta["base_scores"], _ = r.evaluate(Method(), {"method": {}, "base": trained_base}, {})
        log({"event": "eval", "after": "base", "scores": meta["base_scores"]})

    for phase in range(meta["phase"], len(phases)):
        members = phases[phase]
        info = TaskInfo(phase, len(phases), "+".join(r.tasks[i].name for i in members),
                        batches=functools.partial(r.task_batches, members),
                        validation_batches=functools.partial(r.task_batches, members, split="validation"),
                        model=jstep.bind(r.graphdef, jstep.merge_base(trained_base, r.frozen_base)))
        steps = r.phase_steps(members)
        tx = r.optimizer(steps)
        if restored_opt is None:
            state = method.begin_task(jax.random.fold_in(r.key, 2 * phase + 1), state, info, r.site_shapes)
            params = {"method": state["train"], "base": trained_base}
            tstate = jstep.TrainState(params, tx.init(params), jnp.int32(0))
        else:
            params = {"method": state["train"], "base": trained_base}
            tstate = jstep.TrainState(params, restored_opt, jnp.int32(meta["step"]))
            restored_opt = None
        tstate, fixed = r.place(tstate), r.place(state["fixed"])
        feed = r.feed(phase, members, [i for ph in phases[:phase] for i in ph])
        step_fn = r.train_step(steps)
        bar = _progress(progress and primary, steps, meta["step"], info.name)
        t_last = time.time()

        def record(s: int, m: dict) -> None:
            """Log step ``s``: reading its metrics back waits for that step (and only that step)."""
            nonlocal t_last
            loss, now = float(m["loss"]), time.time()
            log({"event": "step", "phase": phase, "step": s + 1, "loss": loss, "ce": float(m["ce"]),
                 "seconds": round(now - t_last, 4)} | {k: float(m[k]) for k in ("base_changed",) if k in m})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", steps_per_s=f"{1.0 / max(now - t_last, 1e-9):.2f}")
                bar.update(1)
            t_last = now

        # Step s is logged after step s + 1 is dispatched, so the host builds the next batch while
        # the device computes: no step waits for the host.
        pending = None
        for s in range(meta["step"], steps):
            key = jax.random.fold_in(jax.random.fold_in(r.key, phase), s)
            tstate, m = step_fn(tstate, r.frozen_base, fixed, feed(s), key)
            if pending is not None:
                record(*pending)
            pending, meta["step"] = (s, m), s + 1
            steps_this_call += 1
            stopping = stop_after_steps is not None and steps_this_call >= stop_after_steps
            every = cfg.train.checkpoint_every
            if s + 1 < steps and (stopping or (every and (s + 1) % every == 0)):
                record(*pending)  # a checkpoint covers every step logged before it
                pending = None
                save(tstate.params, fixed, tstate.opt_state)
                if stopping:
                    raise Interrupted(f"stopped after {steps_this_call} steps (phase {phase}, step {s + 1})")
        if pending is not None:
            record(*pending)
        if bar is not None:
            bar.close()
        trained_base = tstate.params["base"]
        meta["val_loss"] += [r.validation_loss(tstate.params, fixed, i) for i in members]
        info = dataclasses.replace(info, model=jstep.bind(r.graphdef, jstep.merge_base(trained_base, r.frozen_base)))
        state = method.end_task({"train": tstate.params["method"], "fixed": fixed}, info)
        row, routed = r.evaluate(method, {"method": state["train"], "base": trained_base}, state["fixed"])
        meta["rows"].append(row)
        meta["routing"].append(routed)
        log({"event": "eval", "after": info.name, "scores": row, "routing_accuracy": routed})
        meta["phase"], meta["step"] = phase + 1, 0
        save({"method": state["train"], "base": trained_base}, state["fixed"])
        if stop_after_steps is not None and steps_this_call >= stop_after_steps and phase + 1 < len(phases):
            raise Interrupted(f"stopped after phase {phase}")

    matrix = np.array(meta["rows"])
    if method.joint:
        summary = {"AP": float(matrix[-1].mean()), "BWT": None, "FWT": None, "forgetting": None}
    else:
        summary = jmetrics.summarize(matrix, np.array(meta["base_scores"]))
    results = {
        "method": cfg.method, "model": cfg.model, "tasks": [t.name for t in r.tasks], "matrix": meta["rows"],
        "base_scores": meta["base_scores"],
        "metrics": {k: (None if v is None else float(v)) for k, v in summary.items()},
        "validation_loss": meta["val_loss"], "method_report": method.report(state),
        # row i, column j: % of task j's test prompts routed to task j after training task i
        "routing_accuracy": meta["routing"] if any(x is not None for x in meta["routing"]) else None,
        "seconds": round(time.time() - start_time, 1), "config": cfg.to_dict(), "versions": _versions(),
    }
    if primary:
        write_json_atomic(results_path, results)
    ckpt.close()
    return results


def _truncate_log(path: str, lines: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = f.readlines()[:lines]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="step", leave=True)
