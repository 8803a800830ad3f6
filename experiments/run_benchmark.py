"""Runs every config of one benchmark folder in one process, loading the model once.

    PYTHONPATH=$PWD python experiments/run_benchmark.py experiments/standard_order1 --out OUT \\
        [--methods seq_lora,olora] [--model gguf:PATH] [--root PATH] [--jax-cache DIR]

For each ``<folder>/<name>.yaml`` (``name`` is the method with ``+`` written ``_``) in file order:
``jaxcl.train.loop.run`` writes ``OUT/<name>/`` (its own ``results.json``, log and checkpoints), and
one progress line (AP, BWT, seconds) is printed as soon as the method ends. A method that fails is
recorded with its error and the next one runs. A method whose ``OUT/<name>/results.json`` exists
is not run again and one that was interrupted continues from its last checkpoint, so the same
command finishes a benchmark over several calls. ``OUT/runs.json`` lists every method's status,
wall seconds, AP / BWT and error; ``experiments/summarize.py`` turns the folder into RESULTS.md.
Several drivers may share one ``--out`` (e.g. two chains of methods on one card, each with its own
``--methods``): each merges its records into ``runs.json`` under a lock.

``--model`` and ``--root`` replace every config's ``model`` and ``data.root`` (the configs name the
GPU machine's paths). ``--jax-cache`` turns on JAX's persistent compilation cache: programs that
are the same for several methods (the base model's evaluation) then compile once.
(PYTHONPATH: a script's own folder comes first on sys.path, so without it an installed jaxcl is
imported instead of this checkout's.)
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import sys
import time
import traceback
from typing import Callable, Optional

from jaxcl.train import config as jconfig
from jaxcl.train.report import PHASE_SECONDS


class BenchmarkError(ValueError):
    """The benchmark folder or the --methods selection is not usable."""


def run_name(path: str) -> str:
    """The output folder name of a config file: its file name without ``.yaml``."""
    return os.path.splitext(os.path.basename(path))[0]


def config_paths(folder: str, methods: Optional[list[str]] = None) -> list[str]:
    """The folder's ``*.yaml`` files, sorted, or those whose name or method is in ``methods``.

    Raises:
      BenchmarkError: no configs, or a selected method that no config runs.
    """
    if not os.path.isdir(folder):
        raise BenchmarkError(f"{folder}: not a folder")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))
    if not paths:
        raise BenchmarkError(f"{folder}: no *.yaml run configs")
    if methods is None:
        return paths
    known = {run_name(p): p for p in paths}
    missing = [m for m in methods if m.replace("+", "_") not in known]
    if missing:
        raise BenchmarkError(f"{folder}: no config for {missing}; configs: {sorted(run_name(p) for p in paths)}")
    return [known[m.replace("+", "_")] for m in methods]


def load_config(path: str, model: Optional[str] = None, root: Optional[str] = None) -> jconfig.RunConfig:
    """The config of ``path`` with ``model`` and ``data.root`` replaced where given."""
    cfg = jconfig.load(path)
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    if root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    return cfg


def _metrics_record(results: dict) -> dict:
    metrics = results.get("metrics", {})
    return {"AP": metrics.get("AP"), "BWT": metrics.get("BWT"), "seconds": results.get("seconds")} | {
        k: results[k] for k in PHASE_SECONDS if k in results}


def progress_line(index: int, total: int, record: dict) -> str:
    """``[3/11] olora  AP  52.10  BWT  -8.70    81.3 s`` (or the failure)."""
    head = f"[{index}/{total}] {record['name']:<16}"
    if record["status"] == "failed":
        return f"{head} FAILED after {record['wall_s']:.1f} s: {record['error']}"
    fmt = lambda x: "   -  " if x is None else f"{x:6.2f}"  # noqa: E731
    tail = "  (already done)" if record["status"] == "done" else ""
    return f"{head} AP {fmt(record['AP'])}  BWT {fmt(record['BWT'])}  {record['wall_s']:7.1f} s{tail}"


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def record_run(out: str, record: dict) -> list[dict]:
    """Puts ``record`` into ``OUT/runs.json`` under a lock and returns the file's records: several
    drivers (chains of methods sharing one card) can write to one folder. A method's record replaces
    its earlier one, except that "done" (skipped, results found) keeps the record of the run itself."""
    path = os.path.join(out, "runs.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        earlier = next((r for r in records if r["name"] == record["name"]), None)
        if not (record["status"] == "done" and earlier is not None and earlier["status"] != "failed"):
            records = [r for r in records if r["name"] != record["name"]] + [record]
        _write_json(path, records)
    return records


def run_folder(folder: str, out: str, *, methods: Optional[list[str]] = None, model: Optional[str] = None,
               root: Optional[str] = None, model_and_tokenizer=None, loader: Optional[Callable] = None,
               echo: Callable[[str], None] = print) -> list[dict]:
    """Runs the folder's configs in order; returns one record each (also merged into ``OUT/runs.json``).

    Args:
      folder: the benchmark folder of ``*.yaml`` configs.
      out: output folder; ``OUT/<name>/`` per config.
      methods: config names or method names to run (default: all).
      model, root: replace every config's ``model`` / ``data.root``.
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` for every config (tests).
      loader: ``(model_source, dtype) -> (model, tokenizer)``; default ``jaxcl.models.load_model``,
        called once per distinct (model, dtype).
      echo: where progress lines go.
    """
    paths = config_paths(folder, methods)
    os.makedirs(out, exist_ok=True)
    loaded = {}
    records = []
    for index, path in enumerate(paths, start=1):
        name, start = run_name(path), time.time()
        record = {"name": name, "config": os.path.abspath(path)}
        results_path = os.path.join(out, name, "results.json")
        try:
            cfg = load_config(path, model, root)
            record["method"] = cfg.method
            if os.path.exists(results_path):
                with open(results_path, encoding="utf-8") as f:
                    record |= {"status": "done"} | _metrics_record(json.load(f))
            else:
                pair = model_and_tokenizer
                if pair is None:
                    key = (cfg.model, cfg.dtype)
                    if key not in loaded:
                        loaded[key] = (loader or _load_model)(cfg.model, cfg.dtype)
                    pair = loaded[key]
                from jaxcl.train.loop import run

                results = run(cfg, os.path.join(out, name), resume=True, progress=False, model_and_tokenizer=pair)
                record |= {"status": "ok"} | _metrics_record(results)
        except Exception as e:  # one method's failure must not stop the benchmark: record it, go on
            record |= {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                       "traceback": traceback.format_exc()[-4000:]}
        record["wall_s"] = round(time.time() - start, 1)
        records.append(record)
        record_run(out, record)
        echo(progress_line(index, len(paths), record))
        sys.stdout.flush()
    return records


def _load_model(source: str, dtype: str):
    import jax.numpy as jnp

    from jaxcl.models import load_model

    return load_model(source, dtype=jnp.dtype(dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="benchmark folder of *.yaml configs (e.g. experiments/standard_order1)")
    parser.add_argument("--out", required=True, help="output folder: OUT/<name>/results.json per config")
    parser.add_argument("--methods", help="comma-separated config or method names (default: every config)")
    parser.add_argument("--model", help="replaces every config's model (e.g. gguf:/path/to/smollm2.gguf)")
    parser.add_argument("--root", help="replaces every config's data.root (the benchmark's task folder)")
    parser.add_argument("--jax-cache", help="folder of JAX's persistent compilation cache")
    args = parser.parse_args(argv)
    if args.jax_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        records = run_folder(args.folder, args.out, methods=methods, model=args.model, root=args.root)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r["name"] for r in records if r["status"] == "failed"]
    print(f"{len(records) - len(failed)} of {len(records)} methods done" + (f"; failed: {failed}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
