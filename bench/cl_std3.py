"""The end-to-end CL row: ``jaxcl run bench/cl_std3.yaml`` per method, alone on the device, first with
empty caches (cold: compiled programs, converted GGUF), then again with the caches the first run
filled (warm).

    PYTHONPATH=$PWD python bench/cl_std3.py --out DIR [--methods olora,any_ssr] [--model M] [--root R]
        [--baseline SRC] [--env KEY=VALUE ...] [--set FIELD=VALUE ...] [--tag T]
        [--write-results bench/results.json]

Each run is a fresh process (``python -m jaxcl.cli run``), timed from its start to its exit (imports,
model loading, tokenization, compiles, training, evaluation, writing): that is ``wall_s``. The
engine's own split (``compile_seconds``, ``train_seconds``, ``eval_seconds``, ``peak_memory_gib``)
comes from the run's results.json. ``--baseline SRC``: a checkout of older jaxcl code (e.g.
``git archive``) that runs the first method once, same config, same device, for the ratio.

Writes ``DIR/<method>_<cold|warm>/`` (each run's folder and ``stderr.log``) and ``DIR/rows.json``;
``--write-results`` merges the ``cl_std3_<method>`` rows into that results file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(HERE, "cl_std3.yaml")


def run_once(cfg: dict, out: str, source: str, cache: str | None, timeout: float | None = None) -> dict:
    """One ``jaxcl run`` in a fresh process; its results.json fields and the process's wall seconds
    (or the error, also when it outlasts ``timeout`` seconds)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    # ``source`` first, in place of this checkout (the rest of the path, e.g. carried wheels, stays)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, *rest]))
    if cache is not None:  # compiled programs and the converted GGUF
        env.update(JAXCL_COMPILE_CACHE=os.path.join(cache, "xla"), JAXCL_MODEL_CACHE=os.path.join(cache, "gguf"))
    else:
        env.update(JAXCL_COMPILE_CACHE="off", JAXCL_MODEL_CACHE="off")
    start = time.time()
    with open(os.path.join(out, "stderr.log"), "w") as err:
        try:
            proc = subprocess.run([sys.executable, "-m", "jaxcl.cli", "run", path, "--out", os.path.join(out, "run")],
                                  env=env, stdout=err, stderr=subprocess.STDOUT, cwd=out, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"wall_s": None, "error": f"stopped after {timeout:.0f} s without finishing"}
    wall = time.time() - start
    if proc.returncode != 0:
        return {"wall_s": round(wall, 1), "error": f"exit {proc.returncode} (see {out}/stderr.log)"}
    with open(os.path.join(out, "run", "results.json")) as f:
        r = json.load(f)
    return {"wall_s": round(wall, 1), "engine_s": r["seconds"], "compile_s": r.get("compile_seconds"),
            "compilations": r.get("compilations"), "train_s": r.get("train_seconds"), "eval_s": r.get("eval_seconds"),
            "peak_gib": r.get("peak_memory_gib"), "data_s": r.get("data_seconds"), "model_s": r.get("model_seconds"),
            "prepare_s": r.get("prepare_seconds"), "AP": r["metrics"]["AP"], "BWT": r["metrics"]["BWT"],
            "matrix": r["matrix"], "device": r["versions"].get("device_kind", r["versions"]["devices"][0])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="olora,any_ssr")
    p.add_argument("--model", help="replaces the config's model")
    p.add_argument("--root", help="replaces the config's data.root")
    p.add_argument("--baseline", help="a checkout of older jaxcl code: runs the first method once")
    p.add_argument("--baseline-timeout", type=float, default=None, help="seconds the baseline run may take")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in every run's environment (e.g. XLA_FLAGS=...); the rows get --tag")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="replaces a config field (dotted, e.g. remat=true or train.batch_size=8; the value is "
                        "read as YAML); the rows get --tag")
    p.add_argument("--tag", default="", help="suffix of the row names (e.g. _autotune0)")
    p.add_argument("--write-results", metavar="RESULTS_JSON")
    args = p.parse_args(argv)
    with open(CONFIG) as f:
        base = yaml.safe_load(f)
    if args.model:
        base["model"] = args.model
    if args.root:
        base["data"]["root"] = args.root
    for assignment in args.set:
        field, value = assignment.split("=", 1)
        *parents, leaf = field.split(".")
        node = base
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    os.environ.update(dict(kv.split("=", 1) for kv in args.env))
    rows, stamp = {}, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = args.methods.split(",")
    for method in methods:
        cfg = dict(base, method=method)
        cache = os.path.abspath(os.path.join(args.out, f"cache_{method}"))  # empty: the cold run fills it
        cold = run_once(cfg, os.path.join(args.out, f"{method}_cold"), ROOT, cache)
        warm = run_once(cfg, os.path.join(args.out, f"{method}_warm"), ROOT, cache)
        rows[f"cl_std3_{method}{args.tag}"] = dict(cold, warm=warm, config="bench/cl_std3.yaml", env=args.env,
                                                   set=args.set, run=f"cl_std3.py {stamp}")
        print(json.dumps({method: {"cold": {k: v for k, v in cold.items() if k != "matrix"},
                                   "warm": {k: v for k, v in warm.items() if k != "matrix"}}}), flush=True)
        _write(os.path.join(args.out, "rows.json"), rows)  # after each method: a stopped call keeps what ran
    if args.baseline:
        cfg = dict(base, method=methods[0])
        old = run_once(cfg, os.path.join(args.out, f"{methods[0]}_baseline"), os.path.abspath(args.baseline), None,
                       args.baseline_timeout)
        row = rows[f"cl_std3_{methods[0]}{args.tag}"]
        row["baseline"] = dict(old, code=os.path.basename(os.path.abspath(args.baseline)))
        if "error" not in old and "error" not in row:
            row["ratio"] = round(old["wall_s"] / row["wall_s"], 2)  # how many times faster than the old code, cold
        print(json.dumps({"baseline": {k: v for k, v in old.items() if k != "matrix"}}), flush=True)
    _write(os.path.join(args.out, "rows.json"), rows)
    if args.write_results:
        with open(args.write_results) as f:
            results = json.load(f)
        _write(args.write_results, dict(results, **rows))


def _write(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
