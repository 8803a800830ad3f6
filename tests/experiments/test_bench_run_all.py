"""bench/run_all.py's bookkeeping (the GPU cases themselves run with --smoke, see the script)."""
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "run_all.py")


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(rate, step_s=0.1, pipelined=0.08, key="tokens_per_s"):
    return {key: rate, "step_s": step_s, "pipelined_step_s": pipelined, "peak_mem_gib": 1.0, "device": "GPU"}


def test_plan_orders_cases_by_priority_and_tunix_is_optional(run_all):
    kinds = [c["case"] for c in run_all.plan(smoke=False, tunix_dir=None)]
    # per workload: jaxcl scanned, jaxcl unrolled, then its torch.compile peer
    assert kinds[:10] == ["jaxcl", "jaxcl", "torch_compiled"] * 3 + ["cl_run"]
    assert kinds[-4:] == ["torch_eager"] * 3 + ["env"]
    assert [c["variant"].get("scan", True) for c in run_all.plan(smoke=False, tunix_dir=None)[:2]] == [True, False]
    assert [c["case"] for c in run_all.plan(False, None, only=("cl_run", "env"))] == ["cl_run", "env"]
    t5 = run_all.plan(False, None, only=("jaxcl", "torch_compiled", "cl_run"), workloads=("t5_large",))
    assert [(c["case"], c.get("workload")) for c in t5] == [("jaxcl", "t5_large")] * 2 + [
        ("torch_compiled", "t5_large"), ("cl_run", None)]
    assert "tunix" not in kinds
    with_tunix = run_all.plan(smoke=True, tunix_dir="/t")
    assert [c["anchor"] for c in with_tunix if c["case"] == "tunix"] == ["tiny", "tiny"]
    assert {c["workload"] for c in with_tunix if "workload" in c} == {"tiny_llama", "tiny_t5"}


def test_budget_skips_cases_that_do_not_fit(run_all, tmp_path):
    raw = run_all.run_cases([{"case": "torch_compiled", "workload": "x", "steps": 1}], str(tmp_path), 10.0, None,
                            echo=lambda line: None)
    assert "skipped" in raw[0]["result"]


def test_ratio_is_against_the_best_peer_timed_the_same_way(run_all):
    raw = [{"case": {"case": "jaxcl", "row_workload": "smollm2_135m"}, "result": _step(200.0)},
           {"case": {"case": "torch_compiled", "row_workload": "smollm2_135m"}, "result": _step(150.0)},
           {"case": {"case": "torch_eager", "row_workload": "smollm2_135m"}, "result": {"error": "exit 1"}},
           # tunix is timed like the anchors: compared with jaxcl's pipelined rate, 200 * 0.1 / 0.08 = 250
           {"case": {"case": "tunix", "row_workload": "smollm2_135m"}, "result": {"tokens_per_s": 200.0}}]
    row = run_all.rows_from(raw, "run X")["smollm2_135m_b16x512"]
    assert row["best_peer"] == "tunix" and row["ratio"] == pytest.approx(1.25)
    assert row["torch_eager"] is None and row["missing_peers"] == ["torch_eager"]
    assert row["jaxcl_pipelined"] == pytest.approx(250.0) and row["run"] == "run X"


def test_a_row_reports_the_faster_jaxcl_variant(run_all):
    slow = dict(_step(100.0), variant={"scan": True})
    fast = dict(_step(180.0), variant={"scan": False})
    for order in ((slow, fast), (fast, slow)):
        raw = [{"case": {"case": "jaxcl", "row_workload": "llama2_7b"}, "result": r} for r in order]
        raw.append({"case": {"case": "torch_compiled", "row_workload": "llama2_7b"}, "result": _step(120.0)})
        row = run_all.rows_from(raw, "run Z")["llama2_7b_b8x512"]
        assert row["jaxcl"] == 180.0 and row["jaxcl_variant"] == {"scan": False}
        assert row["ratio"] == pytest.approx(1.5)


def test_generated_table_replaces_only_its_block(run_all, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Title\nprose\n{run_all.TABLE_START}\nold\n{run_all.TABLE_END}\nmore prose\n")
    rows = run_all.rows_from([{"case": {"case": "jaxcl", "row_workload": "t5_large"},
                               "result": _step(10.0, key="examples_per_s")}], "run Y")
    run_all.update_results_md(str(md), rows)
    text = md.read_text()
    assert text.startswith("# Title\nprose\n") and text.endswith("more prose\n") and "old" not in text
    assert "| t5_large_b8_src512_tgt50 (examples/s) | 10 | - | - | - | - | - |" in text
