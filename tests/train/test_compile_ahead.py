"""Every program a run calls was compiled ahead, in parallel, for the shapes the stream fixes: no call
of the train step, the optimizer init, generation, routing or the validation loss falls back to a
compile of its own (``compilation.Program.misses``), whatever the method, wrapper or model family."""
import pytest

from jaxcl.train import config as jconfig, loop

from tiny_cl import METHOD_ARGS, TASKS, WRAPPER_ARGS, tiny_config, tiny_llama, tiny_t5


@pytest.mark.slow
@pytest.mark.parametrize("method, family", [("seq_lora", "llama"), ("any_ssr", "llama"), ("replay+seq_lora", "llama"),
                                            ("olora", "t5")])
def test_every_call_runs_a_program_compiled_ahead(method, family, stream_root, tiny_tokenizer, tmp_path, monkeypatch):
    runners = []
    compile_ahead = loop._Runner.compile_ahead

    def kept(self):
        compile_ahead(self)
        runners.append(self)

    monkeypatch.setattr(loop._Runner, "compile_ahead", kept)
    args = WRAPPER_ARGS[method] if method in WRAPPER_ARGS else METHOD_ARGS[method]
    cfg = jconfig.from_dict(tiny_config(stream_root, method=method, method_args=args, compile_cache=None,
                                        train={"steps_per_task": 3, "batch_size": 4, "lr": 1e-2},
                                        eval={"max_test_per_task": 4, "batch_size": 4, "max_new_tokens": 2}))
    model = (tiny_llama if family == "llama" else tiny_t5)(len(tiny_tokenizer))
    results = loop.run(cfg, str(tmp_path / "run"), progress=False, model_and_tokenizer=(model, tiny_tokenizer))
    assert len(results["matrix"]) == len(TASKS)
    (runner,) = runners
    programs = runner.programs
    assert len(programs) >= 5
    assert [p.misses for p in programs] == [0] * len(programs)
