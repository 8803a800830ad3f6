"""LoRA training-step and RLS-router throughput: jaxcl against HF transformers + peft, side by side.

One invocation runs every selected case on the same GPU, each in its own subprocess (so each starts
with an empty device and reports its own peak memory), and writes ``OUT/raw.json``:

  jaxcl          ``jaxcl.train.step.train_step`` (the engine's jitted step, buffers donated) on a
                 random-weight Llama/T5 in bfloat16 with ``SeqLoRA`` (r=8, alpha=32, dropout 0.1,
                 float32 adapters) on the q and v projections, AdamW (optax).
  torch_eager    transformers' LlamaForCausalLM / T5ForConditionalGeneration, bfloat16, peft LoRA
  torch_compiled with the same settings (the setup of the project's PyTorch anchors),
                 the second under ``torch.compile``.
  rls            Any-SSR's router update at E = 10000 features: the per-sample (official-style)
                 loop and the blocked Woodbury update, in jaxcl (``jaxcl.kernels.rls``) and torch,
                 with the relative error against the joint ridge solution.

Each step time is the median of ``--steps`` steps (each synchronised) after 3 warm-up steps; the
same batch is used every step, as in the anchors. FLOPs for MFU (frozen weights: no weight
gradients, so forward 2 + backward 2 FLOPs per weight and token):
  decoder-only   tokens x (4 N + 6 L S d)   (N all parameters, L layers, S sequence, d width;
                 causal attention 2 S d per token and layer forward, x3 with the backward)
  T5             4 x (weights x tokens through them: encoder layers x S, decoder layers x T,
                 cross-attention k/v x S, lm_head x T) + 3 x attention (encoder 4 S^2 h,
                 decoder self 2 T^2 h, cross 4 T S h per layer; h = heads x d_kv)

Usage (GPU):
  python bench/bench_lora_step.py --out DIR                         # every case
  python bench/bench_lora_step.py --out DIR --only jaxcl,rls --workloads smollm2_135m
  python bench/bench_lora_step.py --out DIR --jaxcl-variants "attention=cudnn;attention=cudnn,remat=True"
      (variant keys: attention, remat, scan (false: unrolled layers), prng, dropout, data (GPUs, data parallel), profile (adds a jax.profiler
      breakdown), xla_flags (flags joined by "+", a comma inside a flag's value written "|"))
  python bench/bench_lora_step.py --summarize DIR/raw.json [...]   # -> bench/results.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# HF config dicts (the anchors' shapes); jaxcl builds its models from the same dicts via from_hf.
WORKLOADS = {
    "llama2_7b": dict(kind="llama", batch=8, seq=512, lr=1e-4, hf=dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096)),
    "smollm2_135m": dict(kind="llama", batch=16, seq=512, lr=1e-4, hf=dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)),
    "t5_large": dict(kind="t5", batch=8, src=512, tgt=50, lr=1e-3, hf=dict(
        vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16,
        feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)),
    # CPU smoke-test sizes
    "tiny_llama": dict(kind="llama", batch=4, seq=32, lr=1e-4, hf=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)),
    "tiny_t5": dict(kind="t5", batch=4, src=32, tgt=8, lr=1e-3, hf=dict(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)),
}
LORA = dict(rank=8, alpha=32.0, dropout=0.1)
LLAMA_SITES = ("attn.q", "attn.v")
# peft's target_modules ["q", "v"] matches every T5 attention's q and v, cross-attention included.
T5_SITES = ("encoder.self_attn.q", "encoder.self_attn.v", "decoder.self_attn.q", "decoder.self_attn.v",
            "decoder.cross_attn.q", "decoder.cross_attn.v")
WARMUP = 3
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM datasheet


# ------------------------------------------------------------------------------------------- FLOPs

def step_flops(workload: dict, n_params: int) -> float:
    """FLOPs of one training step with frozen weights (see the module docstring)."""
    hf, b = workload["hf"], workload["batch"]
    if workload["kind"] == "llama":
        s, layers, d = workload["seq"], hf["num_hidden_layers"], hf["hidden_size"]
        return b * s * (4 * n_params + 6 * layers * s * d)
    s, t, d, ff, vocab = workload["src"], workload["tgt"], hf["d_model"], hf["d_ff"], hf["vocab_size"]
    inner = hf["num_heads"] * hf["d_kv"]
    mlp = d * ff * (3 if hf["feed_forward_proj"].startswith("gated") else 2)
    # per token: encoder self-attention q k v o + mlp; decoder self q k v o, cross q o + mlp (cross k v
    # run over the source tokens, counted apart)
    enc_layer, dec_layer = 4 * d * inner + mlp, 6 * d * inner + mlp
    weights_x_tokens = (s * hf["num_layers"] * enc_layer + t * hf["num_decoder_layers"] * dec_layer
                        + s * hf["num_decoder_layers"] * 2 * d * inner + t * d * vocab)
    attention = hf["num_layers"] * 4 * s * s * inner + hf["num_decoder_layers"] * (2 * t * t + 4 * t * s) * inner
    return b * (4 * weights_x_tokens + 3 * attention)


def _timing(step, block, steps: int) -> dict:
    """Compile/first step, warm-up, then ``steps`` synchronised steps and ``steps`` pipelined ones."""
    t0 = time.perf_counter()
    block(step(0))
    first = time.perf_counter() - t0
    for i in range(WARMUP):
        block(step(1 + i))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        block(step(1 + WARMUP + i))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = None
    for i in range(steps):
        out = step(1 + WARMUP + steps + i)
    block(out)
    pipelined = (time.perf_counter() - t0) / steps
    return {"first_step_s": first, "step_s": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "pipelined_step_s": pipelined, "timed_steps": steps}


def _profile(step, block, jax, steps: int = 3) -> dict:
    """Device time per step by XLA op and by category, from a ``jax.profiler`` trace of ``steps`` steps."""
    import glob
    import re
    import tempfile

    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        for i in range(steps):
            block(step(i))
    (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    ops, kernels, lines = {}, {}, []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            lines.append(line.name)
            table = ops if line.name == "XLA Ops" else kernels if line.name.startswith("Stream") else None
            if table is None:
                continue
            for event in line.events:
                total, count = table.get(event.name, (0.0, 0))
                table[event.name] = (total + event.duration_ns / 1e6 / steps, count + 1)
    categories = (("attention", r"cudnn|fmha|flash|fused_attention|custom-call"), ("matmul", r"gemm|cublas|dot|matmul"),
                  ("rng", r"threefry|philox|rng|random"), ("copy/transpose", r"copy|transpose|memcpy|memset"),
                  ("reduce", r"reduce"), ("other fusions", r"."))
    by_category = {}
    for name, (ms, _) in ops.items():
        cat = next(c for c, pattern in categories if re.search(pattern, name, re.I))
        by_category[cat] = by_category.get(cat, 0.0) + ms
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:25]
    return {"trace_lines": lines, "ops_ms_per_step": sum(ms for ms, _ in ops.values()),
            "kernels_ms_per_step": sum(ms for ms, _ in kernels.values()),
            "kernel_launches_per_step": sum(n for _, n in kernels.values()) / steps,
            "by_category_ms": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_ops_ms": [[name, round(ms, 3), n // steps] for name, (ms, n) in top],
            "top_kernels_ms": [[name[:90], round(ms, 3), n // steps] for name, (ms, n) in
                               sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]]}


def _throughput(workload: dict, timing: dict, n_params: int, device: str, devices: int = 1) -> dict:
    flops = step_flops(workload, n_params)
    out = {"step_tflop": flops / 1e12, "tflops": flops / timing["step_s"] / 1e12}
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device), None)
    if peak:
        out["mfu"] = out["tflops"] / (peak * devices)
    if workload["kind"] == "llama":
        out["tokens_per_s"] = workload["batch"] * workload["seq"] / timing["step_s"]
    else:
        out["examples_per_s"] = workload["batch"] / timing["step_s"]
    return out


def _host_batch(workload: dict, batch: int, seed: int = 0) -> dict:
    """Random token batch in jaxcl's training layout (leading grad_accum axis of 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = workload["hf"]["vocab_size"]
    if workload["kind"] == "llama":
        s = workload["seq"]
        ids = rng.integers(0, vocab, (batch, s), dtype=np.int32)
        loss_mask = np.ones((batch, s), np.float32)
        loss_mask[:, 0] = 0  # every token after the first is a target, as with labels=input_ids in HF
        b = {"input_ids": ids, "attention_mask": np.ones((batch, s), np.int32), "loss_mask": loss_mask}
    else:
        s, t = workload["src"], workload["tgt"]
        labels = rng.integers(2, vocab, (batch, t), dtype=np.int32)
        start = np.full((batch, 1), workload["hf"]["decoder_start_token_id"], np.int32)
        b = {"input_ids": rng.integers(2, vocab, (batch, s), dtype=np.int32),
             "attention_mask": np.ones((batch, s), np.int32), "labels": labels,
             "decoder_input_ids": np.concatenate([start, labels[:, :-1]], axis=1),
             "decoder_mask": np.ones((batch, t), np.int32), "loss_mask": np.ones((batch, t), np.float32)}
    b["task_ids"] = np.zeros(batch, np.int32)
    return {k: v[None] for k, v in b.items()}


# -------------------------------------------------------------------------------------- jaxcl step

def jaxcl_lora(workload: dict, variant: dict, steps: int) -> dict:
    """The engine's train step on ``workload``; ``variant``: attention, remat, scan, prng, data (GPUs)."""
    import jax

    if variant.get("prng"):
        jax.config.update("jax_default_prng_impl", variant["prng"])
    import jax.numpy as jnp
    from flax import nnx

    from jaxcl.methods import axes
    from jaxcl.methods.base import ModelInfo, StepContext
    from jaxcl.methods.seq_lora import SeqLoRA
    from jaxcl.train import config as jconfig
    from jaxcl.train import optim, sharding
    from jaxcl.train import step as jstep

    ways = int(variant.get("data", 1))
    mesh = sharding.make_mesh(jconfig.MeshConfig(data=ways), jax.devices()[:ways])
    t0 = time.perf_counter()
    if workload["kind"] == "llama":
        from jaxcl.models.llama import Llama, LlamaConfig
        model = Llama(LlamaConfig.from_hf(workload["hf"]), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        sites, max_targets = LLAMA_SITES, workload["seq"] - 1
    else:
        from jaxcl.models.t5 import T5, T5Config
        model = T5(T5Config.from_hf(workload["hf"]), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        sites, max_targets = T5_SITES, workload["tgt"]
    model.remat = variant.get("remat", False)
    model.attention = variant.get("attention")
    model.scan_layers = bool(variant.get("scan", True))
    info = ModelInfo.of(model)
    method = SeqLoRA(sites=sites, **dict(LORA, dropout=float(variant.get("dropout", LORA["dropout"]))))
    graphdef, state = nnx.split(model)
    del model
    trained, frozen = jstep.split_base(method, nnx.to_pure_dict(state))
    del state
    n_params = sum(x.size for x in jax.tree.leaves((trained, frozen)))
    mstate, _ = axes.split(method.init(jax.random.PRNGKey(1), info, 1))
    make_tx = lambda num_steps: method.optimizer(optim.optimizer(jconfig.TrainConfig(lr=workload["lr"], weight_decay=0.01), num_steps))
    params = {"method": mstate.params, "base": trained}
    whole = sharding.replicated(mesh)
    put = lambda tree: jax.tree.map(lambda x: jax.device_put(x, whole), tree)
    tstate = put(jstep.TrainState(params, make_tx(1000).init(params), StepContext.start(0, 1000, 0)))
    frozen, fixed = put(frozen), put(mstate.fixed)
    global_batch = workload["batch"] * ways
    batch = sharding.shard_batch(mesh, _host_batch(workload, global_batch), batch_axis=1)
    keys = jax.random.split(jax.random.PRNGKey(7), 1 + WARMUP + 2 * steps)
    jax.block_until_ready((tstate, frozen, batch, keys))
    setup = time.perf_counter() - t0
    fn = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, make_tx=make_tx,
                                   max_targets=max_targets), donate_argnums=(0,))
    losses = []
    holder = {"tstate": tstate}
    del tstate

    def step(i):
        holder["tstate"], metrics = fn(holder["tstate"], frozen, fixed, batch, keys[i])
        return metrics["loss"], holder["tstate"]

    def block(out):
        jax.block_until_ready(out)
        losses.append(float(out[0]))

    timing = _timing(step, block, steps)
    if variant.get("profile"):
        timing["profile"] = _profile(step, block, jax)
    device = jax.devices()[0].device_kind
    stats = [d.memory_stats() or {} for d in jax.local_devices()[:ways]]
    peak = max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30
    shape = dict(workload, batch=global_batch)
    return {**timing, **_throughput(shape, timing, n_params, device, ways), "params": n_params, "devices": ways,
            "global_batch": global_batch, "peak_mem_gib": peak, "setup_s": setup, "loss_first": losses[0],
            "loss_last": losses[-1], "device": device, "variant": variant}


# -------------------------------------------------------------------------------------- torch step

def torch_lora(workload: dict, compiled: bool, steps: int) -> dict:
    """transformers + peft, bf16 weights, LoRA on q and v, AdamW; eager or ``torch.compile``."""
    import torch
    from peft import LoraConfig, get_peft_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if workload["kind"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cls, cfg, targets, task = LlamaForCausalLM, LlamaConfig(**workload["hf"]), ["q_proj", "v_proj"], "CAUSAL_LM"
    else:
        from transformers import T5Config, T5ForConditionalGeneration
        cls, cfg, targets, task = T5ForConditionalGeneration, T5Config(**workload["hf"]), ["q", "v"], "SEQ_2_SEQ_LM"
    with torch.device(dev):
        model = cls(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=int(LORA["alpha"]), lora_dropout=LORA["dropout"],
                                             target_modules=targets, task_type=task))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=workload["lr"])
    if compiled:
        model = torch.compile(model)
    host = {k: torch.from_numpy(v[0]).long().to(dev) for k, v in _host_batch(workload, workload["batch"]).items()}
    if workload["kind"] == "llama":
        inputs = {"input_ids": host["input_ids"], "labels": host["input_ids"]}
    else:
        inputs = {"input_ids": host["input_ids"], "labels": host["labels"]}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t0
    losses = []

    def step(_):
        out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def block(loss):
        if dev == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss))

    timing = _timing(step, block, steps)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {**timing, **_throughput(workload, timing, n_params, device), "params": n_params,
            "peak_mem_gib": peak, "setup_s": setup, "loss_first": losses[0], "loss_last": losses[-1],
            "device": device, "compiled": compiled}


# ---------------------------------------------------------------------------------------- RLS router

RLS = dict(dim=10000, features_in=4096, n0=1000, n_seq=400, classes=8, block=256, gamma=100.0)


def jaxcl_rls(steps: int, **kw) -> dict:
    """``jaxcl.kernels.rls.update_blocks`` over the n_seq new samples: blocked and one at a time."""
    import jax
    import jax.numpy as jnp

    from jaxcl.kernels import rls

    c = dict(RLS, **kw)
    hi = jax.lax.Precision.HIGHEST
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    n = c["n0"] + c["n_seq"]
    features = jax.random.normal(k1, (n, c["features_in"]))
    projection = jax.random.normal(k2, (c["features_in"], c["dim"])) / c["features_in"] ** 0.5
    phi = jnp.matmul(features, projection, precision=hi)
    y = jax.nn.one_hot(jax.random.randint(k3, (n,), 0, c["classes"]), c["classes"])
    start = rls.update_blocks(rls.init(c["dim"], c["classes"], c["gamma"]), phi[:c["n0"]], y[:c["n0"]], block_size=500)
    x_new, y_new = phi[c["n0"]:], y[c["n0"]:]
    reference = jnp.linalg.solve(jnp.matmul(phi.T, phi, precision=hi) + c["gamma"] * jnp.eye(c["dim"]),
                                 jnp.matmul(phi.T, y, precision=hi))
    jax.block_until_ready((start, reference))
    out = {"dim": c["dim"], "n_seq": c["n_seq"], "device": jax.devices()[0].device_kind}
    for name, block in (("blocked", c["block"]), ("one_shot", c["n_seq"]), ("per_sample", 1)):
        state = jax.block_until_ready(rls.update_blocks(start, x_new, y_new, block_size=block))  # compile
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state = jax.block_until_ready(rls.update_blocks(start, x_new, y_new, block_size=block))
            times.append(time.perf_counter() - t0)
        error = float(jnp.linalg.norm(state.W - reference) / jnp.linalg.norm(reference))
        out[name] = {"block": block, "samples_per_s": c["n_seq"] / statistics.median(times),
                     "rel_err_vs_joint": error}
    return out


def torch_rls(steps: int, **kw) -> dict:
    """The official-style per-sample loop and the blocked Woodbury update in torch (fp32)."""
    import torch

    c = dict(RLS, **kw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    n = c["n0"] + c["n_seq"]
    phi = torch.randn(n, c["features_in"], device=dev) @ (torch.randn(c["features_in"], c["dim"], device=dev)
                                                          / c["features_in"] ** 0.5)
    y = torch.nn.functional.one_hot(torch.randint(0, c["classes"], (n,), device=dev), c["classes"]).float()
    eye = torch.eye(c["dim"], device=dev)
    r0 = torch.linalg.inv(phi[:c["n0"]].T @ phi[:c["n0"]] + c["gamma"] * eye)
    w0 = r0 @ phi[:c["n0"]].T @ y[:c["n0"]]
    reference = torch.linalg.solve(phi.T @ phi + c["gamma"] * eye, phi.T @ y)

    def per_sample():
        r, w = r0.clone(), w0.clone()
        for i in range(c["n0"], n):
            x = phi[i:i + 1]
            rx = r @ x.T
            r = r - rx @ torch.linalg.inv(torch.eye(1, device=dev) + x @ rx) @ (x @ r)
            w = w + r @ x.T @ (y[i:i + 1] - x @ w)
        return w

    def blocked():
        r, w = r0.clone(), w0.clone()
        for i in range(c["n0"], n, c["block"]):
            x, yb = phi[i:i + c["block"]], y[i:i + c["block"]]
            rx = r @ x.T
            r = r - rx @ torch.linalg.solve(torch.eye(x.shape[0], device=dev) + x @ rx, rx.T)
            w = w + r @ x.T @ (yb - x @ w)
        return w

    out = {"dim": c["dim"], "n_seq": c["n_seq"]}
    for name, fn in (("per_sample", per_sample), ("blocked", blocked)):
        fn()
        sync()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            w = fn()
            sync()
            times.append(time.perf_counter() - t0)
        out[name] = {"samples_per_s": c["n_seq"] / statistics.median(times),
                     "rel_err_vs_joint": float(torch.linalg.norm(w - reference) / torch.linalg.norm(reference))}
    return out


def environment() -> dict:
    """Versions, devices and the measured bf16 matmul rate (8192^3, random data) through JAX."""
    import importlib

    import jax
    import jax.numpy as jnp

    info = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing package is a fact to report, not a failure
            info[name] = f"missing ({type(e).__name__})"
    info["devices"] = [d.device_kind for d in jax.devices()]
    n = 8192 if jax.default_backend() == "gpu" else 256
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.PRNGKey(0)))
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    t0 = time.perf_counter()
    for _ in range(20):
        out = mm(a, b)
    jax.block_until_ready(out)
    info["bf16_matmul_tflops"] = 2 * n ** 3 * 20 / (time.perf_counter() - t0) / 1e12
    return info


# ------------------------------------------------------------------------------------------ driver

def _parse_variants(text: str) -> list[dict]:
    """``"attention=cudnn,remat=True;..."`` -> ``[{"attention": "cudnn", "remat": True}, ...]``."""
    variants = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        variant = {}
        for item in filter(None, chunk.split(",")):
            key, _, value = item.partition("=")
            variant[key.strip()] = {"True": True, "False": False, "None": None}.get(value.strip(), value.strip())
        variants.append(variant)
    return variants or [{}]


def run_case(case: dict) -> dict:
    kind, steps = case["case"], case["steps"]
    flags = case.get("variant", {}).get("xla_flags")
    if flags:  # before JAX starts in this worker process
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags.replace("+", " ").replace("|", ",")]))
    if kind == "env":
        return environment()
    if kind == "jaxcl_rls":
        return jaxcl_rls(steps, dim=case["rls_dim"])
    if kind == "torch_rls":
        return torch_rls(steps, dim=case["rls_dim"])
    workload = WORKLOADS[case["workload"]]
    if kind == "jaxcl":
        return jaxcl_lora(workload, case.get("variant", {}), steps)
    return torch_lora(workload, kind == "torch_compiled", steps)


def _cases(args) -> list[dict]:
    only = set(args.only.split(","))
    cases = [{"case": "env"}] if "env" in only else []
    if "rls" in only:
        cases += [{"case": "jaxcl_rls"}, {"case": "torch_rls"}]
    for w in args.workloads.split(","):
        if "jaxcl" in only:
            cases += [{"case": "jaxcl", "workload": w, "variant": v} for v in _parse_variants(args.jaxcl_variants)]
        cases += [{"case": c, "workload": w} for c in ("torch_eager", "torch_compiled") if c in only]
    return [dict(c, steps=args.steps, rls_dim=args.rls_dim) for c in cases]


def drive(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    raw_path, log_path = os.path.join(args.out, "raw.json"), os.path.join(args.out, "bench.log")
    results = []
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for case in _cases(args):
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True,
                                  text=True, timeout=args.case_timeout)
            lines = proc.stdout.strip().splitlines()
            try:
                result = json.loads(lines[-1])
            except (IndexError, ValueError):
                result = {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2500:]}
            stderr = proc.stderr
        except subprocess.TimeoutExpired as e:
            result, stderr = {"error": f"timeout after {args.case_timeout} s"}, str(e.stderr or "")[-2500:]
        result["wall_s"] = round(time.time() - t0, 1)
        results.append({"case": case, "result": result})
        with open(log_path, "a") as f:
            f.write(f"== {json.dumps(case)}\n{stderr[-4000:]}\n{json.dumps(result)}\n")
        with open(raw_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(raw_path + ".tmp", raw_path)
        print(_line(case, result), flush=True)


def _line(case: dict, r: dict) -> str:
    name = f"{case['case']:<15} {case.get('workload', ''):<13} {json.dumps(case.get('variant', {})):<48}"
    if "error" in r:
        return f"{name} ERROR {r['error']} {r.get('stderr', '')[-300:]!r}"
    keys = ("tokens_per_s", "examples_per_s", "step_s", "pipelined_step_s", "mfu", "peak_mem_gib", "first_step_s",
            "loss_first", "loss_last", "bf16_matmul_tflops", "wall_s")
    shown = " ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float)))
    for part in ("blocked", "one_shot", "per_sample"):
        if part in r:
            shown += f" {part}={r[part]['samples_per_s']:.4g}/s err={r[part]['rel_err_vs_joint']:.2e}"
    return f"{name} {shown}"


# ---------------------------------------------------------------------------------------- summary

HEADLINE = {"attention": "cudnn", "remat": "dots_with_no_batch_dims_saveable"}  # jaxcl's configuration
# (name in results.json, workload, unit, throughput key, target from the performance issue)
ROWS = (("llama2_7b_b8x512", "llama2_7b", "tokens/s", "tokens_per_s", "1.1x best peer (>= 20,200 tok/s)"),
        ("t5_large_b8_src512_tgt50", "t5_large", "examples/s", "examples_per_s", "3x torch compiled (>= 170 ex/s)"),
        ("smollm2_135m_b16x512", "smollm2_135m", "tokens/s", "tokens_per_s", "1.5x best peer (>= 240,000 tok/s)"))


def _headline(variant: dict) -> bool:
    return {k: v for k, v in variant.items() if k != "data"} == HEADLINE


def _pipelined(key: str, jx: dict, eager: dict, compiled: dict) -> dict:
    """The same cases timed as the issue's anchors were (``anchors_torch.py``): the mean of the 10
    unsynchronised steps (one synchronisation after the last) instead of the median of synchronised ones."""
    rate = {name: r[key] * r["step_s"] / r["pipelined_step_s"]
            for name, r in (("jaxcl", jx), ("torch_eager", eager), ("torch_compiled", compiled))}
    return rate | {"ratio": rate["jaxcl"] / max(rate["torch_eager"], rate["torch_compiled"])}


def summarize(paths: list[str]) -> dict:
    """results.json rows from raw files: each row from one file (one run) holding jaxcl's headline
    configuration and both torch columns for that workload; ratio = jaxcl / best torch column."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((os.path.basename(path), json.load(f)))
    out = {}
    for name, workload, unit, key, target in ROWS:
        for source, results in runs:
            cases = {(r["case"]["case"], json.dumps(r["case"].get("variant", {}), sort_keys=True)): r["result"]
                     for r in results if r["case"].get("workload") == workload and "error" not in r["result"]}
            jx = next((v for (c, var), v in cases.items() if c == "jaxcl" and _headline(json.loads(var))
                       and json.loads(var).get("data", "1") == "1"), None)
            eager, compiled = cases.get(("torch_eager", "{}")), cases.get(("torch_compiled", "{}"))
            if jx and eager and compiled:
                best = max(eager[key], compiled[key])
                out[name] = {"jaxcl": jx[key], "torch_eager": eager[key], "torch_compiled": compiled[key],
                             "ratio": jx[key] / best, "unit": unit, "target": target,
                             "peak_mem_gib": {"jaxcl": jx["peak_mem_gib"], "torch_eager": eager["peak_mem_gib"],
                                              "torch_compiled": compiled["peak_mem_gib"]},
                             "mfu_jaxcl": jx.get("mfu"), "device": jx["device"], "run": source,
                             "pipelined": _pipelined(key, jx, eager, compiled)}
    for source, results in runs:
        jx = next((r["result"] for r in results if r["case"]["case"] == "jaxcl_rls"), None)
        pt = next((r["result"] for r in results if r["case"]["case"] == "torch_rls"), None)
        if jx and pt and "error" not in jx and "error" not in pt:
            loop = pt["per_sample"]["samples_per_s"]
            out["anyssr_rls_router_E10000"] = {
                "jaxcl": jx["one_shot"]["samples_per_s"], "torch_eager": loop,
                "torch_compiled": None, "ratio": jx["one_shot"]["samples_per_s"] / loop, "unit": "samples/s",
                "target": ">= 100x the per-sample loop, rel. error vs joint ridge <= 1e-3",
                "baseline": "torch per-sample loop (official style), same run",
                "jaxcl_rel_err_vs_joint": jx["one_shot"]["rel_err_vs_joint"],
                "jaxcl_blocked_256": jx["blocked"], "jaxcl_per_sample": jx["per_sample"],
                "torch_blocked_256": pt["blocked"], "device": jx["device"], "run": source}
        one = {r["case"]["workload"]: r["result"] for r in results if r["case"]["case"] == "jaxcl"
               and _headline(r["case"].get("variant", {})) and r["case"]["variant"].get("data") == "1"}
        two = {r["case"]["workload"]: r["result"] for r in results if r["case"]["case"] == "jaxcl"
               and _headline(r["case"].get("variant", {})) and r["case"]["variant"].get("data") == "2"}
        for workload in sorted(set(one) & set(two)):
            out[f"data_parallel_2gpu_{workload}"] = {
                "jaxcl": two[workload]["tokens_per_s"], "torch_eager": None, "torch_compiled": None,
                "ratio": two[workload]["tokens_per_s"] / one[workload]["tokens_per_s"], "unit": "tokens/s",
                "baseline": f"jaxcl on 1 GPU, same run: {one[workload]['tokens_per_s']:.0f} tokens/s",
                "target": ">= 1.85x one GPU", "device": f"2 x {two[workload]['device']}", "run": source}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/jaxcl_bench"))
    p.add_argument("--only", default="env,jaxcl,torch_eager,torch_compiled,rls")
    p.add_argument("--workloads", default="smollm2_135m,t5_large,llama2_7b")
    p.add_argument("--jaxcl-variants", default="attention=cudnn")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--case-timeout", type=int, default=420)
    p.add_argument("--rls-dim", type=int, default=RLS["dim"], help="router features E")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--summarize", nargs="+", metavar="RAW_JSON", help="write results.json rows from raw files")
    p.add_argument("--write", default=os.path.join(HERE, "results.json"), help="where --summarize writes")
    args = p.parse_args(argv)
    if args.summarize:
        rows = summarize(args.summarize)
        with open(args.write + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.write + ".tmp", args.write)
        print(json.dumps(rows, indent=1))
        return 0
    if args.case:
        try:
            print(json.dumps(run_case(json.loads(args.case))))
        except Exception as e:
            print(traceback.format_exc(), file=sys.stderr)
            print(json.dumps({"error": repr(e)[:500]}))
        return 0
    drive(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
