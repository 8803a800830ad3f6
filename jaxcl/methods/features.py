"""Pooled features of prompts from the backbone, shared by the methods that read them (MIST's
mutual-information views, SMAT's task embedding).

Every function runs the model with the prompt tokens alone visible to attention (answer and padding
tokens hidden), so training rows (prompt + answer) and evaluation prompts give the same features.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcl.models.sites import Adapter


def masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """``(B, d)`` float32 mean of ``h`` ``(B, S, d)`` over the tokens of ``mask`` ``(B, S)`` bool."""
    h = h.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(jnp.float32)


def prompt_mask(batch: dict, encoder_decoder: bool) -> jax.Array:
    """``(B, S)`` bool: the prompt tokens of a training batch (T5: the whole source)."""
    mask = batch["attention_mask"] > 0
    return mask if encoder_decoder else mask & ~(batch["loss_mask"] > 0)


def prompt_mean(model, input_ids: jax.Array, mask: jax.Array, adapter: Optional[Adapter] = None) -> jax.Array:
    """``(B, d)`` float32 mean of the final hidden states (T5: encoder outputs) over the tokens of
    ``mask`` ``(B, S)`` bool; the other tokens are hidden from attention too."""
    attention = mask.astype(jnp.int32)
    if model.is_encoder_decoder:
        states = model.encode(input_ids, attention, adapter=adapter)
    else:
        states = model.hidden(input_ids, attention, adapter=adapter)
    return masked_mean(states, mask)


def pooled_features(model, input_ids: jax.Array, mask: jax.Array, adapter: Optional[Adapter] = None) -> jax.Array:
    """``(B, F)`` features of the prompt tokens of ``mask`` ``(B, S)`` bool.

    Decoder-only: ``prompt_mean`` (F = d). T5: the mean over the encoder output, concatenated with the
    decoder's hidden state at its start token (F = 2d), so that decoder weights influence it too.
    """
    if not model.is_encoder_decoder:
        return prompt_mean(model, input_ids, mask, adapter)
    attention = mask.astype(jnp.int32)
    encoded = model.encode(input_ids, attention, adapter=adapter)
    start = jnp.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, jnp.int32)
    first = model.decode_hidden(start, encoded, attention, adapter=adapter)[:, 0].astype(jnp.float32)
    return jnp.concatenate([masked_mean(encoded, mask), first], axis=-1)
