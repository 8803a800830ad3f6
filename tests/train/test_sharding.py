"""Sharding: the weight/adapter/batch rules, the mesh from config, and a CL run that gives the same
losses and accuracy matrix on 1 device and on 8 (forced host) devices with data, fsdp and mixed
(data x fsdp x tensor) meshes.

The 8-device runs need ``--xla_force_host_platform_device_count`` before JAX starts, so they run in a
subprocess: this file is also that subprocess's script (``python test_sharding.py OUT MESH...``).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxcl.methods import axes as jaxes
from jaxcl.methods.axes import Axes
from jaxcl.train import config as jconfig
from jaxcl.train import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SUBPROCESS_PATH = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])  # jaxcl and tiny_cl
MESHES = {"data8": {"data": 8}, "fsdp8": {"data": 1, "fsdp": 8}, "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}


def _specs(values, axes, mesh):
    """``{path: PartitionSpec}`` of ``values`` whose dimensions have the ``Axes`` leaves of ``axes``."""
    flat = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, Axes))
    shapes = [np.shape(v) for v in jax.tree.leaves(values)]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): sharding.logical_spec(a.names, shape, mesh)
            for (path, a), shape in zip(flat, shapes)}


def _model_specs(model, mesh):
    from jaxcl.train.loop import _axes_leaves

    return _specs(nnx.to_pure_dict(nnx.state(model)), _axes_leaves(model.param_axes()), mesh)


def test_llama_weight_rules():
    from tiny_cl import tiny_llama

    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    specs = _model_specs(tiny_llama(64), mesh)
    into, out = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
    assert {k: specs[f"layers/{k}"] for k in ("q", "k", "v", "gate", "up")} == dict.fromkeys(
        ("q", "k", "v", "gate", "up"), into)
    assert specs["layers/o"] == out and specs["layers/down"] == out
    assert specs["embed"] == P("tensor", "fsdp") and specs["lm_head"] == P("fsdp", "tensor")
    # norm scales are (layers, embed): the model width is on fsdp wherever it appears
    assert specs["layers/attn_norm"] == P(None, "fsdp") and specs["layers/mlp_norm"] == P(None, "fsdp")
    assert specs["norm"] == P("fsdp")


def test_t5_weight_rules():
    from jaxcl.models import t5

    config = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    specs = _model_specs(t5.T5(config, rngs=nnx.Rngs(0)), AbstractMesh((1, 2, 2), sharding.AXES))
    into, out = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
    for stack in ("encoder", "decoder"):
        for name in ("self_attn_q", "self_attn_k", "self_attn_v", "mlp_wi_0", "mlp_wi_1"):
            assert specs[f"{stack}/layers/{name}"] == into, name
        assert specs[f"{stack}/layers/self_attn_o"] == out and specs[f"{stack}/layers/mlp_wo"] == out
        assert specs[f"{stack}/relative_attention_bias"] == P()  # (relpos, heads): never split
        assert specs[f"{stack}/final_norm"] == P("fsdp") and specs[f"{stack}/layers/self_attn_norm"] == P(None, "fsdp")
    assert specs["decoder/layers/cross_attn_q"] == into and specs["decoder/layers/cross_attn_o"] == out
    assert specs["shared"] == P("tensor", "fsdp") and specs["lm_head"] == P("fsdp", "tensor")


def test_adapters_and_optimizer_state_follow_their_base_weight():
    import optax

    from jaxcl.methods.base import ModelInfo
    from jaxcl.methods.olora import OLoRA

    shapes = {"attn.q": (2, 32, 48), "attn.o": (2, 48, 32), "encoder.mlp.wi_0": (2, 32, 64)}
    names = {"attn.q": ("embed", "q_heads"), "attn.o": ("q_heads", "embed"), "encoder.mlp.wi_0": ("embed", "mlp")}
    method = OLoRA(sites=tuple(shapes), rank=4)
    values, axes = jaxes.split(method.init(jax.random.PRNGKey(0), ModelInfo(shapes, names, 32, False), 3))
    mesh = AbstractMesh((1, 2, 2), sharding.AXES)
    specs = _specs(values, axes, mesh)
    # a (L, r, d_in), b (L, d_out, r): the model width on fsdp; head / mlp widths on tensor, then
    # on fsdp as well when no other dimension took it
    assert specs["params/lora/attn.q/a"] == P(None, None, "fsdp")
    assert specs["params/lora/attn.q/b"] == P(None, ("tensor", "fsdp"))
    assert specs["params/lora/attn.o/a"] == P(None, None, ("tensor", "fsdp"))
    assert specs["params/lora/attn.o/b"] == P(None, "fsdp")
    assert specs["params/lora/encoder.mlp.wi_0/a"] == P(None, None, "fsdp")
    assert specs["fixed/past/attn.q/a"] == P(None, None, None, "fsdp")               # (L, T, r, d_in)
    assert specs["fixed/past/attn.q/b"] == P(None, None, ("tensor", "fsdp"))          # (L, T, d_out, r)
    # optimizer moments take their parameter's sharding; the step count is replicated
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1])
    shardings = sharding.tree_shardings(mesh, values.params, axes.params)
    opt = optax.adamw(1e-3).init(values.params)
    follow = sharding.follow_params(mesh, opt, values.params, shardings)
    mu = follow[0].mu.lora["attn.o"].b
    assert mu is shardings.lora["attn.o"].b and follow[0].count.spec == P()


def test_mesh_from_config_and_batch_checks():
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh(jconfig.MeshConfig(), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(sharding.MeshError, match="needs 4 devices, there are 1"):
        sharding.make_mesh(jconfig.MeshConfig(data=2, fsdp=2), devices)
    with pytest.raises(sharding.MeshError, match="groups of 3"):
        sharding.make_mesh(jconfig.MeshConfig(data=-1, tensor=3), devices)
    big = AbstractMesh((2, 4, 1), sharding.AXES)
    sharding.check_batch_size(big, 16, "train.batch_size")
    with pytest.raises(sharding.MeshError, match="train.batch_size = 12 must be a multiple of mesh data x fsdp = 8"):
        sharding.check_batch_size(big, 12, "train.batch_size")


def test_bad_mesh_config_is_one_clear_error(stream_root):
    from tiny_cl import tiny_config

    with pytest.raises(jconfig.ConfigError, match=r"config.mesh: sizes must be positive"):
        jconfig.from_dict(tiny_config(stream_root, mesh={"data": -1, "fsdp": -1}))
    with pytest.raises(jconfig.ConfigError, match=r"config.mesh.fsdp: expected int"):
        jconfig.from_dict(tiny_config(stream_root, mesh={"fsdp": "two"}))


def test_distributed_start_needs_a_coordinator():
    assert sharding.initialize_distributed({}) is False
    with pytest.raises(sharding.MeshError, match="JAXCL_NUM_PROCESSES: expected an integer"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAXCL_NUM_PROCESSES": "two"})


def _cl_config(stream_root, mesh):
    from tiny_cl import TASKS, tiny_config

    return jconfig.from_dict(tiny_config(stream_root, data={"order": list(TASKS)[:2]}, mesh=mesh,
                                         train={"steps_per_task": 4, "batch_size": 8, "lr": 1e-2}))


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["event"] == "step"]


@pytest.mark.slow
def test_cl_run_gives_the_same_results_on_1_and_8_devices(stream_root, tiny_model, tmp_path):
    from jaxcl.train.loop import run

    single = run(_cl_config(stream_root, {}), str(tmp_path / "one"), model_and_tokenizer=tiny_model, progress=False)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=SUBPROCESS_PATH)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), stream_root, *MESHES],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    # q is (L, d, H*hd) = (2, 32, 32): whole on a data mesh, d split 8 ways on fsdp, 2 x 2 on the mix
    assert report["data8"]["q_shard"] == [2, 32, 32] and report["fsdp8"]["q_shard"] == [2, 4, 32]
    assert report["mixed"]["q_shard"] == [2, 16, 16]
    assert len(_losses(tmp_path / "one")) == 2 * 4
    for name in MESHES:
        np.testing.assert_allclose(_losses(tmp_path / name), _losses(tmp_path / "one"), atol=1e-3, rtol=0)
        np.testing.assert_allclose(report[name]["matrix"], single["matrix"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(report[name]["base_scores"], single["base_scores"], atol=1e-3, rtol=0)
        # the step's outputs come back with its input shardings: every call runs the program
        # compiled ahead, the second step's too
        assert report[name]["step_misses"] == [0, 0], name


def _step_misses(runner) -> list[int]:
    """Calls of the optimizer init and of two train steps that found no program compiled ahead."""
    from jaxcl.methods.base import StepContext
    from jaxcl.train import step as jstep

    runner.compile_ahead()
    params, fixed = runner.placed(runner.initial, runner.trained_base)
    opt = runner.opt_init(params)
    ctx = sharding.place(StepContext.start(0, 2, 0), runner.state_shardings.ctx)
    tstate = jstep.TrainState(params, opt, ctx)
    feed = runner.stream.train_feed(0, [0], [], None)
    for s in range(2):
        tstate, _ = runner.train_step(tstate, runner.frozen_base, fixed, feed(s), runner.step_key(runner.key, 0, s))
    return [runner.opt_init.misses, runner.train_step.misses]


def _worker(out_root: str, stream_root: str, meshes: list[str]) -> None:
    """Runs the CL config under each named mesh; prints one JSON line with what the test checks."""
    from tiny_cl import TASKS, tiny_llama, word_tokenizer

    from jaxcl import methods
    from jaxcl.data import load_stream
    from jaxcl.train import loop

    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    tokenizer = word_tokenizer([e.prompt + " " + e.answer for t in tasks for e in t.train + t.test])
    report = {"devices": jax.device_count()}
    for name in meshes:
        cfg = _cl_config(stream_root, MESHES[name])
        results = loop.run(cfg, os.path.join(out_root, name), progress=False,
                           model_and_tokenizer=(tiny_llama(len(tokenizer)), tokenizer))
        method = methods.build(cfg.method, cfg.method_args)
        runner = loop._Runner(cfg, loop.load_tasks(cfg), tiny_llama(len(tokenizer)), tokenizer, method, 2,
                              loop.make_mesh(cfg))
        report[name] = {"matrix": results["matrix"], "base_scores": results["base_scores"],
                        "q_shard": list(runner.frozen_base["layers"]["q"].addressable_shards[0].data.shape),
                        "step_misses": _step_misses(runner)}
    print(json.dumps(report))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
