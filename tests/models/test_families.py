"""Qwen2/Qwen2.5 and Mistral (Llama variants in llama.py) and Llama with biases: parity with
transformers on tiny random checkpoints written by ``save_pretrained``, padded batches; the sliding
window on sequences longer than it; greedy generation past the window; config mapping."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcl.models import LlamaConfig, load_model
from llama_parity import padded_batches, rel_err, torch_logits

WINDOW = 4  # shorter than the 12-token rows of padded_batches
# name -> (family, config overrides, expected (biases, sliding_window) of the loaded config)
FAMILIES = {
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True), (("q", "k", "v"), None)),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
                     (("q", "k", "v"), WINDOW)),
    "mistral_window": ("mistral", dict(sliding_window=WINDOW, head_dim=16), ((), WINDOW)),
    "mistral_full": ("mistral", dict(sliding_window=None), ((), None)),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True),
                     (("q", "k", "v", "o", "gate", "up", "down"), None)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_tiny_causal_lm):
    """name -> (checkpoint dir, torch model)."""
    saved = {}
    for i, (name, (family, overrides, _)) in enumerate(FAMILIES.items()):
        directory = tmp_path_factory.mktemp(name)
        saved[name] = (directory, save_tiny_causal_lm(directory, family, seed=10 + i, **overrides))
    return saved


@jax.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_float32(checkpoints, name):
    directory, torch_model = checkpoints[name]
    model, _ = load_model(directory)
    assert (model.config.biases, model.config.sliding_window) == FAMILIES[name][2]
    for ids, mask, left in padded_batches(seed=4):
        ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
        err = rel_err(ours, torch_logits(torch_model, ids, mask, left), mask)
        print(f"\n[parity float32] {name} {'left' if left else 'right'}-padded: "
              f"max|dlogits|/max|logits| = {err:.2e}")
        assert err <= 1e-5
        assert np.isfinite(ours).all()


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_window"])
def test_the_window_changes_the_logits(checkpoints, name):
    """Without the window the same weights give other logits after the first WINDOW tokens (so the
    parity above does test the window), and the same ones before."""
    model, _ = load_model(checkpoints[name][0])
    ids, mask, _ = padded_batches(seed=4)[0]
    windowed = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    model.config = dataclasses.replace(model.config, sliding_window=None)
    full = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(windowed[:, :WINDOW], full[:, :WINDOW], rtol=1e-5, atol=1e-5)
    assert np.abs(windowed[0, WINDOW:] - full[0, WINDOW:]).max() > 1e-2


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_tied"])
def test_greedy_generation_matches_transformers(checkpoints, name):
    """The KV-cache decoder (past the window for Mistral) against transformers' ``generate``."""
    directory, torch_model = checkpoints[name]
    model, _ = load_model(directory)
    ids = np.random.default_rng(5).integers(3, 64, (2, 6)).astype(np.int32)
    steps = 8
    ours = jax.jit(lambda m, i: m.generate_ids(i, jnp.ones_like(i), max_new_tokens=steps, eos_token_id=64))(
        model, jnp.asarray(ids))
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                   max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), ref[:, ids.shape[1]:].numpy())


BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4}


def test_config_mapping():
    assert LlamaConfig.from_hf({**BASE, "model_type": "qwen2", "sliding_window": 8}).sliding_window is None
    qwen = LlamaConfig.from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                                "max_window_layers": 3})
    assert qwen.biases == ("q", "k", "v") and qwen.sliding_window is None  # no layer from 3 on
    mistral = LlamaConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 8,
                                   "attention_bias": True})  # transformers' Mistral has no biases
    assert mistral.biases == () and mistral.sliding_window == 8
    assert LlamaConfig.from_hf({**BASE, "model_type": "llama", "sliding_window": 8}).sliding_window is None


@pytest.mark.parametrize("change, field", [
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "layer_types"),
    ({"use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_qwen2_config_rejects_unsupported(change, field):
    with pytest.raises(ValueError, match=f"qwen2 config: .*{field}"):
        LlamaConfig.from_hf({**BASE, "model_type": "qwen2", **change})
