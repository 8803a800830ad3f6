"""Low-rank adapters (LoRA) as pure functions.

A LoRA pair at a linear site with ``d_in`` inputs and ``d_out`` outputs is the dict
``{"a": (rank, d_in), "b": (d_out, rank)}`` (the torch/peft layout), and its contribution to the
site's output is ``(alpha / rank) * (dropout(x) @ a.T) @ b.T``. Model weights in jaxcl are stored
``(d_in, d_out)`` so that a site computes ``x @ W``; :func:`merge` follows that layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LoRAParams = dict  # {"a": (rank, d_in), "b": (d_out, rank)}


def init(key: jax.Array, d_in: int, d_out: int, rank: int, dtype=jnp.float32) -> LoRAParams:
    """Creates a fresh LoRA pair.

    ``a`` follows torch's ``kaiming_uniform_(a=sqrt(5))`` (what peft uses), which for a
    ``(rank, d_in)`` tensor is ``U(-1/sqrt(d_in), 1/sqrt(d_in))``; ``b`` is zero so a new adapter
    starts as the identity on the model's function.

    Args:
      key: PRNG key.
      d_in: input features of the site.
      d_out: output features of the site.
      rank: adapter rank r (>= 0; rank 0 gives empty matrices).
      dtype: parameter dtype (adapters are float32 by default).

    Returns:
      ``{"a": (rank, d_in), "b": (d_out, rank)}``.
    """
    if d_in <= 0 or d_out <= 0 or rank < 0:
        raise ValueError(f"lora.init: expected d_in > 0, d_out > 0, rank >= 0; got {d_in=}, {d_out=}, {rank=}")
    # gain(leaky_relu, a=sqrt(5)) * sqrt(3 / fan_in) simplifies to 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(key, (rank, d_in), dtype, minval=-bound, maxval=bound)
    b = jnp.zeros((d_out, rank), dtype)
    return {"a": a, "b": b}


def apply(
    params: LoRAParams,
    x: jax.Array,
    alpha: float,
    rank: int,
    dropout_key: jax.Array | None = None,
    rate: float = 0.0,
) -> jax.Array:
    """Computes the adapter's additive output ``(alpha/rank) * (dropout(x) @ a.T) @ b.T``.

    The merged weight is never formed: the cost is O(r (d_in + d_out)) per token. The computation runs
    in ``x.dtype`` (parameters are cast to it), like a bf16 forward with fp32 master adapters.

    Args:
      params: ``{"a": (R, d_in), "b": (d_out, R)}``; R may be a multiple of ``rank`` after
        :func:`concat`, in which case the result is the sum of the concatenated adapters.
      x: inputs ``(..., d_in)``.
      alpha: LoRA alpha.
      rank: the rank r used in the scale ``alpha / r`` (per adapter, not the concatenated total).
      dropout_key: PRNG key for input dropout; ``None`` disables dropout.
      rate: dropout probability in [0, 1) (a Python float; inverted dropout, kept inputs are scaled by
        ``1 / (1 - rate)`` as in torch).

    Returns:
      ``(..., d_out)`` in ``x.dtype``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"lora.apply: dropout rate must be in [0, 1), got {rate}")
    a = params["a"].astype(x.dtype)
    b = params["b"].astype(x.dtype)
    if dropout_key is not None and rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    scale = jnp.asarray(alpha / rank, x.dtype)
    return ((x @ a.T) @ b.T) * scale


def merge(w: jax.Array, params: LoRAParams, alpha: float, rank: int) -> jax.Array:
    """Folds an adapter into a weight stored ``(d_in, d_out)``: ``W + (alpha/rank) (b @ a).T``.

    The sum is formed in the wider of the two dtypes and cast back to ``w.dtype``, so that
    ``x @ merge(W, p) == x @ W + apply(p, x)`` up to rounding.

    Args:
      w: base weight ``(d_in, d_out)``.
      params: ``{"a": (R, d_in), "b": (d_out, R)}``.
      alpha: LoRA alpha.
      rank: rank r of the scale ``alpha / r``.

    Returns:
      merged weight ``(d_in, d_out)`` in ``w.dtype``.
    """
    a, b = params["a"], params["b"]
    if w.shape != (a.shape[1], b.shape[0]):
        raise ValueError(
            f"lora.merge: weight must be (d_in, d_out) = {(a.shape[1], b.shape[0])} for this adapter, got {w.shape}"
        )
    compute = jnp.result_type(w.dtype, a.dtype, b.dtype)
    delta = (a.T.astype(compute) @ b.T.astype(compute)) * (alpha / rank)
    return (w.astype(compute) + delta).astype(w.dtype)


def concat(past: LoRAParams | None, new: LoRAParams) -> LoRAParams:
    """Stacks adapters along the rank axis (O-LoRA's end of task).

    ``apply(concat(p, q), x, alpha, r) == apply(p, x, alpha, r) + apply(q, x, alpha, r)``.

    Args:
      past: ``{"a": (R, d_in), "b": (d_out, R)}``, or ``None`` / rank 0 for no past adapters.
      new: ``{"a": (r, d_in), "b": (d_out, r)}``.

    Returns:
      ``{"a": (R + r, d_in), "b": (d_out, R + r)}`` (dtype of ``new``).
    """
    if past is None:
        return {"a": new["a"], "b": new["b"]}
    if past["a"].shape[1:] != new["a"].shape[1:] or past["b"].shape[:1] != new["b"].shape[:1]:
        raise ValueError(
            "lora.concat: past and new adapters must share d_in and d_out; got "
            f"a {past['a'].shape} vs {new['a'].shape}, b {past['b'].shape} vs {new['b'].shape}"
        )
    dtype = new["a"].dtype
    return {
        "a": jnp.concatenate([past["a"].astype(dtype), new["a"]], axis=0),
        "b": jnp.concatenate([past["b"].astype(dtype), new["b"]], axis=1),
    }
