"""Llama (decoder-only transformer) in Flax NNX, computing what transformers' ``LlamaForCausalLM`` computes.

Covers grouped-query attention, tied or untied embeddings, ``rope_theta``, the ``"llama3"`` RoPE
scaling, a ``head_dim`` that differs from ``hidden_size // num_attention_heads`` and the RMSNorm eps.

Layout choices:
  * The decoder layers' weights are stacked over layers (leading ``num_layers`` axis, see
    ``LlamaLayers``) and the forward is one ``jax.lax.scan``, so compile time does not grow with depth.
  * Linear weights are stored ``(d_in, d_out)`` and every attention/MLP projection goes through
    ``sites.linear`` under the names ``attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down``.
  * Positions come from the attention mask (``max(cumsum(mask) - 1, 0)``), so left-padded batches
    get the same positions as unpadded sequences. Every query may always attend to its own slot, so
    the rows of padding queries (fully masked otherwise) stay finite.
  * Activations are computed in the weight dtype; RMSNorm statistics, RoPE angles and the attention
    softmax are float32 (as in transformers; attention logits are accumulated in float32 too);
    returned logits are float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.models import sites

Array = jax.Array

# Adapter site of each projection weight.
_SITE_OF = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
            "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The ``"llama3"`` RoPE scaling of Llama 3.1+ (frequency-dependent interpolation)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (hashable: it is static under ``jit``).

    ``eos_token_id`` is a tuple because HF configs may list several end-of-sequence ids.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Map a transformers ``config.json`` dict (v4 or v5 layout) to a ``LlamaConfig``.

        Raises:
          ValueError: naming the field, for a missing required field or a value this model does not
            implement (another model_type, biases, an activation other than silu, a RoPE type other
            than default/llama3, partial rotary embeddings).
        """
        def required(name):
            if hf.get(name) is None:
                raise ValueError(f"Llama config: required field {name!r} is missing")
            return hf[name]

        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"Llama config: model_type {hf['model_type']!r} is not 'llama'")
        expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
        for name, value in expected.items():
            if hf.get(name, value) != value:
                raise ValueError(f"Llama config: {name}={hf[name]!r} is not supported (only {value!r})")
        heads = int(required("num_attention_heads"))
        hidden = int(required("hidden_size"))
        rope_theta, rope_scaling = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=int(required("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Optional[Llama3RopeScaling]]:
    # transformers v5 writes `rope_parameters` (theta inside); v4 writes `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"Llama config: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"Llama config: rope_scaling type {rope_type!r} is not supported "
                         "(supported: none, 'default', 'llama3')")
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 2048))))
    except KeyError as missing:
        raise ValueError(f"Llama config: llama3 rope_scaling needs field {missing}") from None
    return theta, scaling


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` float32, as transformers computes them.

    With ``"llama3"`` scaling, wavelengths longer than ``original / low_freq_factor`` are divided by
    ``factor``, those shorter than ``original / high_freq_factor`` are kept, and the band in between
    interpolates smoothly between the two.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class KVCache(NamedTuple):
    """Keys/values of every layer for ``max_len`` slots per example.

    Attributes:
      k, v: ``(num_layers, batch, max_len, num_key_value_heads, head_dim)``.
      valid: ``(batch, max_len)`` bool, which slots hold a real (non-padding) token.
    """

    k: Array
    v: Array
    valid: Array


def positions_from_mask(mask: Array) -> Array:
    """``(B, S)`` token positions that ignore left padding: ``max(cumsum(mask) - 1, 0)``."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm with float32 statistics; the result is cast back to ``x.dtype`` before the scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _rope_tables(inv_freq: np.ndarray, positions: Array, dtype) -> tuple[Array, Array]:
    """cos/sin ``(B, S, head_dim)`` for ``positions`` ``(B, S)``, computed in float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` ``(B, S, heads, head_dim)`` by the half-split RoPE convention of HF Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _attention_mask(query_slots: Array, key_valid: Array) -> Array:
    """Boolean ``(B, 1, S, T)`` mask: causal over slots AND key not padding, OR the query's own slot.

    Args:
      query_slots: ``(S,)`` slot index (in the key axis) of each query.
      key_valid: ``(B, T)`` which key slots hold real tokens.
    """
    slots = jnp.arange(key_valid.shape[-1])
    causal = slots[None, :] <= query_slots[:, None]
    own = slots[None, :] == query_slots[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]


class LlamaLayers(nnx.Module):
    """All decoder layers' weights, each stacked with a leading ``(num_layers,)`` axis.

    ``attn_norm``/``mlp_norm``: ``(L, d)``; ``q``: ``(L, d, H*hd)``; ``k``, ``v``: ``(L, d, KV*hd)``;
    ``o``: ``(L, H*hd, d)``; ``gate``, ``up``: ``(L, d, d_ff)``; ``down``: ``(L, d_ff, d)``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        shapes = layer_weight_shapes(config)
        self.names = tuple(shapes)
        init = nnx.initializers.normal(config.initializer_range)
        for name, shape in shapes.items():
            value = jnp.ones(shape, dtype) if name.endswith("norm") else init(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value))

    def stacked(self) -> dict[str, Array]:
        """``{weight name: stacked array}``, the ``xs`` of the layer scan."""
        return {name: getattr(self, name)[...] for name in self.names}


def layer_weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked layer weights (see ``LlamaLayers``)."""
    L, d, f = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    return {"attn_norm": (L, d), "q": (L, d, q_dim), "k": (L, d, kv_dim), "v": (L, d, kv_dim),
            "o": (L, q_dim, d), "mlp_norm": (L, d), "gate": (L, d, f), "up": (L, d, f),
            "down": (L, f, d)}


class Llama(nnx.Module):
    """Llama causal LM.

    Args:
      config: the architecture.
      rngs: randomness for the random init (normal with std ``config.initializer_range``).
      dtype: weight and activation dtype (float32 or bfloat16).
      remat: recompute each layer in the backward pass (``jax.checkpoint`` of the scanned body):
        True saves nothing; the name of a ``jax.checkpoint_policies`` policy (e.g.
        ``"dots_with_no_batch_dims_saveable"``) saves what it allows. A plain attribute, so
        ``model.remat = True`` also works after loading.
      attention: None (default) computes attention with an explicit boolean mask (any padding).
        ``"cudnn"`` (GPU, bfloat16: cuDNN flash attention) or ``"xla"`` instead run the uncached
        forward (``hidden``/``__call__``) as causal attention over each row's length, with the rows
        rotated so that their tokens come first: this needs each row's tokens to be one contiguous
        run (left or right padding, as jaxcl's batches are). Outputs at padding positions then
        differ (nothing reads them). Decoding with a KV cache always uses the mask. Also a plain
        attribute.
    """

    is_encoder_decoder = False

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: Union[bool, str] = False,
                 attention: Optional[str] = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attention = attention
        init = nnx.initializers.normal(config.initializer_range)
        d, vocab = config.hidden_size, config.vocab_size
        self.embed = nnx.Param(init(rngs.params(), (vocab, d), dtype))
        self.layers = LlamaLayers(config, rngs=rngs, dtype=dtype)
        self.norm = nnx.Param(jnp.ones((d,), dtype))
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(init(rngs.params(), (d, vocab), dtype))

    # ----------------------------------------------------------------- public interface

    def site_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{site name: (num_layers, d_in, d_out)}`` for every adaptable projection."""
        shapes = layer_weight_shapes(self.config)
        return {site: shapes[w] for w, site in _SITE_OF.items()}

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 adapter: Optional[sites.Adapter] = None) -> Array:
        """Logits ``(B, S, vocab)`` float32 for ``input_ids`` ``(B, S)`` (mask: 1 = token, 0 = pad)."""
        return self.logits(self.hidden(input_ids, attention_mask, adapter=adapter))

    def hidden(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               adapter: Optional[sites.Adapter] = None, num_layers: Optional[int] = None,
               final_norm: bool = True) -> Array:
        """Hidden states ``(B, S, d)`` after the first ``num_layers`` layers (all by default)."""
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        seq = jnp.arange(input_ids.shape[1])
        if self.attention is None:
            attend = functools.partial(jax.nn.dot_product_attention, mask=_attention_mask(seq, mask))
        else:  # rotate each row's tokens to the front: causal attention over lengths
            first = jnp.argmax(mask, axis=-1)[:, None]
            order = (seq + first) % seq.shape[0]
            input_ids, mask = jnp.take_along_axis(input_ids, order, 1), jnp.take_along_axis(mask, order, 1)
            lengths = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)
            attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, key_value_seq_lengths=lengths,
                                       implementation=self.attention)
        cos, sin = _rope_tables(rope_inv_freq(self.config), positions_from_mask(mask), self.dtype)
        x = jnp.take(self.embed[...], input_ids, axis=0)
        x, _ = self._layers(x, cos, sin, attend, adapter, num_layers, cache=None, start=0)
        if self.attention is not None:
            x = jnp.take_along_axis(x, ((seq - first) % seq.shape[0])[..., None], axis=1)
        return self.final_norm(x) if final_norm else x

    def final_norm(self, h: Array) -> Array:
        return rms_norm(h, self.norm[...], self.config.rms_norm_eps)

    def logits(self, h: Array) -> Array:
        """LM head: ``(..., d)`` final-normed hidden states -> ``(..., vocab)`` float32."""
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", h, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                       jnp.zeros((batch, max_len), bool))

    def extend(self, input_ids: Array, token_mask: Array, positions: Array, cache: KVCache, start,
               *, adapter: Optional[sites.Adapter] = None) -> tuple[Array, KVCache]:
        """Run ``S`` new tokens through the model, writing their keys/values at cache slots
        ``start .. start+S-1``; each attends to the valid cache slots up to its own.

        Args:
          input_ids, token_mask, positions: ``(B, S)``.
          cache: the cache so far.
          start: first slot to write (int or traced int32 scalar).

        Returns:
          Float32 logits ``(B, vocab)`` of the LAST new token, and the updated cache.
        """
        start = jnp.asarray(start, jnp.int32)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask.astype(bool), (jnp.int32(0), start))
        cache = cache._replace(valid=valid)
        cos, sin = _rope_tables(rope_inv_freq(self.config), positions, self.dtype)
        attn_mask = _attention_mask(start + jnp.arange(input_ids.shape[1]), valid)
        x = jnp.take(self.embed[...], input_ids, axis=0)
        attend = functools.partial(jax.nn.dot_product_attention, mask=attn_mask)
        x, cache = self._layers(x, cos, sin, attend, adapter, None, cache=cache, start=start)
        return self.logits(self.final_norm(x[:, -1])), cache

    def generate_ids(self, input_ids: Array, attention_mask: Array, *, max_new_tokens: int,
                     eos_token_id: Union[int, Sequence[int]],
                     adapter: Optional[sites.Adapter] = None) -> Array:
        """Greedy decoding with a KV cache (jittable; ``max_new_tokens`` static).

        The LEFT-padded prompt ``(B, P)`` is prefilled in one pass, then one token per step in a
        ``while_loop`` that stops once every example has produced an end-of-sequence id.

        Args:
          input_ids, attention_mask: ``(B, P)`` left-padded prompt and its mask.
          max_new_tokens: number of tokens to generate.
          eos_token_id: one id or several; generation of an example stops at the first of them.
          adapter: applied to the prompt and to every generated token.

        Returns:
          ``(B, max_new_tokens)`` int32; positions after an example's first eos hold ``eos_token_id``
          (the first one if several).
        """
        eos = jnp.asarray(np.atleast_1d(np.asarray(eos_token_id, np.int32)))
        batch, prompt_len = input_ids.shape
        mask = attention_mask.astype(bool)
        cache = self.init_cache(batch, prompt_len + max_new_tokens - 1)
        logits, cache = self.extend(input_ids, mask, positions_from_mask(mask), cache, 0, adapter=adapter)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out = jnp.full((batch, max_new_tokens), eos[0], jnp.int32).at[:, 0].set(first)
        next_position = jnp.sum(mask, axis=-1, dtype=jnp.int32)

        def step(state):
            i, out, done, cache = state
            previous = out[:, i - 1][:, None]
            positions = (next_position + i - 1)[:, None]
            logits, cache = self.extend(previous, jnp.ones_like(previous, bool), positions, cache,
                                        prompt_len + i - 1, adapter=adapter)
            token = jnp.where(done, eos[0], jnp.argmax(logits, axis=-1).astype(jnp.int32))
            out = out.at[:, i].set(token)
            return i + 1, out, done | jnp.isin(token, eos), cache

        def unfinished(state):
            i, _, done, _ = state
            return (i < max_new_tokens) & ~jnp.all(done)

        _, out, _, _ = jax.lax.while_loop(unfinished, step, (jnp.int32(1), out, jnp.isin(first, eos), cache))
        return out

    # ----------------------------------------------------------------- the layer stack

    def _layers(self, x: Array, cos: Array, sin: Array, attend: Callable[[Array, Array, Array], Array],
                adapter: Optional[sites.Adapter], num_layers: Optional[int], *,
                cache: Optional[KVCache], start) -> tuple[Array, Optional[KVCache]]:
        """Scan the (first ``num_layers``) decoder layers over ``x`` ``(B, S, d)``;
        ``attend(q, k, v)`` is the attention (with its mask or lengths bound)."""
        c = self.config
        weights = self.layers.stacked()
        site_params = sites.layer_params(adapter)
        if num_layers is not None:
            weights, site_params = jax.tree.map(lambda a: a[:num_layers], (weights, site_params))
        batch, seq, _ = x.shape

        def body(carry, xs):
            x, cache = carry
            w, sp, layer = xs
            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q = sites.linear(adapter, "attn.q", sp, h, w["q"]).reshape(batch, seq, -1, c.head_dim)
            k = sites.linear(adapter, "attn.k", sp, h, w["k"]).reshape(batch, seq, -1, c.head_dim)
            v = sites.linear(adapter, "attn.v", sp, h, w["v"]).reshape(batch, seq, -1, c.head_dim)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if cache is not None:
                at = (layer, jnp.int32(0), start, jnp.int32(0), jnp.int32(0))
                cache = cache._replace(k=jax.lax.dynamic_update_slice(cache.k, k[None], at),
                                       v=jax.lax.dynamic_update_slice(cache.v, v[None], at))
                k, v = cache.k[layer], cache.v[layer]
            o = attend(q, k, v)
            x = x + sites.linear(adapter, "attn.o", sp, o.reshape(batch, seq, -1), w["o"])
            h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            gated = jax.nn.silu(sites.linear(adapter, "mlp.gate", sp, h, w["gate"]))
            up = sites.linear(adapter, "mlp.up", sp, h, w["up"])
            x = x + sites.linear(adapter, "mlp.down", sp, gated * up, w["down"])
            return (x, cache), None

        if self.remat:
            policy = (jax.checkpoint_policies.nothing_saveable if self.remat is True
                      else getattr(jax.checkpoint_policies, self.remat))
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        layer_ids = jnp.arange(weights["q"].shape[0], dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (weights, site_params, layer_ids))
        return x, cache


TensorGetter = Callable[[str, tuple[int, ...]], np.ndarray]


def from_hf_tensors(config: LlamaConfig, get: TensorGetter, *, dtype=jnp.float32) -> Llama:
    """Build a ``Llama`` from HF-named tensors (``LlamaForCausalLM`` state-dict names and layout).

    Args:
      config: the architecture.
      get: ``get(hf_name, expected_shape) -> np.ndarray``; raises for a missing or misshapen tensor.
      dtype: weight dtype of the result.

    Every parameter is assigned from ``get``: the model is created abstractly (no random init).
    """
    np_dtype = jnp.dtype(dtype)
    d, q_dim = config.hidden_size, config.num_attention_heads * config.head_dim
    kv_dim, f = config.num_key_value_heads * config.head_dim, config.intermediate_size
    # stacked name -> (HF name inside layer i, HF shape); projections are stored transposed in HF.
    per_layer = {
        "attn_norm": ("input_layernorm.weight", (d,)),
        "q": ("self_attn.q_proj.weight", (q_dim, d)),
        "k": ("self_attn.k_proj.weight", (kv_dim, d)),
        "v": ("self_attn.v_proj.weight", (kv_dim, d)),
        "o": ("self_attn.o_proj.weight", (d, q_dim)),
        "mlp_norm": ("post_attention_layernorm.weight", (d,)),
        "gate": ("mlp.gate_proj.weight", (f, d)),
        "up": ("mlp.up_proj.weight", (f, d)),
        "down": ("mlp.down_proj.weight", (d, f)),
    }

    def load(name, shape, transpose=False):
        array = np.asarray(get(name, shape))
        return jnp.asarray((array.T if transpose else array).astype(np_dtype))

    weights = {
        "embed": load("model.embed_tokens.weight", (config.vocab_size, d)),
        "norm": load("model.norm.weight", (d,)),
        "layers": {stacked: jnp.stack([load(f"model.layers.{i}.{hf_name}", shape, transpose=len(shape) == 2)
                                       for i in range(config.num_hidden_layers)])
                   for stacked, (hf_name, shape) in per_layer.items()},
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = load("lm_head.weight", (config.vocab_size, d), transpose=True)
    # Built abstractly (no random init), then every parameter is replaced by a loaded array.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype)))
    nnx.replace_by_pure_dict(state, weights)
    unset = [path for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if not isinstance(leaf, jax.Array)]
    if unset:  # a parameter added to Llama without a loading rule above
        raise AssertionError(f"from_hf_tensors left parameters unset: {unset}")
    return nnx.merge(graphdef, state)
