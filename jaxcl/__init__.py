"""jaxcl: parameter-efficient continual learning of LLMs in JAX/Flax.

Public entry points (submodules hold the rest):
  ``jaxcl.load_model(source)``, ``jaxcl.generate(model, tokenizer, prompts)``  — models
  ``jaxcl.kernels.{lora, rls, orthogonal, metrics, sensitivity, sparse_experts, attention_select}``
  ``jaxcl.methods.build(name, args)``                                          — CL methods
  ``jaxcl.run(config, out_dir)`` / ``jaxcl.load_config(path)``                  — the CL engine
"""
__version__ = "0.1.0"

from jaxcl import _quiet  # noqa: F401  (before anything imports transformers)
from jaxcl import kernels
from jaxcl.models import Adapter, SiteHook, generate, load_model
from jaxcl.train.config import RunConfig, load as load_config
from jaxcl.train.loop import run

__all__ = ["Adapter", "RunConfig", "SiteHook", "generate", "kernels", "load_config", "load_model", "run"]
