"""One invocation of every GPU benchmark row: jaxcl's LoRA step against its peers, and a whole CL run.

    PYTHONPATH=$PWD python bench/run_all.py --out DIR [--budget-s 540] [--tunix DIR] [--smoke]

Cases, each in its own subprocess (so each starts with an empty device and reports its own peak
memory), in this order, until ``--budget-s`` seconds are spent (a case that would not fit its
estimate is recorded as skipped; a running case is stopped at the budget's end):

  1. per workload (Llama-2-7B config b8 x 512, SmolLM2-135M config b16 x 512, T5-large b8 with
     512 / 50 tokens): jaxcl's train step (``bench_lora_step.py``'s jaxcl case, the headline
     attention=cudnn + remat policy) and torch.compile of HF transformers + peft;
  2. the end-to-end CL row: ``jaxcl.train.loop.run`` (O-LoRA) on a synthetic 4-task stream of the
     shape of the project's CL runs (a random-weight model of SmolLM2-135M's shape, 2,900 training
     examples x 2 epochs at batch 16, 1,000 test prompts evaluated before the first task and after
     each, 8 new tokens; word-level prompts of 40-60 tokens, like the bundled stream's);
  3. the JAX peer, google-tunix + qwix (``anchor_tunix.py``, Llama workloads only), when ``--tunix``
     names a folder holding ``anchor_tunix.py`` and its unpacked wheels ``tunix_site/``;
  4. torch eager (last: it is never the best peer in the recorded runs, so a tight budget drops it
     first), then the environment (versions, bf16 matmul ceiling).

Writes ``DIR/raw.json`` (every case's output), ``DIR/bench.log`` (their stderr), and the rows of
``bench/results.json`` (``--smoke``: ``DIR/results.json``) under the existing names, each with
``ratio`` = jaxcl / best peer of the same run, compared like for like (torch: median of
synchronised steps; tunix: mean of unsynchronised steps, the anchors' timing, against jaxcl's
``pipelined_step_s``), keeping rows this run does not produce. The generated table of
``bench/RESULTS.md`` (``DIR/RESULTS.md`` in smoke mode) is rewritten from that file.

``--smoke``: tiny shapes on any backend (CPU included) to test the harness: tiny Llama / T5 in place
of the three workloads, jaxcl with the default attention, a 4-task stream of 24 examples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEP_SCRIPT = os.path.join(HERE, "bench_lora_step.py")
HEADLINE = {"attention": "cudnn", "remat": "dots_with_no_batch_dims_saveable"}
# jaxcl runs each workload with the layers scanned and unrolled; a row reports the faster one.
JAXCL_VARIANTS = (HEADLINE, dict(HEADLINE, scan=False))
# results.json row name, workload, its smoke stand-in, unit, throughput key, tunix anchor name
ROWS = (("llama2_7b_b8x512", "llama2_7b", "tiny_llama", "tokens/s", "tokens_per_s", "7b"),
        ("smollm2_135m_b16x512", "smollm2_135m", "tiny_llama", "tokens/s", "tokens_per_s", "smol"),
        ("t5_large_b8_src512_tgt50", "t5_large", "tiny_t5", "examples/s", "examples_per_s", None))
CL_ROW = "cl_run_smollm2_135m_4tasks"
# Seconds a case took in the recorded H100 runs (bench/raw), rounded up: what the budget check expects.
ESTIMATE_S = {"jaxcl": 30, "torch_compiled": 130, "torch_eager": 30, "tunix": 45, "cl_run": 150, "env": 25}
CL_SHAPE = {"real": dict(tasks=4, train=806, test=250, vocab=200, words=(20, 40), epochs=2.0, batch=16, new_tokens=8,
                         eval_batch=64, prompt_tokens=64, model="smollm2_135m"),
            "smoke": dict(tasks=4, train=24, test=6, vocab=60, words=(4, 8), epochs=1.0, batch=4, new_tokens=3,
                          eval_batch=8, prompt_tokens=48, model="tiny_llama")}
TABLE_START, TABLE_END = "<!-- run_all.py table: start -->", "<!-- run_all.py table: end -->"


# ---------------------------------------------------------------------------------------- cases

def plan(smoke: bool, tunix_dir: str | None, only: tuple[str, ...] = (), workloads: tuple[str, ...] = ()) -> list[dict]:
    """The cases in priority order (see the module docstring); ``only``: keep these case kinds;
    ``workloads``: keep the step cases of these workloads (cases of no workload stay)."""
    steps = 3 if smoke else 10
    variants = ({}, {"scan": False}) if smoke else JAXCL_VARIANTS  # cuDNN attention exists only on GPUs
    cases = []
    for _, workload, tiny, *_ in ROWS:
        w = tiny if smoke else workload
        cases += [{"case": "jaxcl", "workload": w, "variant": v, "steps": steps, "row_workload": workload}
                  for v in variants]
        cases.append({"case": "torch_compiled", "workload": w, "steps": steps, "row_workload": workload})
    cases.append({"case": "cl_run", "shape": "smoke" if smoke else "real"})
    for _, workload, _, _, _, anchor in ROWS:
        if anchor and tunix_dir:
            cases.append({"case": "tunix", "anchor": "tiny" if smoke else anchor, "row_workload": workload})
    for _, workload, tiny, *_ in ROWS:
        cases.append({"case": "torch_eager", "workload": tiny if smoke else workload, "steps": steps,
                      "row_workload": workload})
    cases.append({"case": "env", "steps": steps})
    return [c for c in cases if (not only or c["case"] in only)
            and (not workloads or c.get("row_workload", workloads[0]) in workloads)]


def command(case: dict, tunix_dir: str | None) -> tuple[list[str], dict]:
    """The subprocess command line and extra environment of one case."""
    if case["case"] == "tunix":
        return [sys.executable, os.path.join(tunix_dir, "anchor_tunix.py"), case["anchor"]], {
            "TUNIX_SITE": os.path.join(tunix_dir, "tunix_site")}
    if case["case"] == "cl_run":
        return [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)], {}
    step_case = {k: v for k, v in case.items() if k != "row_workload"}
    return [sys.executable, STEP_SCRIPT, "--case", json.dumps(step_case)], {}


def run_cases(cases: list[dict], out: str, budget_s: float, tunix_dir: str | None, echo=print) -> list[dict]:
    """Runs ``cases`` one subprocess each within ``budget_s``; writes and returns ``raw.json`` entries."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")])))
    start, raw = time.time(), []
    for case in cases:
        left = budget_s - (time.time() - start)
        estimate = ESTIMATE_S[case["case"]]
        if left < estimate:
            result = {"skipped": f"{left:.0f} s of the budget left, the case needs about {estimate} s"}
        else:
            result = _subprocess(case, env, left, out, tunix_dir)
        raw.append({"case": case, "result": result})
        _write_json(os.path.join(out, "raw.json"), raw)
        echo(_line(case, result))
    return raw


def _subprocess(case: dict, env: dict, timeout: float, out: str, tunix_dir: str | None) -> dict:
    cmd, extra = command(case, tunix_dir)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env | extra, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        stderr = proc.stderr
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {"error": f"exit {proc.returncode}", "stderr": stderr[-2500:]}
    except subprocess.TimeoutExpired as e:
        result, stderr = {"error": f"stopped at the budget's end after {timeout:.0f} s"}, str(e.stderr or "")
    result["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "bench.log"), "a", encoding="utf-8") as f:
        f.write(f"== {json.dumps(case)}\n{stderr[-4000:]}\n{json.dumps(result)}\n")
    return result


def _line(case: dict, result: dict) -> str:
    name = f"{case['case']:<15} {case.get('workload', case.get('anchor', case.get('shape', ''))):<13}"
    if "skipped" in result or "error" in result:
        return f"{name} {'SKIPPED ' + result['skipped'] if 'skipped' in result else 'ERROR ' + result['error']}"
    keys = ("tokens_per_s", "examples_per_s", "step_s", "pipelined_step_s", "peak_mem_gib", "wall_s",
            "compile_s", "train_s", "eval_s", "bf16_matmul_tflops")
    return name + " " + " ".join(f"{k}={result[k]:.4g}" for k in keys if isinstance(result.get(k), (int, float)))


# ------------------------------------------------------------------------------ end-to-end CL run

def write_stream(root: str, shape: dict, seed: int = 0) -> list[str]:
    """A synthetic 4-task CL_Benchmark stream: random sentences, 4 labels per task, each label a
    fixed function of which marker word the sentence holds. Returns the task names."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(shape["vocab"])]
    names = []
    for t in range(shape["tasks"]):
        name, labels = f"task{t}", [f"t{t}l{k}" for k in range(4)]
        folder = os.path.join(root, "TC", name)
        os.makedirs(folder, exist_ok=True)
        for split in ("train", "test"):
            rows = []
            for _ in range(shape[split]):
                k = int(rng.integers(4))
                n = int(rng.integers(shape["words"][0], shape["words"][1] + 1))
                sentence = list(rng.choice(words, n)) + [f"m{t}{k}"]
                rng.shuffle(sentence)
                rows.append({"sentence": " ".join(sentence), "label": labels[k]})
            _write_json(os.path.join(folder, f"{split}.json"), rows)
        _write_json(os.path.join(folder, "labels.json"), labels)
        names.append(name)
    return names


def word_tokenizer(texts):
    """A WordLevel tokenizer over the whitespace-separated words of ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in texts:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def cl_run(shape_name: str) -> dict:
    """``jaxcl.train.loop.run`` on the synthetic stream; wall, compile, train and evaluation seconds."""
    import tempfile

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench_lora_step import WORKLOADS
    from jaxcl.data import load_stream
    from jaxcl.models.llama import Llama, LlamaConfig
    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import run

    shape = CL_SHAPE[shape_name]
    work = tempfile.mkdtemp()
    tasks = write_stream(os.path.join(work, "stream"), shape)
    loaded = load_stream("cl_benchmark", tasks, os.path.join(work, "stream"))
    tokenizer = word_tokenizer([e.prompt + " " + e.answer for t in loaded for e in t.train + t.test])
    hf = WORKLOADS[shape["model"]]["hf"]
    model = Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    cfg = jconfig.from_dict({
        "method": "olora", "model": f"random {shape['model']} shape", "dtype": "bfloat16",
        "data": {"source": "cl_benchmark", "root": os.path.join(work, "stream"), "order": tasks,
                 "max_prompt_tokens": shape["prompt_tokens"], "max_answer_tokens": 8},
        "train": {"epochs": shape["epochs"], "batch_size": shape["batch"], "lr": 1e-3},
        "eval": {"max_new_tokens": shape["new_tokens"], "batch_size": shape["eval_batch"]},
    }, where="bench cl_run")
    cache = os.path.join(work, "xla_cache")  # empty: the first run compiles everything
    cfg = dataclasses.replace(cfg, compile_cache=cache)
    t0 = time.perf_counter()
    results = run(cfg, os.path.join(work, "run"), progress=False, model_and_tokenizer=(model, tokenizer))
    wall = time.perf_counter() - t0
    # the same config again: the persistent compilation cache serves its programs
    t0 = time.perf_counter()
    again = run(cfg, os.path.join(work, "run_again"), progress=False, model_and_tokenizer=(model, tokenizer))
    warm_wall = time.perf_counter() - t0
    with open(os.path.join(work, "run", "log.jsonl"), encoding="utf-8") as f:
        steps = [r for r in map(json.loads, f) if r["event"] == "step"]
    later = [r["seconds"] for r in steps if r["step"] > 1]
    fraction = cfg.data.validation_fraction  # split_validation holds out round(fraction * n) per task
    train_examples = sum(len(t.train) - int(round(fraction * len(t.train))) for t in loaded)
    return {"wall_s": wall, "engine_seconds": results.get("seconds"), "warm_cache_wall_s": warm_wall,
            "warm_cache_compile_s": again.get("compile_seconds"), "compilations": results.get("compilations"),
            # the engine's own split once results.json carries it; else what the step log shows
            "compile_s": results.get("compile_seconds"), "train_s": results.get("train_seconds"),
            "eval_s": results.get("eval_seconds"), "logged_step_s": sum(r["seconds"] for r in steps),
            "first_steps_s": sum(r["seconds"] for r in steps if r["step"] == 1),
            "median_step_s": statistics.median(later) if later else None, "optimizer_steps": len(steps),
            "train_examples": train_examples,
            "epochs": shape["epochs"], "batch_size": shape["batch"], "test_prompts": sum(len(t.test) for t in loaded),
            "evaluations": len(tasks) + 1, "max_new_tokens": shape["new_tokens"], "method": cfg.method,
            "AP_random_weights": results["metrics"]["AP"], "device": str(jax.devices()[0].device_kind)}


# ------------------------------------------------------------------------------------ summary

def rows_from(raw: list[dict], run_label: str) -> dict:
    """results.json rows from one run's raw entries (only rows whose jaxcl case finished)."""
    done = {}
    for entry in raw:
        c, r = entry["case"], entry["result"]
        if "error" in r or "skipped" in r:
            continue
        key = (c["case"], c.get("row_workload"))
        speed = lambda res: res.get("tokens_per_s") or res.get("examples_per_s") or 0.0
        if c["case"] != "jaxcl" or key not in done or speed(r) > speed(done[key]):  # the faster jaxcl variant
            done[key] = r
    rows = {}
    for name, workload, _, unit, key, _ in ROWS:
        jx = done.get(("jaxcl", workload))
        if jx is None:
            continue
        peers = {p: done[(p, workload)][key] for p in ("torch_eager", "torch_compiled") if (p, workload) in done}
        tunix = done.get(("tunix", workload))
        # like-for-like ratios: torch peers by synchronised medians, tunix by the anchors' timing
        candidates = {p: jx[key] / v for p, v in peers.items()}
        if tunix:
            candidates["tunix"] = jx[key] * jx["step_s"] / jx["pipelined_step_s"] / tunix["tokens_per_s"]
        best = min(candidates, key=candidates.get) if candidates else None
        rows[name] = {"jaxcl": jx[key], "torch_eager": peers.get("torch_eager"),
                      "torch_compiled": peers.get("torch_compiled"),
                      "tunix": tunix["tokens_per_s"] if tunix else None,
                      "ratio": candidates[best] if best else None, "best_peer": best, "unit": unit,
                      "peak_mem_gib": {"jaxcl": jx.get("peak_mem_gib")} | {
                          p: done[(p, workload)].get("peak_mem_gib") for p in peers} | (
                          {"tunix": tunix.get("peak_mem_gib")} if tunix else {}),
                      "mfu_jaxcl": jx.get("mfu"), "device": jx.get("device"), "run": run_label,
                      "jaxcl_variant": jx.get("variant"),
                      "jaxcl_pipelined": jx[key] * jx["step_s"] / jx["pipelined_step_s"],
                      "missing_peers": sorted({"torch_eager", "torch_compiled"} - set(peers))
                      + ([] if tunix or workload == "t5_large" else ["tunix"])}
    cl = done.get(("cl_run", None))
    if cl:
        rows[CL_ROW] = cl | {"run": run_label}
    return rows


def table(rows: dict) -> str:
    """The markdown tables of the step rows and the CL run row(s) of results.json."""
    def fmt(x, spec=",.0f"):
        return "-" if x is None else format(x, spec)

    lines = ["| workload | jaxcl | torch eager | torch compiled | tunix | best peer | jaxcl / best peer | "
             "peak GiB (jaxcl) | device | run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, _, _, unit, _, _ in ROWS:
        r = rows.get(name)
        if r:
            lines.append(f"| {name} ({unit}) | {fmt(r['jaxcl'])} | {fmt(r.get('torch_eager'))} | "
                         f"{fmt(r.get('torch_compiled'))} | {fmt(r.get('tunix'))} | {r.get('best_peer') or '-'} | "
                         f"{fmt(r.get('ratio'), '.2f')}{'x' if r.get('ratio') else ''} | {fmt((r.get('peak_mem_gib') or {}).get('jaxcl'), '.1f')} | "
                         f"{r.get('device')} | {r.get('run')} |")
    cl = rows.get(CL_ROW)
    if cl:
        lines += ["", "| CL run | wall s | engine s | compile s | train s | eval s | logged steps s | median step ms | "
                  "steps | device | run |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {cl['method']}, {cl['train_examples']} examples x {cl['epochs']:g} epochs, b{cl['batch_size']}, "
                  f"{cl['test_prompts']} prompts x {cl['evaluations']} evaluations | {fmt(cl['wall_s'], '.1f')} | "
                  f"{fmt(cl.get('engine_seconds'), '.1f')} | {fmt(cl.get('compile_s'), '.1f')} | "
                  f"{fmt(cl.get('train_s'), '.1f')} | {fmt(cl.get('eval_s'), '.1f')} | {fmt(cl['logged_step_s'], '.1f')} | "
                  f"{fmt(None if cl['median_step_s'] is None else 1000 * cl['median_step_s'], '.1f')} | "
                  f"{cl['optimizer_steps']} | {cl['device']} | {cl['run']} |"]
    return "\n".join(lines)


def update_results_md(path: str, rows: dict) -> None:
    """Rewrites the generated table between the markers of ``path`` (appended when it has none)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    block = (f"{TABLE_START}\n## Latest `bench/run_all.py` rows (generated from results.json)\n\n{table(rows)}\n\n"
             f"'-': a peer that did not run in that row's run (see its raw.json), or a time the engine's "
             f"results.json does not report yet. Rows written before run_all.py existed come from "
             f"bench_lora_step.py --summarize (their run names the raw file). {TABLE_END}")
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/jaxcl_bench"))
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole invocation")
    p.add_argument("--tunix", default=os.environ.get("TUNIX_DIR"),
                   help="folder with anchor_tunix.py and tunix_site/ (the JAX peer; skipped without it)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any backend: tests the harness")
    p.add_argument("--only", default="", help="comma-separated case kinds to run (jaxcl, torch_compiled, cl_run, "
                                               "tunix, torch_eager, env); default all")
    p.add_argument("--workloads", default="", help="comma-separated workloads whose step cases run ("
                                                    + ", ".join(r[1] for r in ROWS) + "); default all")
    p.add_argument("--from-raw", nargs="+", metavar="RAW_JSON",
                   help="run nothing: write the rows of earlier runs' raw.json files (e.g. fetched from the GPU)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(cl_run(json.loads(args.case)["shape"])))
        return 0
    tunix = args.tunix if args.tunix and os.path.isdir(os.path.join(args.tunix, "tunix_site")) else None
    if args.tunix and tunix is None:
        print(f"{args.tunix}: no tunix_site/ there; the tunix peer is skipped", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if args.from_raw:
        raw = [entry for path in args.from_raw for entry in json.load(open(path, encoding="utf-8"))]
    else:
        only = tuple(filter(None, args.only.split(",")))
        workloads = tuple(filter(None, args.workloads.split(",")))
        raw = run_cases(plan(args.smoke, tunix, only, workloads), args.out, args.budget_s, tunix,
                        echo=lambda s: print(s, flush=True))
    results_path = os.path.join(args.out if args.smoke else HERE, "results.json")
    md_path = os.path.join(args.out if args.smoke else HERE, "RESULTS.md")
    rows = json.load(open(results_path, encoding="utf-8")) if os.path.exists(results_path) else {}
    label = f"run_all {'smoke ' if args.smoke else ''}{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    rows.update(rows_from(raw, label))
    _write_json(results_path, rows)
    update_results_md(md_path, rows)
    print(f"wrote {results_path} and {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
