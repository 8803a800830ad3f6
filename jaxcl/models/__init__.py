"""Flax NNX Llama and T5, checkpoint loading, generation, and the adapter sites methods plug into."""
from jaxcl.models.sites import Adapter, SiteHook
from jaxcl.models.llama import Llama, LlamaConfig
from jaxcl.models.loading import ModelLoadError, load_model, load_tokenizer
from jaxcl.models.generate import generate

__all__ = ["Adapter", "Llama", "LlamaConfig", "ModelLoadError", "SiteHook", "T5", "T5Config",
           "generate", "load_model", "load_tokenizer"]


def __getattr__(name):
    # T5 is imported on first use only.
    if name in ("T5", "T5Config"):
        from jaxcl.models import t5
        return getattr(t5, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
