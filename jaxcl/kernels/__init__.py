"""Pure math kernels of jaxcl: jnp functions, no Flax, no I/O.

Metric definitions: docs/metrics.md.

Use them as ``jaxcl.kernels.rls.update``, ``jaxcl.kernels.lora.apply``, ...
"""

from jaxcl.kernels import attention_select, lora, metrics, orthogonal, rls, sensitivity, sparse_experts

__all__ = ["attention_select", "lora", "metrics", "orthogonal", "rls", "sensitivity", "sparse_experts"]
