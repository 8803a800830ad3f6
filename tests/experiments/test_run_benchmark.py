"""experiments/run_benchmark.py and experiments/summarize.py on CPU with a tiny model and stream."""
import json
import os

import yaml

from tiny_cl import tiny_config


def _benchmark(folder, stream_root, methods):
    """A benchmark folder of tiny configs; ``methods`` maps a file name to (method, method_args)."""
    os.makedirs(folder)
    for name, (method, args) in methods.items():
        cfg = tiny_config(stream_root, method=method, method_args=args, model="gguf:/nowhere/model.gguf")
        cfg["data"]["root"] = "/nowhere/benchmarks"  # replaced by the driver's --root
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    return str(folder)


def test_driver_runs_every_config_records_failures_and_resumes(scripts, stream_root, tiny_model, tmp_path,
                                                               monkeypatch, capsys):
    driver = scripts["run_benchmark"]
    folder = _benchmark(tmp_path / "bench", stream_root, {
        "seq_lora": ("seq_lora", {}), "any_ssr": ("any_ssr", {"feature_layers": 1}),
        "broken": ("olora", {"no_such_option": 1})})
    loads = []

    def loader(source, dtype):
        loads.append((source, dtype))
        return tiny_model

    monkeypatch.setattr(driver, "_load_model", loader)
    out = str(tmp_path / "runs")
    argv = [folder, "--out", out, "--root", stream_root, "--model", "tiny-model"]
    assert driver.main(argv) == 1  # one config fails
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["any_ssr", "broken", "seq_lora"]
    assert "FAILED" in lines[1] and "no_such_option" in lines[1]
    assert "AP" in lines[0] and "BWT" in lines[2] and lines[-1].startswith("2 of 3 methods done")
    assert loads == [("tiny-model", "float32")]  # loaded once, with the overriding --model
    runs = {r["name"]: r for r in json.load(open(os.path.join(out, "runs.json")))}
    assert runs["broken"]["status"] == "failed" and "MethodError" in runs["broken"]["error"]
    results = json.load(open(os.path.join(out, "seq_lora", "results.json")))
    assert results["config"]["data"]["root"] == stream_root and results["model"] == "tiny-model"
    assert runs["seq_lora"]["AP"] == results["metrics"]["AP"]

    # a second call skips finished methods and runs only the selected ones
    assert driver.main(argv + ["--methods", "seq_lora"]) == 0
    assert "(already done)" in capsys.readouterr().out
    assert loads == [("tiny-model", "float32")]
    # ... and leaves every record of runs.json as the runs made it
    assert {r["name"]: r for r in json.load(open(os.path.join(out, "runs.json")))} == runs


def test_drivers_sharing_an_output_folder_keep_each_others_records(scripts, tmp_path):
    record_run, out = scripts["run_benchmark"].record_run, str(tmp_path)
    record_run(out, {"name": "a", "status": "ok", "AP": 50.0, "wall_s": 12.0})
    record_run(out, {"name": "b", "status": "failed", "error": "OOM", "wall_s": 3.0})
    record_run(out, {"name": "a", "status": "done", "AP": 50.0, "wall_s": 0.0})  # a later call skips a
    record_run(out, {"name": "b", "status": "ok", "AP": 40.0, "wall_s": 9.0})     # and reruns b
    with open(os.path.join(out, "runs.json")) as f:
        assert json.load(f) == [{"name": "a", "status": "ok", "AP": 50.0, "wall_s": 12.0},
                                {"name": "b", "status": "ok", "AP": 40.0, "wall_s": 9.0}]


def test_summary_tables_routing_and_heatmaps(scripts, stream_root, tiny_model, tmp_path):
    folder = _benchmark(tmp_path / "standard_order1", stream_root, {
        "seq_lora": ("seq_lora", {}), "any_ssr": ("any_ssr", {"feature_layers": 1}), "smat": ("smat", {}),
        "mtl": ("mtl", {})})
    out = str(tmp_path / "runs")
    records = scripts["run_benchmark"].run_folder(folder, out, root=stream_root, methods=["seq_lora", "any_ssr"],
                                                  model_and_tokenizer=tiny_model, echo=lambda line: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"standard_order1": [
        {"method": "seq_lora", "paper": "P", "setting": "T5", "AP": 44.6, "BWT": None, "source": "Table 1"},
        {"method": "any_ssr", "paper": "Q", "setting": "T5", "AP": None, "BWT": None, "source": "none"}]}))
    assert "(no verdicts yet" in scripts["summarize"].build(folder, out, str(published))
    with open(os.path.join(folder, "CLAIMS.md"), "w") as f:
        f.write("# standard_order1: claims\n\n- **Any-SSR has BWT 0**: holds.\n")
    text = scripts["summarize"].build(folder, out, str(published))
    assert text.startswith("# standard_order1: 2 of 4 methods")
    assert "## The papers' claims on these runs\n\n- **Any-SSR has BWT 0**: holds." in text
    seq = json.load(open(os.path.join(out, "seq_lora", "results.json")))
    assert f"| seq_lora | {seq['metrics']['AP']:.1f} | {seq['metrics']['BWT']:.1f} |" in text
    assert "| smat | not run |" in text and "| mtl | not run |" in text
    assert "| seq_lora | P | T5 | 44.60 |" in text and "not transcribed" in text
    assert "**any_ssr** (row: after task i; column: task j)" in text
    assert "![any_ssr](heatmaps/any_ssr.png)" in text
    for name in ("seq_lora", "any_ssr"):
        with open(os.path.join(folder, "heatmaps", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
