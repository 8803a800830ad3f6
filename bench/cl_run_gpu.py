"""End-to-end continual-learning runs on one accelerator: the engine (``jaxcl.train.loop.run``) on
the bundled WordNet stream with a random-weight model of SmolLM2-135M's shape (the real GGUF is too
large to carry to the GPU machine; accuracies of random weights mean nothing, the timings do).

    python bench/cl_run_gpu.py --tokenizer DIR --out OUT [--methods olora,sapt] [--variants ...]

``DIR`` holds SmolLM2's tokenizer (``tokenizer.json``; ``AutoTokenizer.save_pretrained`` of the
default model's tokenizer). A variant is ``attention=<none|cudnn|xla>,remat=<false|policy>``. Per
(method, variant) it prints and writes to ``OUT/summary.json``: wall time of the run, median
seconds per optimizer step after the first (compile) step of each task, and the evaluation time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import AutoTokenizer

from bench_lora_step import WORKLOADS  # the same SmolLM2-135M shape as the step benchmark
from jaxcl.models.llama import Llama, LlamaConfig
from jaxcl.train import config as jconfig
from jaxcl.train.loop import run


def parse_variant(text: str) -> dict:
    out = {"attention": None, "remat": False}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "attention":
            out[key] = None if value == "none" else value
        elif key == "remat":
            out[key] = {"false": False, "true": True}.get(value, value)
        else:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
    return out


def step_seconds(log_path: str) -> list[float]:
    """Seconds of every optimizer step but the first of each task (it includes compilation)."""
    with open(log_path, encoding="utf-8") as f:
        steps = [r for r in map(json.loads, f) if r["event"] == "step"]
    return [r["seconds"] for r in steps if r["step"] > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="olora")
    parser.add_argument("--variants", default="attention=cudnn,remat=dots_with_no_batch_dims_saveable")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-test", type=int, default=None, help="test examples per task (default all)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    summary = []
    for method in args.methods.split(","):
        for text in args.variants.split(";"):
            variant = parse_variant(text)
            cfg = jconfig.from_dict({
                "method": method, "model": "random SmolLM2-135M shape", "dtype": "bfloat16", **variant,
                "data": {"source": "bundled", "order": "wordnet", "max_prompt_tokens": 64, "max_answer_tokens": 8},
                "train": {"epochs": args.epochs, "batch_size": 16, "lr": 1e-3},
                "eval": {"max_test_per_task": args.max_test, "max_new_tokens": 8, "batch_size": 64},
            }, where="bench")
            model = Llama(LlamaConfig.from_hf(WORKLOADS["smollm2_135m"]["hf"]), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
            out = os.path.join(args.out, f"{method}_{text.replace(',', '_').replace('=', '-')}")
            t0 = time.time()
            results = run(cfg, out, progress=False, model_and_tokenizer=(model, tokenizer))
            wall = time.time() - t0
            secs = step_seconds(os.path.join(out, "log.jsonl"))
            row = {"method": method, "variant": text, "device": str(jax.devices()[0].device_kind),
                   "wall_s": round(wall, 1), "optimizer_steps": len(secs) + len(results["tasks"]),
                   "median_step_s": statistics.median(secs), "examples_per_s": 16 / statistics.median(secs),
                   "AP_random_weights": results["metrics"]["AP"]}
            print(json.dumps(row), flush=True)
            summary.append(row)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
