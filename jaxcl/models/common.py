"""Pieces the Llama and T5 layer stacks share: the weight table entry, running the stacked layers
(scanned or unrolled, optionally rematerialised), and attention over a KV cache plus new keys."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Weight(NamedTuple):
    """One entry of a model's weight table: the shape and the logical name of each axis.

    Axis names (one vocabulary for both models, so one sharding table can serve both):
    ``layers`` (the stacking axis), ``embed`` (model width), ``q_heads`` / ``kv_heads`` (query /
    key-value heads times head size, flattened), ``mlp`` (feed-forward width), ``vocab``, and T5's
    ``relpos`` (relative-position buckets) and ``heads`` (the number of heads).
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]

    def stacked(self, num_layers: int) -> "Weight":
        """The same weight for every layer: a leading ``(num_layers,)`` axis named ``layers``."""
        return Weight((num_layers, *self.shape), ("layers", *self.axes))


def is_weight(x: Any) -> bool:
    """``is_leaf`` for ``jax.tree`` functions over a weight table (``Weight`` is itself a tuple)."""
    return isinstance(x, Weight)


def remat_policy(remat: Union[bool, str]):
    """``jax.checkpoint`` policy of a model's ``remat`` attribute: True saves nothing; a string names a
    ``jax.checkpoint_policies`` policy."""
    return jax.checkpoint_policies.nothing_saveable if remat is True else getattr(jax.checkpoint_policies, remat)


def run_layers(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, *, scan: bool = True,
               remat: Union[bool, str] = False) -> tuple[Any, Any]:
    """``jax.lax.scan(body, carry, xs)``, or the same as a Python loop over the layers.

    The loop (``scan=False``) slices every layer's weights with static indices, so each layer's GEMMs
    read their operands straight from the stacked arrays (no dynamic-slice per layer, no loop carry),
    at the price of compile time growing with depth; its ``ys`` are stacked like scan's.

    Args:
      body: ``(carry, xs of one layer) -> (carry, ys of one layer)``.
      carry: the hidden state.
      xs: pytree of arrays with a leading ``(num_layers,)`` axis.
      scan: scan (True) or unroll (False).
      remat: the model's ``remat`` attribute (False: no rematerialisation).
    """
    if remat:  # CSE could undo the recomputation only between unrolled layers, not inside a scan
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, xs)
    num_layers = jax.tree.leaves(xs)[0].shape[0]
    ys = []
    for i in range(num_layers):
        carry, y = body(carry, jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, keepdims=False), xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _large_negative() -> Array:
    # What jax.nn.dot_product_attention puts at masked logits (finite, so softmax stays NaN-free).
    return jnp.asarray(-0.7 * np.finfo(np.float32).max, jnp.float32)


def attend_cache_and_new(q: Array, cache: tuple[Array, Array], cache_mask: Array, new: tuple[Array, Array],
                         new_mask: Array, *, scale: float, cache_bias: Optional[Array] = None,
                         new_bias: Optional[Array] = None) -> Array:
    """Softmax attention of new queries over a KV cache and over the new keys/values together, without
    first writing the new keys into the cache (the caller writes every layer's at once, after the
    layers). The logits of both parts share one softmax: the same arithmetic as
    ``jax.nn.dot_product_attention`` (XLA path) over the concatenated keys, without copying a
    layer's cache to concatenate it.

    Args:
      q: ``(B, S, H, hd)`` queries (``H`` a multiple of the key/value heads ``KV``).
      cache: keys and values ``(B, T, KV, hd)`` of the cache.
      cache_mask: boolean, broadcastable to ``(B, 1, S, T)`` (True: attend).
      new: keys and values ``(B, S, KV, hd)`` of the new tokens.
      new_mask: boolean, broadcastable to ``(B, 1, S, S)``.
      scale: logit scale.
      cache_bias, new_bias: additive logit biases broadcastable to ``(B, H, S, T)`` / ``(B, H, S, S)``
        (T5's relative positions), or None.

    Returns:
      ``(B, S, H, hd)`` in ``q.dtype``.
    """
    batch, seq, heads, head_dim = q.shape
    groups = heads // cache[0].shape[2]
    grouped = q.reshape(batch, seq, -1, groups, head_dim)

    def logits(keys, mask, bias):
        out = jnp.einsum("bskgh,btkh->bkgst", grouped, keys, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            bias = jnp.broadcast_to(bias, (bias.shape[0], heads, *bias.shape[2:]))
            out = out + bias.reshape(bias.shape[0], -1, groups, *bias.shape[2:]).astype(jnp.float32)
        return jnp.where(mask[:, :, None], out, _large_negative())

    both = jnp.concatenate([logits(cache[0], cache_mask, cache_bias), logits(new[0], new_mask, new_bias)], axis=-1)
    probs = jax.nn.softmax(both, axis=-1).astype(cache[1].dtype)
    size = cache[0].shape[1]
    out = (jnp.einsum("bkgst,btkh->bskgh", probs[..., :size], cache[1])
           + jnp.einsum("bkgst,btkh->bskgh", probs[..., size:], new[1]))
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
