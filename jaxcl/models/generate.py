"""Batched greedy text generation: tokenise, pad to a length bucket, run the jitted decoder, detokenise.

Prompts are padded on the left for decoder-only models (the continuation then starts at the same
slot for every example) and on the right for encoder-decoder models. Prompt lengths are rounded up
to a multiple of ``LENGTH_BUCKET`` and the last batch is filled up to ``batch_size`` by repeating
its last prompt, so a call compiles once per (model structure, batch size, bucket, max_new_tokens,
adapter hook) and is reused afterwards.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxcl.data.batching import pad_rows
from jaxcl.models import sites

LENGTH_BUCKET = 16


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 50, *,
             adapter: Optional[sites.Adapter] = None, batch_size: Optional[int] = None) -> list[str]:
    """Greedy continuations of ``prompts`` (each stops at its first end-of-sequence token).

    Args:
      model: a jaxcl model with ``generate_ids`` (``Llama`` or ``T5``).
      tokenizer: its transformers tokenizer; prompts are encoded with its default special tokens
        (apply a chat template to the prompts first if the model expects one).
      prompts: the texts.
      max_new_tokens: tokens generated per prompt (at most).
      adapter: a method's adapter; its ``ctx`` leaves have a leading axis of ``len(prompts)``.
      batch_size: prompts per decoding call (all at once by default).

    Returns:
      One decoded continuation per prompt, special tokens removed.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    encoded = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens")
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    batch = batch_size or len(prompts)
    length = -(-max(len(ids) for ids in encoded) // LENGTH_BUCKET) * LENGTH_BUCKET
    graphdef, state = nnx.split(model)
    hook = adapter.hook if adapter is not None else None
    site_params = adapter.params if adapter is not None else None

    texts = []
    for lo in range(0, len(prompts), batch):
        rows = encoded[lo:lo + batch]
        rows = rows + [rows[-1]] * (batch - len(rows))
        ids, mask = pad_rows(rows, length, pad_id, left=not model.is_encoder_decoder)
        ctx = None if adapter is None else _batch_slice(adapter.ctx, lo, batch, len(prompts))
        out = _generate_ids(graphdef, state, ids, mask, site_params, ctx, hook=hook,
                            max_new_tokens=max_new_tokens, eos_token_id=eos if len(eos) > 1 else eos[0])
        for tokens in np.asarray(out)[:min(batch, len(prompts) - lo)]:
            stops = np.flatnonzero(np.isin(tokens, eos))
            texts.append(tokenizer.decode(tokens[:stops[0] if stops.size else None],
                                          skip_special_tokens=True))
    return texts


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's, then any others the model config lists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(model.config, "eos_token_id", None)
    for i in np.atleast_1d(configured if configured is not None else []).tolist():
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model config defines an eos token id")
    return tuple(ids)


def _batch_slice(ctx: Any, lo: int, batch: int, total: int) -> Any:
    """Rows ``lo .. lo+batch`` of every ``ctx`` leaf, the last row repeated past ``total``."""
    rows = np.minimum(np.arange(lo, lo + batch), total - 1)
    return jax.tree.map(lambda leaf: leaf[rows], ctx)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook", "max_new_tokens", "eos_token_id"))
def _generate_ids(graphdef, state, input_ids, attention_mask, site_params, ctx, *, hook,
                  max_new_tokens, eos_token_id):
    model = nnx.merge(graphdef, state)
    adapter = None if hook is None else sites.Adapter(hook, site_params, ctx)
    return model.generate_ids(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, adapter=adapter)
