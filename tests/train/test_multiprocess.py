"""The multi-host path, exercised: two processes on this machine join one JAX run through a localhost
coordinator (``jaxcl.train.sharding.initialize_distributed``, CPU collectives over gloo), place the
weights across both on an fsdp x tensor mesh, feed host-local batch rows, and take train steps whose
losses match a single-process run.

This file is also the worker's script (``python test_multiprocess.py OUT``, configured by the
environment that ``initialize_distributed`` reads).
"""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.methods import axes as jaxes
from jaxcl.methods.base import ModelInfo, StepContext
from jaxcl.methods.seq_lora import SeqLoRA
from jaxcl.train import config as jconfig
from jaxcl.train import optim, sharding
from jaxcl.train import step as jstep

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS, BATCH, LENGTH, VOCAB = 3, 8, 16, 64


def _batch(step: int) -> dict:
    """A right-padded decoder batch ``(grad_accum=1, B, S)``; the last 4 real tokens are the answer."""
    rng = np.random.default_rng(step)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)
    real = np.arange(LENGTH)[None] < lengths[:, None]
    ids = np.where(real, rng.integers(4, VOCAB, (BATCH, LENGTH)), 0).astype(np.int32)
    answer = real & (np.arange(LENGTH)[None] >= lengths[:, None] - 4)
    batch = {"input_ids": ids, "attention_mask": real.astype(np.int32), "loss_mask": answer.astype(np.float32),
             "task_ids": np.zeros(BATCH, np.int32)}
    return {k: v[None] for k, v in batch.items()}


def train_losses(mesh) -> tuple[list[float], jax.Array]:
    """Losses of ``STEPS`` SeqLoRA steps of the tiny Llama on ``mesh``, and the placed q weight."""
    from tiny_cl import tiny_llama

    from jaxcl.train.loop import _axes_leaves

    model = tiny_llama(VOCAB)
    graphdef, weights = nnx.split(model)
    method = SeqLoRA()
    trained, frozen = jstep.split_base(method, nnx.to_pure_dict(weights))
    mstate, axes = jaxes.split(method.init(jax.random.PRNGKey(1), ModelInfo.of(model), 1))
    make_tx = functools.partial(optim.optimizer, jconfig.TrainConfig(lr=1e-2))
    params = {"method": mstate.params, "base": trained}
    whole = sharding.replicated(mesh)
    param_shardings = {"method": sharding.tree_shardings(mesh, mstate.params, axes.params),
                       "base": jax.tree.map(lambda _: whole, trained)}
    opt = make_tx(STEPS).init(params)
    shardings = jstep.TrainState(param_shardings, sharding.follow_params(mesh, opt, params, param_shardings),
                                 jax.tree.map(lambda _: whole, StepContext.start(0, STEPS, 0)))
    tstate = sharding.place(jstep.TrainState(params, opt, StepContext.start(0, STEPS, 0)), shardings)
    frozen = sharding.place(frozen, sharding.tree_shardings(mesh, frozen, _axes_leaves(model.param_axes())))
    fixed = sharding.place(mstate.fixed, sharding.tree_shardings(mesh, mstate.fixed, axes.fixed))
    step = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, make_tx=make_tx,
                                     max_targets=4), donate_argnums=(0,))
    losses = []
    for s in range(STEPS):
        key = sharding.place(jax.random.PRNGKey(100 + s), whole)
        tstate, metrics = step(tstate, frozen, fixed, sharding.shard_batch(mesh, _batch(s), batch_axis=1), key)
        losses.append(float(metrics["loss"]))
    return losses, frozen["layers"]["q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    mesh = sharding.make_mesh(jconfig.MeshConfig(data=1), jax.devices()[:1])
    expected, _ = train_losses(mesh)
    outputs = [json.loads(out.strip().splitlines()[-1]) for out in _spawn([])]
    assert sorted(o["process"] for o in outputs) == [0, 1]
    for o in outputs:
        assert o["processes"] == 2 and o["devices"] == 4 and o["local_devices"] == 2
        # q (L, d, H*hd) = (2, 32, 32) split over fsdp = 2 (across the processes) and tensor = 2
        assert o["q_shard"] == [2, 16, 16]
        np.testing.assert_allclose(o["losses"], expected, atol=1e-4, rtol=0)


def _spawn(args: list[str]) -> list[str]:
    """Run this file as two processes of one JAX run (2 CPU devices each); their stdout."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAXCL_NUM_PROCESSES="2", JAXCL_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


@pytest.mark.slow
def test_two_process_cl_run_matches_one_process_and_writes_once(stream_root, tmp_path, tiny_model):
    from tiny_cl import tiny_config

    from jaxcl.train.loop import run

    cfg = tiny_config(stream_root, method="seq_lora", train={"steps_per_task": 3})
    one = run(jconfig.from_dict(cfg), str(tmp_path / "one"), progress=False, model_and_tokenizer=tiny_model)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(cfg, mesh={"data": 2, "fsdp": 2}), f)
    _spawn(["run", stream_root, str(tmp_path / "config.json"), str(tmp_path / "two")])
    with open(tmp_path / "two" / "results.json") as f:
        two = json.load(f)
    np.testing.assert_allclose(two["matrix"], one["matrix"], atol=1e-3)
    with open(tmp_path / "one" / "log.jsonl") as f1, open(tmp_path / "two" / "log.jsonl") as f2:
        losses = [[r["loss"] for r in map(json.loads, f) if r["event"] == "step"] for f in (f1, f2)]
    assert len(losses[1]) == len(losses[0])  # one writer: each step logged once, not twice
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-4)


def _run_worker(stream_root: str, config: str, out: str) -> None:
    """One process of a two-process ``jaxcl.train.loop.run`` of the tiny stream."""
    from tiny_cl import TASKS, tiny_llama, word_tokenizer

    from jaxcl.data import load_stream
    from jaxcl.train.loop import run

    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    tokenizer = word_tokenizer([e.prompt + " " + e.answer for t in tasks for e in t.train + t.test])
    with open(config) as f:
        cfg = jconfig.from_dict(json.load(f))
    run(cfg, out, progress=False, model_and_tokenizer=(tiny_llama(len(tokenizer)), tokenizer))


def _worker() -> None:
    assert sharding.initialize_distributed()
    if sys.argv[1:2] == ["run"]:
        _run_worker(*sys.argv[2:5])
        return
    mesh = sharding.make_mesh(jconfig.MeshConfig(data=1, fsdp=2, tensor=2))
    losses, q = train_losses(mesh)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "q_shard": list(q.addressable_shards[0].data.shape), "losses": losses}))


if __name__ == "__main__":
    _worker()
