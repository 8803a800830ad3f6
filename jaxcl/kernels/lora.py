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


def dropout(key: jax.Array | None, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout on adapter inputs: each entry zeroed with probability ``rate``, kept ones
    scaled by ``1 / (1 - rate)`` (as ``torch.nn.Dropout``). ``key=None`` or ``rate == 0``: ``x``.

    Examples:
      >>> x = jnp.ones((2, 3))
      >>> bool((dropout(None, x, 0.5) == x).all())
      True
      >>> y = dropout(jax.random.PRNGKey(0), x, 0.5)
      >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
      True
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"lora.dropout: rate must be in [0, 1), got {rate}")
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


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
      rate: dropout probability in [0, 1) (inverted dropout, see :func:`dropout`).

    Returns:
      ``(..., d_out)`` in ``x.dtype``.

    Examples:
      >>> p = init(jax.random.PRNGKey(0), d_in=4, d_out=3, rank=2)
      >>> apply(p, jnp.ones((5, 4)), alpha=16.0, rank=2).shape    # b starts at zero
      (5, 3)
      >>> float(jnp.abs(apply(p, jnp.ones((5, 4)), 16.0, 2)).max())
      0.0

    References:
      Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021. https://arxiv.org/abs/2106.09685
    """
    a = params["a"].astype(x.dtype)
    b = params["b"].astype(x.dtype)
    x = dropout(dropout_key, x, rate)
    scale = jnp.asarray(alpha / rank, x.dtype)
    return ((x @ a.T) @ b.T) * scale


def apply_bank(a: jax.Array, b: jax.Array, x: jax.Array, alpha: float, rank: int,
               weights: jax.Array | None = None) -> jax.Array:
    """The weighted sum of a bank of T LoRAs, ``(alpha/rank) Σ_t w_t (x a_tᵀ) b_tᵀ``.

    Per-example weights mix the adapters (SAPT's attention, a router's one-hot choice); without
    weights every adapter counts once (IncLoRA, O-LoRA). Merged weights are never formed.

    Args:
      a: ``(T, r, d_in)`` the bank's A matrices.
      b: ``(T, d_out, r)`` its B matrices.
      x: ``(B, ..., d_in)`` inputs.
      alpha, rank: the LoRA scale ``alpha / rank``.
      weights: ``(B, T)`` per-example weight of each adapter, or None (all ones).

    Returns:
      ``(B, ..., d_out)`` in ``x.dtype``.

    Examples:
      >>> ps = [init(k, 4, 3, 2) for k in jax.random.split(jax.random.PRNGKey(0), 2)]
      >>> ps = [dict(p, b=jnp.ones((3, 2))) for p in ps]
      >>> a, b = jnp.stack([p["a"] for p in ps]), jnp.stack([p["b"] for p in ps])
      >>> x = jnp.ones((1, 4))
      >>> both = apply(ps[0], x, 8.0, 2) + apply(ps[1], x, 8.0, 2)
      >>> bool(jnp.allclose(apply_bank(a, b, x, 8.0, 2), both))
      True
      >>> only_first = apply_bank(a, b, x, 8.0, 2, weights=jnp.array([[1.0, 0.0]]))
      >>> bool(jnp.allclose(only_first, apply(ps[0], x, 8.0, 2)))
      True
    """
    h = jnp.einsum("...d,trd->...tr", x, a.astype(x.dtype))
    if weights is not None:
        w = weights.astype(x.dtype)
        h = h * w.reshape(w.shape[:1] + (1,) * (h.ndim - 3) + w.shape[1:] + (1,))
    return jnp.asarray(alpha / rank, x.dtype) * jnp.einsum("...tr,tor->...o", h, b.astype(x.dtype))


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
