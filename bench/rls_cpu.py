"""CPU micro-benchmark of ``jaxcl.kernels.rls``: block Woodbury updates against a per-sample loop.

Any-SSR fits its router with recursive least squares. The official code feeds one example at a time
(a rank-1 Sherman-Morrison step per row); ``rls.update_blocks`` feeds blocks of rows (one
``(n, n)`` Cholesky solve per block). Both must land on the joint ridge solution
``W* = (ΦᵀΦ + γI)⁻¹ ΦᵀY``; this script measures their throughput (rows per second, compile time
excluded) and the relative error ``‖W − W*‖_F / ‖W*‖_F`` of each against W* computed in float64.

The features imitate Any-SSR's router: ``Φ = H W_fe`` with ``H`` (n, d) hidden states whose mean
depends on the task, ``W_fe`` (d, E) ~ N(0, 0.02²) — so Φ has rank d < E, as in the method — and
``Y`` one-hot task labels. Rows come task after task, as in continual training.

Run:  python bench/rls_cpu.py [--dim 2048] [--rows 4096] [--blocks 1,32,256,1024] [--loop-rows 512]

``--blocks 1`` is the per-sample recursion compiled as one ``lax.scan`` (the fastest form of a
per-sample loop); ``--loop-rows`` also times the official code's form, a Python loop calling the
jitted single-row update, on that many rows, and reports its rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.kernels import rls


def make_data(rows: int, dim: int, tasks: int, hidden: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Router-like features ``(rows, dim)`` of rank ``hidden`` and one-hot task targets ``(rows, tasks)``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(tasks), -(-rows // tasks))[:rows]  # task after task
    means = rng.normal(size=(tasks, hidden))
    h = means[labels] + rng.normal(size=(rows, hidden))
    h /= np.sqrt(np.mean(h ** 2, axis=1, keepdims=True))              # RMS-normalised, like a final norm
    w_fe = 0.02 * rng.normal(size=(hidden, dim))
    return (h @ w_fe).astype(np.float32), np.eye(tasks, dtype=np.float32)[labels]


def joint_ridge(x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return np.linalg.solve(x64.T @ x64 + gamma * np.eye(x.shape[1]), x64.T @ y.astype(np.float64))


def rel_error(w, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(w, np.float64) - reference) / np.linalg.norm(reference))


def time_blocks(x, y, gamma: float, block: int, repeats: int) -> tuple[float, float, float, rls.RLSState]:
    """(compile seconds, best run seconds, rows/s, final state) of ``update_blocks`` with ``block``."""
    state = rls.init(x.shape[1], y.shape[1], gamma)
    t0 = time.perf_counter()
    compiled = rls.update_blocks.lower(state, x, y, block_size=block).compile()
    compile_s = time.perf_counter() - t0
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, x, y))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best, x.shape[0] / best, out


def time_python_loop(x, y, gamma: float, rows: int) -> tuple[float, rls.RLSState]:
    """Rows/s of a Python loop over the jitted one-row update (the official code's form), on ``rows`` rows."""
    step = jax.jit(rls.update)
    state = rls.init(x.shape[1], y.shape[1], gamma)
    jax.block_until_ready(step(state, x[:1], y[:1]))  # compile
    t0 = time.perf_counter()
    for i in range(rows):
        state = step(state, x[i:i + 1], y[i:i + 1])
    jax.block_until_ready(state)
    return rows / (time.perf_counter() - t0), state


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048, help="feature width E")
    p.add_argument("--rows", type=int, default=4096, help="number of rows n")
    p.add_argument("--tasks", type=int, default=8, help="output columns (one-hot tasks)")
    p.add_argument("--hidden", type=int, default=576, help="rank of the features (model width d)")
    p.add_argument("--gamma", type=float, default=100.0)
    p.add_argument("--blocks", default="1,32,256,1024", help="comma-separated block sizes")
    p.add_argument("--loop-rows", type=int, default=512, help="rows for the Python-loop timing (0: skip)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    x_np, y_np = make_data(args.rows, args.dim, args.tasks, args.hidden, args.seed)
    reference = joint_ridge(x_np, y_np, args.gamma)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    results = {"dim": args.dim, "rows": args.rows, "tasks": args.tasks, "hidden": args.hidden, "gamma": args.gamma,
               "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
               "machine": platform.machine(), "load_avg_before": os.getloadavg(), "blocks": []}
    print(f"rls.update_blocks on {args.rows} rows, E={args.dim}, {args.tasks} outputs, feature rank {args.hidden}, "
          f"γ={args.gamma} ({jax.default_backend()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    print(f"{'block':>6} {'compile s':>10} {'run s':>8} {'rows/s':>10} {'rel. err vs joint ridge':>24}")
    for block in (int(b) for b in args.blocks.split(",")):
        compile_s, run_s, rate, state = time_blocks(x, y, args.gamma, block, args.repeats)
        err = rel_error(state.W, reference)
        results["blocks"].append({"block": block, "compile_s": compile_s, "run_s": run_s, "rows_per_s": rate,
                                  "rel_error": err})
        print(f"{block:>6} {compile_s:>10.2f} {run_s:>8.2f} {rate:>10.1f} {err:>24.2e}")
    if args.loop_rows:
        rows = min(args.loop_rows, args.rows)
        rate, state = time_python_loop(x, y, args.gamma, rows)
        err = rel_error(state.W, joint_ridge(x_np[:rows], y_np[:rows], args.gamma))
        results["python_loop"] = {"rows": rows, "rows_per_s": rate, "rel_error": err}
        print(f"python loop of jitted 1-row updates on the first {rows} rows: {rate:.1f} rows/s, "
              f"rel. err {err:.2e} (vs the joint ridge on those rows)")
    per_sample = next((b for b in results["blocks"] if b["block"] == 1), None)
    if per_sample:
        for b in results["blocks"]:
            b["speedup_vs_block_1"] = b["rows_per_s"] / per_sample["rows_per_s"]
        print("speed-up vs the per-sample scan: " + ", ".join(
            f"block {b['block']}: {b['speedup_vs_block_1']:.1f}x" for b in results["blocks"]))
    results["load_avg_after"] = os.getloadavg()
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
