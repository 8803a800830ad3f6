"""Run the configs of committed WordNet results again with today's code, side by side on one device.

    PYTHONPATH=$PWD python experiments/wordnet/rerun.py --out DIR --model gguf:PATH [--seed S]
        [--methods olora,sapt] [--from experiments/wordnet/gpu]

Each ``<from>/<method>/results.json`` gives its config (the model path replaced by ``--model``, the
seed by ``--seed``); all methods run at once as separate ``jaxcl run`` processes (set
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` on a GPU so that they share it). Writes
``DIR/<method>/`` (the run) and ``DIR/compare.json``: per method the committed matrix, the new one,
the largest cell difference and both APs. Runs of another seed give the spread that counts as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import yaml


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, default=None, help="replaces the configs' train.seed")
    p.add_argument("--methods", help="folder names, comma-separated (default: every folder)")
    p.add_argument("--from", dest="source", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
    args = p.parse_args(argv)
    names = args.methods.split(",") if args.methods else sorted(os.listdir(args.source))
    procs = {}
    for name in names:
        with open(os.path.join(args.source, name, "results.json")) as f:
            old = json.load(f)
        cfg = dict(old["config"], model=args.model)
        if args.seed is not None:
            cfg["train"] = dict(cfg["train"], seed=args.seed)
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        log = open(os.path.join(folder, "stderr.log"), "w")
        procs[name] = (old, subprocess.Popen([sys.executable, "-m", "jaxcl.cli", "run", os.path.join(folder, "config.yaml"),
                                              "--out", os.path.join(folder, "run")], stdout=log, stderr=subprocess.STDOUT))
    compare = {}
    for name, (old, proc) in procs.items():
        if proc.wait() != 0:
            compare[name] = {"error": f"exit {proc.returncode} (see {args.out}/{name}/stderr.log)"}
            continue
        with open(os.path.join(args.out, name, "run", "results.json")) as f:
            new = json.load(f)
        a, b = np.array(old["matrix"]), np.array(new["matrix"])
        compare[name] = {"old": old["matrix"], "new": new["matrix"], "max_abs_cell_diff": float(np.abs(a - b).max()),
                         "old_AP": old["metrics"]["AP"], "new_AP": new["metrics"]["AP"],
                         "new_BWT": new["metrics"]["BWT"], "seconds": new["seconds"],
                         "routing_accuracy": new.get("routing_accuracy")}
        print(name, json.dumps({k: v for k, v in compare[name].items() if k not in ("old", "new")}), flush=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(compare, f, indent=1)


if __name__ == "__main__":
    main()
