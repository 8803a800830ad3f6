"""Real weights: the default SmolLM2-135M-Instruct GGUF against transformers reading the same file."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcl.models import generate, load_model
from jaxcl.models.loading import default_gguf_path

pytestmark = pytest.mark.slow

TEXT = """\
The village sits at the bottom of a narrow valley, where two small rivers meet before they run \
together towards the sea. Most of the houses are built from the grey stone that was cut from the \
hills above, and their roofs are covered with dark slate. In the summer the gardens are full of \
beans, potatoes and tall yellow flowers, and children spend the long evenings swimming in the cold \
water below the old bridge. In the winter the wind comes down the valley at night, and the people \
keep their fires burning until morning.

There is one shop, which also serves as the post office, and a small school with forty pupils. The \
teacher has lived in the village for nearly thirty years. She says that the biggest change she has \
seen is the road: when she arrived, the journey to the nearest town took most of a day, but now a \
bus makes the trip four times a week. Some of the younger families have moved away to find work, \
while others have come from the cities because they want a quieter life and cheaper houses. On \
Saturday mornings a market is held in the square, and farmers sell eggs, cheese, honey and bread. \
Visitors often ask why anyone would choose to live so far from everything, and the answer they \
hear most often is simple: because it is home, and because the valley is beautiful in every season.
"""

CHATS = ["What is the capital of France?",
         "Give me three tips for staying focused while studying.",
         "Write a short sentence about the ocean."]


@pytest.fixture(scope="module")
def ours():
    return load_model("default")


@pytest.fixture(scope="module")
def reference(torch_llama_from_gguf):
    return torch_llama_from_gguf(default_gguf_path())


def test_next_token_argmax_agrees_with_transformers(ours, reference):
    model, tokenizer = ours
    ids = np.asarray([tokenizer(TEXT)["input_ids"]])
    assert ids.shape[1] >= 250
    logits = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))[0]
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits[0].numpy()
    agreement = float(np.mean(logits.argmax(-1) == expected.argmax(-1)))
    rel = float(np.abs(logits - expected).max() / np.abs(expected).max())
    print(f"\n[SmolLM2 default] {ids.shape[1]} tokens: argmax agreement {agreement:.4f}, "
          f"max|dlogits|/max|logits| {rel:.2e}")
    assert agreement >= 0.99


def test_chat_greedy_continuations_match_transformers(ours, reference):
    model, tokenizer = ours
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True) for c in CHATS]
    texts = generate(model, tokenizer, prompts, max_new_tokens=32)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                     do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"\n[SmolLM2 chat] {text!r}")
        assert text == expected
        assert len(text.split()) >= 3


def test_tokenizer_built_without_torch_matches_transformers_gguf_tokenizer(ours):
    """jaxcl builds SmolLM2's byte-level BPE tokenizer from the GGUF itself (transformers' GGUF reader
    needs torch); it must encode, decode and template exactly like transformers' tokenizer."""
    from transformers import AutoTokenizer

    from jaxcl.data import load_stream

    path = default_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tok = ours[1]
    assert "Tokenizer" in type(tok).__name__ and not hasattr(tok, "gguf_file")
    prompts = [e.prompt + " " + e.answer for t in load_stream("bundled", "wordnet") for e in t.test[:25]]
    texts = [TEXT, "In 2024, 366 days; 3.14159 and 1,000,000!", "naïve café — 東京 🙂\t tabs\n\nnewlines",
             "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", *CHATS, *prompts]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok(texts, add_special_tokens=False)["input_ids"] == ref(texts, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": CHATS[0]}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, len(tok)) == (ref.bos_token, ref.eos_token, ref.pad_token, len(ref))


def test_a_cached_default_model_loads_without_importing_transformers(tmp_path):
    """The second load of the default GGUF reads the cached conversion, and its tokenizer is built
    with ``tokenizers`` alone: transformers (which imports torch where torch is installed) stays out."""
    import os
    import subprocess
    import sys

    script = ("import sys; from jaxcl.models import load_model; model, tok = load_model('default'); "
              "print(type(tok).__name__, 'transformers' in sys.modules, 'torch' in sys.modules, tok('a b')['input_ids'])")
    env = dict(os.environ, JAXCL_MODEL_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
                     .stdout.split("\n")[-2] for _ in range(2))
    assert first.split()[0] == "Tokenizer" and second.split()[:3] == ["Tokenizer", "False", "False"]
    assert first.split(maxsplit=3)[3] == second.split(maxsplit=3)[3]
