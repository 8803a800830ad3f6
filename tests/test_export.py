"""PEFT LoRA export and import: an exported folder loaded by ``peft.PeftModel`` on the transformers
model gives jaxcl's logits with the adapter; import reads back the same arrays; the CLI exports a
finished run's checkpoint and refuses methods without a PEFT form."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import cli, methods as jmethods
from jaxcl.export import ExportError, export, note, read_adapter
from jaxcl.methods import axes as jaxes
from jaxcl.methods.base import ModelInfo
from jaxcl.models import load_model

from tiny_cl import TASKS, tiny_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    # torch's OpenMP threads would fight XLA for the CPU cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random float32 transformers Llama saved as an HF folder (vocabulary of the tiny stream)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = str(tmp_path_factory.mktemp("hf_llama"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, eos_token_id=1,
                         pad_token_id=0, bos_token_id=3, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def jax_model(hf_dir):
    return load_model(hf_dir, tokenizer=None)[0]


IDS = np.array([[3, 5, 9, 12, 7, 4, 20, 11], [3, 8, 8, 15, 2, 6, 10, 13]])


def _state(method, model, num_tasks, seed):
    """The method's initial state with every float array replaced by random non-zero values."""
    state, _ = jaxes.split(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), num_tasks))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
                                    for k, x in zip(keys, leaves)])


def _peft_logits(hf_dir, adapter_dir):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _jaxcl_logits(model, method, state):
    return np.asarray(model(jnp.asarray(IDS), adapter=method.adapter(state, None)))


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_seq_lora_export_loads_in_peft_with_jaxcls_logits(hf_dir, jax_model, tmp_path):
    method = jmethods.build("seq_lora", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4,
                                         "lora_alpha": 12.0})
    state = _state(method, jax_model, 1, seed=1)
    (folder,) = export(jax_model, method, state, 1, str(tmp_path), base_model=hf_dir)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 12.0, "CAUSAL_LM")
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["base_model_name_or_path"] == hf_dir
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and len(tensors) == 2 * 3 * 2
    np.testing.assert_array_equal(a, np.asarray(state.params.lora["attn.q"].a[1]))

    ours, theirs = _jaxcl_logits(jax_model, method, state), _peft_logits(hf_dir, folder)
    base = np.asarray(jax_model(jnp.asarray(IDS)))
    assert _rel_err(ours, base) > 1e-2  # the adapter changes the logits, so the match below means something
    assert _rel_err(theirs, ours) <= 1e-4


def test_olora_two_tasks_export_as_one_concatenated_adapter(hf_dir, jax_model, tmp_path):
    method = jmethods.build("olora", {"r": 2})
    state = _state(method, jax_model, 2, seed=2)
    # after the last task the current LoRA is zero: every adapter is in the past bank
    state = state._replace(params=jax.tree.map(jnp.zeros_like, state.params))
    (folder,) = export(jax_model, method, state, 2, str(tmp_path), base_model=hf_dir)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"]) == (4, 64.0)  # rank 2 + 2; 2·32 keeps alpha/r = 32/2
    ours, theirs = _jaxcl_logits(jax_model, method, state), _peft_logits(hf_dir, folder)
    assert _rel_err(ours, np.asarray(jax_model(jnp.asarray(IDS)))) > 1e-2
    assert _rel_err(theirs, ours) <= 1e-4


def test_t5_export_with_sites_short_names_cannot_say_uses_full_module_names(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="relu", tie_word_embeddings=True,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(str(tmp_path / "t5"))
    model = load_model(str(tmp_path / "t5"), tokenizer=None)[0]
    # "q" is every attention's q; only the cross-attention's v: PEFT's "v" would take the other v's too
    method = jmethods.build("seq_lora", {"target_modules": ["q", "wo", "decoder.cross_attn.v"], "r": 2})
    state = _state(method, model, 1, seed=6)
    (folder,) = export(model, method, state, 1, str(tmp_path / "adapter"), base_model="t5")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        written = json.load(f)
    assert written["task_type"] == "SEQ_2_SEQ_LM"
    assert "decoder.block.1.layer.1.EncDecAttention.v" in written["target_modules"]
    assert not any(m.endswith("SelfAttention.v") for m in written["target_modules"])
    assert len(written["target_modules"]) == 2 * (3 + 2) + 2  # q of 3 attentions + wo per block pair, 2 cross v

    ids, dec = jnp.asarray(IDS % 40), jnp.asarray(IDS[:, :5] % 40)
    ours = np.asarray(model(ids, None, dec, adapter=method.adapter(state, None)))
    base = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "t5"), torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(np.asarray(ids)), decoder_input_ids=torch.tensor(np.asarray(dec))).logits.numpy()
    assert _rel_err(ours, np.asarray(model(ids, None, dec))) > 1e-2
    assert _rel_err(theirs, ours) <= 1e-4


def test_export_then_import_gives_the_same_arrays(jax_model, tmp_path):
    method = jmethods.build("seq_lora", {"r": 4, "sites": ["attn.q", "mlp.up"]})
    state = _state(method, jax_model, 1, seed=3)
    export(jax_model, method, state, 1, str(tmp_path / "seq"), base_model="m")
    back = read_adapter(jax_model, method, str(tmp_path / "seq"))
    assert sorted(back) == ["attn.q", "mlp.up"]
    for site, lora in state.params.lora.items():
        np.testing.assert_array_equal(back[site].a, lora.a)
        np.testing.assert_array_equal(back[site].b, lora.b)

    per_task = jmethods.build("per_task", {"r": 4})
    state = _state(per_task, jax_model, 3, seed=4)
    folders = export(jax_model, per_task, state, 2, str(tmp_path / "pt"), base_model="m")
    assert folders == [str(tmp_path / "pt" / "task_0"), str(tmp_path / "pt" / "task_1")]
    back = read_adapter(jax_model, per_task, folders[1])
    np.testing.assert_array_equal(back["attn.v"].b, state.fixed.past["attn.v"].b[:, 1])
    # a lora_alpha other than the method's is folded into B: the adapter adds the same
    half = jmethods.build("per_task", {"r": 4, "alpha": 16.0})
    np.testing.assert_allclose(read_adapter(jax_model, half, folders[1])["attn.v"].b,
                               2 * state.fixed.past["attn.v"].b[:, 1], rtol=1e-6)
    with pytest.raises(ExportError, match="rank 8"):
        read_adapter(jax_model, jmethods.build("seq_lora", {}), folders[1])
    with pytest.raises(ExportError, match="'seq_ft' has no LoRA"):
        read_adapter(jax_model, jmethods.build("seq_ft", {}), folders[1])
    with pytest.raises(ExportError, match="not a readable PEFT LoRA folder"):
        read_adapter(jax_model, per_task, str(tmp_path / "missing"))


def test_any_ssr_exports_no_lora_on_its_feature_layers(jax_model, tmp_path):
    method = jmethods.build("any_ssr", {"r": 2, "feature_layers": 1, "expansion_dim": 8})
    assert "router has no PEFT form" in note(method) and note(jmethods.build("per_task", {})) is None
    state = _state(method, jax_model, 2, seed=5)
    export(jax_model, method, state, 2, str(tmp_path), base_model="m", task=1)
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].any()
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"],
                                  state.fixed.past["attn.q"].b[1, 1])


TASKS_TWO = list(TASKS)[:2]


def _run(stream_root, out, hf_dir, tiny_tokenizer, method, order, **overrides):
    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import run

    values = dict(dict(train={"steps_per_task": 2, "batch_size": 4, "lr": 1e-2},
                       eval={"max_new_tokens": 2, "batch_size": 8, "max_test_per_task": 4}), **overrides)
    cfg = jconfig.from_dict(tiny_config(stream_root, method=method, model=hf_dir, data={"order": order},
                                        tensorboard=False, **values))
    return run(cfg, str(out), progress=False, model_and_tokenizer=(load_model(hf_dir, tokenizer=None)[0], tiny_tokenizer))


def test_cli_exports_a_runs_latest_checkpoint(stream_root, hf_dir, tiny_tokenizer, tmp_path, capsys):
    _run(stream_root, tmp_path / "run", hf_dir, tiny_tokenizer, "per_task", TASKS_TWO)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapters")]) == 0
    assert sorted(os.listdir(tmp_path / "adapters")) == ["task_0", "task_1"]
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "one"), "--task", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "one")) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.numpy import load_file
    trained = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert any(v.any() for k, v in trained.items() if "lora_B" in k)  # task 1's trained LoRA, not a zero slot
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--task", "5"]) == 2
    assert capsys.readouterr().err.strip() == "jaxcl: error: --task 5: the run has finished tasks 0..1"
    assert not (tmp_path / "x").exists()


def test_init_adapter_starts_the_runs_lora_from_a_peft_folder(stream_root, hf_dir, jax_model, tiny_tokenizer, tmp_path):
    method = jmethods.build("seq_lora", {})
    state = _state(method, jax_model, 1, seed=7)
    export(jax_model, method, state, 1, str(tmp_path / "start"), base_model=hf_dir)
    # lr 1e-30 (a config needs lr > 0): one Adam step moves no weight by more than ~1e-30, so the
    # run's LoRA is what it started from, and its export gives the same arrays back
    _run(stream_root, tmp_path / "run", hf_dir, tiny_tokenizer, "seq_lora", TASKS_TWO[:1],
         train={"steps_per_task": 1, "batch_size": 4, "lr": 1e-30, "init_adapter": str(tmp_path / "start")})
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
    back = read_adapter(jax_model, method, str(tmp_path / "again"))
    for site, lora in state.params.lora.items():
        np.testing.assert_allclose(back[site].a, lora.a, rtol=0, atol=1e-25)
        np.testing.assert_allclose(back[site].b, lora.b, rtol=0, atol=1e-25)


def test_cli_refuses_a_method_without_peft_form_in_one_line(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({
        "method": "seq_ft", "model": "m", "tasks": ["a"], "matrix": [[0.0]], "metrics": {},
        "config": {"method": "seq_ft", "method_args": {}, "model": "m"}}))
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'seq_ft' has no PEFT LoRA form" in err
    assert not (tmp_path / "out").exists()
