"""Helpers for engine and method tests: a tiny CL_Benchmark-format stream, a word-level tokenizer over
it, and tiny random JAX Llama / T5 models — small enough that a whole continual-learning run takes
seconds. (A module with its own name, so test files in any folder can import it unambiguously.)"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

# Three synthetic classification tasks: the label is a fixed function of the sentence's words.
TASKS = {
    "colors": (["red", "blue"], lambda words: "red" if "sun" in words else "blue"),
    "animals": (["cat", "dog"], lambda words: "cat" if "milk" in words else "dog"),
    "sizes": (["big", "small"], lambda words: "big" if "tree" in words else "small"),
}

_MIST = {"mist_batch_size": 4, "mist_per_example_chunk": 2, "mist_sensitivity_examples": 8}
# Small options where the defaults cost compile or memory time on the tiny model (the method
# contract and kill-and-resume tests run every method with them); every registered method must have
# an entry (the contract test checks), so a new method cannot skip the contract.
METHOD_ARGS = {
    "seq_ft": {"frozen": ["embed"]}, "seq_lora": {}, "inc_lora": {}, "olora": {"hard_projection": True},
    "l2_lora": {}, "mtl": {}, "per_task": {}, "any_ssr": {"expansion_dim": 16}, "oa_adapter": {"hard_projection": True},
    "sapt": {"pseudo_new_tokens": 2}, "smat": {"num_experts": 2, "selector_dim": 4, "support_size": 4},
}
WRAPPER_ARGS = {"replay+seq_lora": {}, "mist+seq_lora": _MIST, "mist+olora": _MIST,
                "replay+any_ssr": {"expansion_dim": 16}}

WORDS = ["sun", "moon", "milk", "bone", "tree", "leaf", "rock", "sea", "sky", "sand"]


def write_stream(root: str, n_train: int = 24, n_test: int = 8, seed: int = 0) -> list[str]:
    """Writes ``root/TC/{task}/{train,test,labels}.json``; returns the task names in order."""
    rng = np.random.default_rng(seed)
    for name, (labels, rule) in TASKS.items():
        folder = os.path.join(root, "TC", name)
        os.makedirs(folder, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for _ in range(n):
                words = list(rng.choice(WORDS, size=3, replace=False))
                rows.append({"sentence": " ".join(words), "label": rule(words)})
            with open(os.path.join(folder, f"{split}.json"), "w") as f:
                json.dump(rows, f)
        with open(os.path.join(folder, "labels.json"), "w") as f:
            json.dump(labels, f)
    return list(TASKS)


def word_tokenizer(texts):
    """A WordLevel tokenizer over every whitespace-separated word of ``texts`` (+ specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for text in texts:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")


def tiny_llama(vocab_size: int, seed: int = 0, dtype=jnp.float32):
    from jaxcl.models import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=(1,),
                         pad_token_id=0, initializer_range=0.1)
    return Llama(config, rngs=nnx.Rngs(seed), dtype=dtype)


def tiny_config(stream_root: str, **overrides) -> dict:
    cfg = {
        "method": "olora", "model": "tiny", "dtype": "float32",
        "data": {"source": "cl_benchmark", "root": stream_root, "order": list(TASKS),
                 "max_prompt_tokens": 48, "max_answer_tokens": 4},
        "train": {"steps_per_task": 6, "batch_size": 4, "lr": 1e-2},
        "eval": {"max_new_tokens": 3, "batch_size": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and key in cfg:
            cfg[key] = dict(cfg[key], **value)
        else:
            cfg[key] = value
    return cfg


def tiny_t5(vocab_size: int, seed: int = 0):
    from jaxcl.models.t5 import T5, T5Config

    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
                      decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    return T5(config, rngs=nnx.Rngs(seed), dtype=jnp.float32)


def tiny_stream(stream_root: str, tokenizer, encoder_decoder: bool = False, **overrides):
    """The engine's ``pipeline.Stream`` over the tiny tasks (``tiny_config`` plus ``overrides``):
    method tests read ``TaskInfo.batches`` from it exactly as the loop does."""
    from jaxcl.data import load_stream
    from jaxcl.train import config, sharding
    from jaxcl.train.pipeline import Stream

    cfg = config.from_dict(tiny_config(stream_root, **overrides))
    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    return Stream.prepare(cfg, tasks, tokenizer, encoder_decoder, sharding.make_mesh(cfg.mesh))


def task_info(stream, index: int, model, **fields):
    """The ``TaskInfo`` the loop gives a method for task ``index`` of ``stream``."""
    import functools

    from jaxcl.methods import TaskInfo

    return TaskInfo(index, len(stream.tasks), stream.tasks[index].name,
                    batches=functools.partial(stream.task_batches, [index]),
                    validation_batches=functools.partial(stream.task_batches, [index], "validation"),
                    model=model, **fields)


class EngineSteps:
    """The engine's jitted ``train_step`` for ``method`` on ``model`` (the loop's split of the base
    weights into trained and frozen parts), driven by hand: ``run(state, batches, ctx)``."""

    def __init__(self, method, model, tx, max_targets: int):
        import functools

        import jax
        from jaxcl.train import step as jstep

        self.method, self.tx = method, tx
        self.graphdef, weights = nnx.split(model)
        self.trained, self.frozen = jstep.split_base(method, nnx.to_pure_dict(weights))
        self.step = jax.jit(functools.partial(jstep.train_step, graphdef=self.graphdef, method=method,
                                              make_tx=lambda _: method.optimizer(tx), max_targets=max_targets))

    def run(self, state, batches, ctx, key_seed: int = 0):
        """``(state after the steps, trained base after them, per-step metrics)``; one step per batch
        of ``batches`` (each with a leading grad-accumulation axis)."""
        import jax
        from jaxcl.methods import MethodState
        from jaxcl.train import step as jstep

        params = {"method": jax.tree.map(jnp.copy, state.params), "base": jax.tree.map(jnp.copy, self.trained)}
        tstate = jstep.TrainState(params, self.method.optimizer(self.tx).init(params), ctx)
        metrics = []
        for i, batch in enumerate(batches):
            tstate, m = self.step(tstate, self.frozen, state.fixed, batch, jax.random.PRNGKey(1000 * key_seed + i))
            metrics.append(m)
        return MethodState(tstate.params["method"], state.fixed), tstate.params["base"], metrics
