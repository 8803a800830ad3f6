"""Decoding speed with MIST's tuned backbone: the weight rewrite formed once per batch against once per token.

MIST evaluates with ``W + Σ_s scatter(index_s, values_s)`` at every projection (the earlier tasks'
sparse float32 deltas). ``generate_ids`` forms that rewrite once, before its decoding loop
(``jaxcl.models.sites.form_weights``); before, the loop rebuilt it at every new token. This script
times greedy generation three ways in one process, on a random-weight Llama: the plain model (no
adapter), MIST's rewrite formed once (what jaxcl does), and the rewrite inside the loop (the old
path, by replacing ``form_weights`` with the identity). It prints one JSON line per case and the
ratio of the old path to the current one.

Run:  python bench/decode_weight_rewrite.py [--shape smollm2|small] [--tasks 15] [--fraction 0.05]
          [--batch 128] [--prompt 256] [--new-tokens 50] [--dtype bfloat16]

``smollm2`` is SmolLM2-135M's shape (30 layers, width 576); ``small`` (8 layers, width 256) is for a CPU.
Timing: compile excluded (one warm-up call), the median of ``--repeats`` synchronised calls; a call
generates ``--new-tokens`` tokens for the whole batch (no example stops early: the end-of-sequence
id is one the model cannot produce); ``ms_per_token`` is a call's seconds over ``--new-tokens``, the
prefill included.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.methods import mist
from jaxcl.models import Adapter, Llama, LlamaConfig, sites

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32),
}


def past_deltas(model: Llama, tasks: int, fraction: float, seed: int) -> dict:
    """``{site: {"past_index" (L, T, n), "past_values" (L, T, n)}}``: ``tasks`` earlier tasks' sparse
    updates, each at a random ``fraction`` of every projection (MIST's state after ``tasks`` tasks)."""
    rng = np.random.default_rng(seed)
    out = {}
    for site, (layers, d_in, d_out) in model.site_shapes().items():
        n = round(fraction * d_in * d_out)
        index = np.stack([np.stack([rng.choice(d_in * d_out, n, replace=False) for _ in range(tasks)])
                          for _ in range(layers)])
        out[site] = {"past_index": jnp.asarray(index, jnp.int32),
                     "past_values": jnp.asarray(rng.normal(size=index.shape) * 1e-3, jnp.float32)}
    return out


def time_calls(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--tasks", type=int, default=15)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    config = LlamaConfig(**SHAPES[args.shape])
    model = Llama(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype))
    deltas = past_deltas(model, args.tasks, args.fraction, seed=0)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.prompt)), jnp.int32)
    mask = jnp.ones_like(ids)
    never = config.vocab_size  # an id outside the vocabulary: every example decodes all new tokens

    @functools.partial(jax.jit, static_argnames=("adapted",))
    def generate(model, deltas, ids, mask, adapted):
        adapter = Adapter(mist._HOOK, deltas) if adapted else None
        return model.generate_ids(ids, mask, max_new_tokens=args.new_tokens, eos_token_id=never, adapter=adapter)

    common = dict(device=str(jax.devices()[0].device_kind), platform=platform.machine(), jax=jax.__version__,
                  **vars(args))
    seconds = {"plain": time_calls(lambda: generate(model, deltas, ids, mask, False), args.repeats),
               "formed_once": time_calls(lambda: generate(model, deltas, ids, mask, True), args.repeats)}
    formed = sites.form_weights
    sites.form_weights = lambda adapter, weights: adapter  # the old path: the rewrite inside the loop
    try:
        generate.clear_cache()
        seconds["per_token"] = time_calls(lambda: generate(model, deltas, ids, mask, True), args.repeats)
    finally:
        sites.form_weights = formed
    for case, s in seconds.items():
        print(json.dumps(dict(common, case=case, seconds=round(s, 4),
                              ms_per_token=round(1000 * s / args.new_tokens, 3))), flush=True)
    print(json.dumps(dict(common, case="ratio", per_token_over_formed_once=round(seconds["per_token"] / seconds["formed_once"], 2),
                          formed_once_over_plain=round(seconds["formed_once"] / seconds["plain"], 2))), flush=True)


if __name__ == "__main__":
    main()
