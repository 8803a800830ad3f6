"""GPU check: the models' cuDNN flash-attention path (``attention="cudnn"``) computes what the default
boolean-mask attention computes at every real token, in bfloat16, with padding, and its gradient too.

Prints one JSON line: relative errors ``|out - ref| / |ref|`` (Frobenius, over real positions) for a
Llama (GQA, left- and right-padded rows) and a T5 (right padding, relative-position bias). bf16
operands put the expected error between 1e-3 and 1e-2.

  python bench/check_attention_gpu.py
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _rel(out, ref, real):
    out, ref = np.asarray(out, np.float32)[real], np.asarray(ref, np.float32)[real]
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _padded(rng, batch, seq, left):
    lengths = rng.integers(seq // 4, seq + 1, batch)
    lengths[0] = seq
    mask = np.arange(seq)[None] < lengths[:, None]
    return (mask[:, ::-1] if left else mask).astype(np.int32)


def check_llama(rng) -> dict:
    from jaxcl.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.05)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))

    @functools.partial(jax.jit, static_argnames="attention")
    def forward_and_grad(state, ids, mask, targets, attention):
        def loss(state):  # next-token cross-entropy over the real tokens
            model = nnx.merge(graphdef, state)
            model.attention = attention
            h = model.hidden(ids, mask)
            logp = jax.nn.log_softmax(model.logits(h), axis=-1)
            nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return jnp.sum(nll * mask) / jnp.sum(mask), h.astype(jnp.float32)
        (_, h), g = jax.value_and_grad(loss, has_aux=True)(state)
        return h, g["layers"]["q"][...]

    out = {}
    for left in (False, True):
        ids, targets = (rng.integers(0, 512, (4, 256)).astype(np.int32) for _ in range(2))
        mask = _padded(rng, 4, 256, left)
        h_ref, g_ref = forward_and_grad(state, ids, mask, targets, None)
        h, g = forward_and_grad(state, ids, mask, targets, "cudnn")
        side = "left" if left else "right"
        out[f"llama_{side}_hidden"] = _rel(h, h_ref, mask.astype(bool))
        out[f"llama_{side}_grad_q"] = _rel(g, g_ref, np.ones(g.shape, bool))
    return out


def check_t5(rng) -> dict:
    from jaxcl.models.t5 import T5, T5Config

    config = T5Config(vocab_size=512, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="relu")
    graphdef, state = nnx.split(T5(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))

    @functools.partial(jax.jit, static_argnames="attention")
    def forward(state, ids, mask, dec, dec_mask, attention):
        model = nnx.merge(graphdef, state)
        model.attention = attention
        return model(ids, mask, dec, dec_mask)

    ids, dec = rng.integers(2, 512, (4, 128)).astype(np.int32), rng.integers(2, 512, (4, 24)).astype(np.int32)
    mask, dec_mask = _padded(rng, 4, 128, False), _padded(rng, 4, 24, False)
    ref = forward(state, ids, mask, dec, dec_mask, None)
    got = forward(state, ids, mask, dec, dec_mask, "cudnn")
    return {"t5_logits": _rel(got, ref, dec_mask.astype(bool))}


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    print(json.dumps({"device": jax.devices()[0].device_kind, **check_llama(rng), **check_t5(rng)}))
