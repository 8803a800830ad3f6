"""Fixtures of the engine tests that need a model on disk (what a user passes as ``model``)."""
import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny torch Llama over the word tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, eos_token_id=1,
                         pad_token_id=0, bos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tiny_tokenizer.save_pretrained(str(directory))
    return str(directory)
