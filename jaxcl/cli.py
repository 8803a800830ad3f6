"""Command line: ``jaxcl run CONFIG.yaml``, ``jaxcl demo``, ``jaxcl report DIR``, ``jaxcl export DIR``.

Every user error (bad config, data, model or results file) prints one line on stderr and exits
with status 2; nothing is half-written (results.json is only written, atomically, at the end).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_METHODS = ("olora", "seq_lora")


def demo_config(method: str, accelerator: bool) -> dict:
    """The offline demo: SmolLM2-135M-Instruct (bundled GGUF) on the bundled WordNet stream.

    Sized for well under 20 minutes for both methods on a 2-core CPU: short prompts, 1-3 token
    answers, 40 optimizer steps of 8 examples per task, 50 test examples per task. On an accelerator
    the same command trains for a full epoch with larger batches and tests on every example.
    """
    if accelerator:
        train = {"epochs": 2.0, "batch_size": 16, "lr": 1e-3}
        evaluation = {"max_test_per_task": None, "max_new_tokens": 8, "batch_size": 64}
    else:
        train = {"steps_per_task": 40, "batch_size": 8, "lr": 1e-3}
        evaluation = {"max_test_per_task": 50, "max_new_tokens": 6, "batch_size": 50}
    return {
        "method": method, "model": "default", "dtype": "float32",
        "data": {"source": "bundled", "order": "wordnet", "max_prompt_tokens": 64, "max_answer_tokens": 8},
        "train": train, "eval": evaluation,
    }


def _show(results: dict, folder: str) -> None:
    """Print a run's matrix and metrics, write its heatmap into its folder and print the path."""
    from jaxcl.train.report import format_matrix, heatmap

    print(format_matrix(results))
    print(f"heatmap: {heatmap(results, os.path.join(folder, 'matrix.png'))}", flush=True)


def _cmd_run(args) -> int:
    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import run

    cfg = jconfig.load(args.config)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    allowed = tuple(f for f in (args.allow_changed or "").split(",") if f)
    if allowed and not args.resume:
        raise jconfig.ConfigError("--allow-changed only applies with --resume")
    results = run(cfg, out, resume=args.resume, allow_changed=allowed)
    _show(results, out)
    print(f"results: {os.path.join(out, 'results.json')}")
    return 0


def _cmd_demo(args) -> int:
    import jax

    from jaxcl import methods as jmethods
    from jaxcl.models import load_model
    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import run
    from jaxcl.train.report import format_comparison

    chosen = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    for method in chosen:  # a misspelt method fails now, not after the first runs
        jmethods.build(method, {})
    accelerator = jax.default_backend() != "cpu"
    t0 = time.time()
    model_and_tokenizer = load_model("default")
    print(f"loaded SmolLM2-135M-Instruct (bundled GGUF) in {time.time() - t0:.0f}s; backend {jax.default_backend()}")
    summary = []
    for method in chosen:
        cfg = jconfig.from_dict(demo_config(method, accelerator), where="demo")
        out = os.path.join(args.out, method)
        results = run(cfg, out, resume=args.resume, model_and_tokenizer=model_and_tokenizer)
        _show(results, out)
        summary.append(results)
    print("\n" + format_comparison(summary))
    print(f"demo finished in {time.time() - t0:.0f}s; results in {args.out}/<method>/results.json")
    return 0


def _cmd_report(args) -> int:
    from jaxcl.train.report import budget_plot, format_comparison, load_results, wrong_answers

    runs = [load_results(d) for d in args.dirs]  # every folder is checked before anything is written
    wrong = [wrong_answers(d, args.wrong) for d in args.dirs] if args.wrong else None
    for i, (folder, results) in enumerate(zip(args.dirs, runs)):
        _show(results, folder)
        if wrong:
            print(wrong[i])
        budgets = budget_plot(results, os.path.join(folder, "budgets.png"))
        if budgets:
            print(f"budgets: {budgets}")
    if len(runs) > 1:
        print("\n" + format_comparison(runs))
    return 0


def _cmd_export(args) -> int:
    from jaxcl.export import export_run

    folders, note = export_run(args.run_dir, args.out, args.task)
    for folder in folders:
        print(f"PEFT adapter: {folder}")
    if note:
        print(f"note: {note}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxcl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a continual-learning config")
    p.add_argument("config")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--allow-changed", metavar="FIELD,...",
                   help="with --resume: config fields that may differ from the checkpointed run's (e.g. train.lr)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("demo", help="offline demo: O-LoRA vs SeqLoRA, SmolLM2-135M on the WordNet stream")
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--methods", help=f"comma-separated methods to compare (default {','.join(DEMO_METHODS)})")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("report", help="print each run's matrix and metrics, write matrix.png; compare runs")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--wrong", type=int, default=0, metavar="N",
                   help="also show up to N wrong answers per task of the last evaluation (predictions.jsonl)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("export", help="write a LoRA run's adapters as PEFT LoRA folders (Any-SSR: without its router)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="adapter folder (per-task methods: OUT/task_K for each task)")
    p.add_argument("--task", type=int, help="per-task methods: only task K's adapter, into OUT")
    p.set_defaults(func=_cmd_export)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"jaxcl: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple:
    """The error classes that mean bad input (not a bug): reported in one line, exit status 2."""
    from jaxcl.data import DataError
    from jaxcl.export import ExportError
    from jaxcl.methods import MethodError
    from jaxcl.models import ModelLoadError
    from jaxcl.train.config import ConfigError
    from jaxcl.train.loop import RunError
    from jaxcl.train.report import ReportError
    from jaxcl.train.sharding import MeshError
    return DataError, ExportError, MethodError, ModelLoadError, ConfigError, RunError, ReportError, MeshError


if __name__ == "__main__":
    sys.exit(main())
