"""Shared fixtures for the model tests: offline tokenizers for tiny checkpoints."""
from __future__ import annotations

import pathlib

import pytest

# Special-token ids of the tiny tokenizer; they match T5's (pad 0, eos 1, unk 2).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread():
    """The torch references run single-threaded: with 2 cores shared with XLA (and pytest-xdist),
    torch's OpenMP threads oversubscribe and its CPU forward gets ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_tokenizer(directory, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


@pytest.fixture(scope="session")
def save_tiny_tokenizer():
    """``save(directory, vocab_size) -> PreTrainedTokenizerFast``: a WordLevel tokenizer over the words
    ``w3 .. w{vocab_size-1}`` (whitespace split; ids = the number after ``w``), with ``<pad>`` = 0,
    ``</s>`` = 1 (eos), ``<unk>`` = 2, saved into ``directory`` so ``load_model(directory)`` finds it."""

    def save(directory: str | pathlib.Path, vocab_size: int):
        return _tiny_tokenizer(directory, vocab_size)

    return save


@pytest.fixture(scope="session")
def save_tiny_causal_lm(save_tiny_tokenizer):
    """``save(directory, family="llama", seed=0, **config_overrides) -> torch model``: a tiny random
    transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (family
    ``"llama"``, ``"qwen2"``, ``"mistral"``; vocab 64, d 32, 2 layers, 4 heads / 2 kv heads; norm weights
    and biases randomised too, so a mixed-up norm or a dropped bias shows) saved with
    ``save_pretrained`` plus the tiny tokenizer. Returned in eval mode, float32."""
    import torch
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}

    def save(directory: str | pathlib.Path, family: str = "llama", seed: int = 0, **overrides):
        config_class, model_class = (getattr(transformers, name) for name in classes[family])
        kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, bos_token_id=None, eos_token_id=EOS_ID,
                      pad_token_id=PAD_ID, attn_implementation="eager")
        kwargs.update(overrides)
        torch.manual_seed(seed)
        model = model_class(config_class(**kwargs)).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    param.uniform_(-0.5, 0.5)
        model.save_pretrained(str(directory))
        save_tiny_tokenizer(directory, kwargs["vocab_size"])
        return model

    return save


@pytest.fixture(scope="session")
def save_tiny_llama(save_tiny_causal_lm):
    """``save(directory, seed=0, **config_overrides) -> LlamaForCausalLM``: ``save_tiny_causal_lm``'s Llama."""

    def save(directory: str | pathlib.Path, seed: int = 0, **overrides):
        return save_tiny_causal_lm(directory, "llama", seed, **overrides)

    return save


@pytest.fixture(scope="session")
def torch_llama_from_gguf():
    """``load(path) -> LlamaForCausalLM`` (float32, eval) built through transformers' own GGUF reader
    ``load_gguf_checkpoint`` (its config mapping, dequantisation and q/k un-permutation).
    ``from_pretrained(gguf_file=...)`` would call the same reader but insists on the optional
    ``accelerate`` package, which jaxcl does not depend on."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    def load(path):
        meta = load_gguf_checkpoint(str(path))["config"]
        config = LlamaConfig(**{k: v for k, v in meta.items() if k not in ("model_type", "_model_name_or_path")},
                             attn_implementation="eager")
        model = LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
        model.tie_weights()
        return model.eval()

    return load
