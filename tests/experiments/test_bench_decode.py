"""bench/decode_weight_rewrite.py runs end to end on a CPU (its GPU figures come from the same code)."""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_decode_bench_times_the_three_cases():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "decode_weight_rewrite.py"), "--shape", "small",
                          "--tasks", "2", "--batch", "2", "--prompt", "8", "--new-tokens", "4", "--dtype", "float32",
                          "--repeats", "1"], capture_output=True, text=True, check=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS="cpu")).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["plain", "formed_once", "per_token", "ratio"]
    assert {r["new_tokens"] for r in rows} == {4} and set(rows[3]) >= {"per_token_over_formed_once", "formed_once_over_plain"}
