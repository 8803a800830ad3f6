"""T5 encoder-decoder in Flax NNX, computing what transformers' ``T5ForConditionalGeneration`` does.

Two families share this code:
  * T5 v1.0: ReLU feed-forward (``wi``, ``wo``), lm_head tied to the embedding, and the decoder
    output scaled by ``d_model ** -0.5`` before the lm_head.
  * T5 v1.1 / Flan-T5: gated-GELU feed-forward (``wi_0``, ``wi_1``, ``wo``; tanh-approximate GELU),
    untied lm_head, no rescale.

What makes T5 different from a decoder-only transformer:
  * Attention has no ``1/sqrt(d)`` scaling; position information enters only as a learned bias on
    the attention logits, looked up from a small table by a log-bucketed relative distance
    (``relative_position_bucket``). Only the first layer of each stack owns that table and every
    layer reuses its bias, so the bias is computed once per forward here.
  * "LayerNorm" is an RMS norm without mean subtraction or bias, accumulated in float32.
  * Positions are plain ``arange`` (not derived from the mask): pad the encoder input on the right.

Each stack's layers are stacked on a leading ``(num_layers,)`` axis and run with ``jax.lax.scan``,
so compile time does not grow with depth. Every linear in attention and feed-forward is an adapter
site (``sites.linear``): ``{encoder,decoder}.self_attn.{q,k,v,o}``, ``decoder.cross_attn.{q,k,v,o}``
and ``{encoder,decoder}.mlp.{wi | wi_0,wi_1 ; wo}``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.models import sites

Array = jax.Array
# (HF tensor name, expected shape) -> array; from the checkpoint loader (raises on a bad tensor).
TensorGetter = Callable[[str, tuple], np.ndarray]

_FEED_FORWARD_PROJ = ("relu", "gated-gelu")


class T5ConfigError(ValueError):
    """A T5 config.json field is missing or has a value this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model (the fields of an HF T5 ``config.json`` that change the math).

    Attributes:
      tie_word_embeddings: the lm_head is the transposed shared embedding (no separate ``lm_head``).
      scale_decoder_outputs: multiply the decoder output by ``d_model ** -0.5`` before the lm_head
        (T5 v1.0). Transformers decouples this from tying; ``from_hf`` derives it the same way.
      initializer_factor: scales the random-init standard deviations (HF's ``initializer_factor``).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    decoder_start_token_id: int = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int = 0
    initializer_factor: float = 1.0

    def __post_init__(self):
        if self.feed_forward_proj not in _FEED_FORWARD_PROJ:
            raise T5ConfigError(f"T5 config field 'feed_forward_proj': expected one of "
                                f"{_FEED_FORWARD_PROJ}, got {self.feed_forward_proj!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise T5ConfigError(f"T5 config field {name!r}: expected a positive integer, "
                                    f"got {value!r}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "T5Config":
        """Map an HF T5 ``config.json`` dict; defaults are transformers' T5 defaults.

        Raises:
          T5ConfigError: naming the field, for a missing size field or an unsupported value.
        """
        model_type = hf.get("model_type", "t5")
        if model_type != "t5":
            raise T5ConfigError(f"T5 config field 'model_type': expected 't5', got {model_type!r}")
        missing = [f for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
                   if hf.get(f) is None]
        if missing:
            raise T5ConfigError(f"T5 config is missing the field(s) {missing}")
        # Transformers v5 always ties in its own config and records the v1.0 rescale separately as
        # `scale_decoder_outputs`; older configs say "untied and unscaled" with
        # tie_word_embeddings=false.
        tie = hf.get("tie_word_embeddings", True)
        scale = hf.get("scale_decoder_outputs", tie is not False)
        pad = hf.get("pad_token_id", 0)
        if pad is None:
            raise T5ConfigError("T5 config field 'pad_token_id': expected an integer, got None")
        start = hf.get("decoder_start_token_id")
        eos = hf.get("eos_token_id", 1)
        if isinstance(eos, (list, tuple)):
            eos = tuple(eos)
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
            num_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=hf.get("feed_forward_proj", "relu"),
            tie_word_embeddings=bool(tie), scale_decoder_outputs=bool(scale),
            # T5 starts decoding from the pad token when the config does not say otherwise.
            decoder_start_token_id=pad if start is None else start,
            eos_token_id=eos, pad_token_id=pad,
            initializer_factor=hf.get("initializer_factor", 1.0),
        )


# ----------------------------------------------------------------------------------------------
# Pure building blocks


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucket of each relative position ``key_pos - query_pos``.

    Half of the buckets (per direction) hold exact small distances; the rest are log-spaced up to
    ``max_distance``, beyond which all distances share the last bucket. A causal (decoder) stack has
    no buckets for keys in the future: they fall into bucket 0 and are masked anyway.

    Args:
      relative_position: int array of any shape.
      bidirectional: encoder (True) or causal decoder (False).
      num_buckets, max_distance: the config's ``relative_attention_*`` fields.

    Returns:
      int32 array of the same shape with values in ``[0, num_buckets)``.
    """
    relative_position = relative_position.astype(jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # Same float32 operation order as the reference so bucket edges land identically; the maximum
    # only keeps log(0) out of the branch that `where` discards.
    log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                 / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    far = jnp.minimum(max_exact + log_ratio.astype(jnp.int32), num_buckets - 1)
    return offset + jnp.where(distance < max_exact, distance, far)


def _position_bias(table: Array, query_positions: Array, key_positions: Array, *,
                   bidirectional: bool, max_distance: int) -> Array:
    """``(num_buckets, heads)`` table -> attention-logit bias ``(1, heads, T, S)`` (>= float32)."""
    buckets = relative_position_bucket(key_positions[None, :] - query_positions[:, None],
                                       bidirectional=bidirectional, num_buckets=table.shape[0],
                                       max_distance=max_distance)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]
    return bias.astype(jnp.promote_types(bias.dtype, jnp.float32))


def _rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """T5 LayerNorm: divide by the root mean square (in >= float32); no mean subtraction or bias."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = wide * jax.lax.rsqrt(jnp.mean(jnp.square(wide), axis=-1, keepdims=True) + eps)
    return weight * normed.astype(weight.dtype)


def _key_mask(attention_mask: Optional[Array]) -> Optional[Array]:
    """``(B, S)`` 0/1 padding mask -> boolean ``(B, 1, 1, S)`` over keys, or None (no padding)."""
    return None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]


def _heads(x: Array, num_heads: int) -> Array:
    return x.reshape(*x.shape[:-1], num_heads, -1)


class _Lengths(NamedTuple):
    """Keys given by their count per row (right padding), optionally causal, for
    ``jax.nn.dot_product_attention(implementation=...)`` (``"cudnn"``: cuDNN flash attention)."""

    lengths: Array  # (B,) int32
    causal: bool
    implementation: str


def _lengths(attention_mask: Optional[Array], batch: int, seq: int, causal: bool, implementation: str) -> _Lengths:
    count = (jnp.full((batch,), seq, jnp.int32) if attention_mask is None
             else jnp.maximum(jnp.sum(attention_mask, axis=-1, dtype=jnp.int32), 1))
    return _Lengths(count, causal, implementation)


def _attend(q: Array, k: Array, v: Array, bias: Optional[Array], mask: Union[None, Array, _Lengths]) -> Array:
    """``q (B,T,N,H)``, ``k``/``v`` ``(B,S,N,H)`` -> ``(B,T,N*H)``; unscaled logits, as in T5."""
    if isinstance(mask, _Lengths):
        if bias is not None and mask.implementation == "cudnn":
            bias = bias.astype(q.dtype)  # cuDNN takes the bias in the activation dtype
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, is_causal=mask.causal,
                                           key_value_seq_lengths=mask.lengths, implementation=mask.implementation)
    else:
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0)
    return out.reshape(*out.shape[:2], -1)


# A layer's projections: lin(site suffix such as "self_attn.q", x) -> x @ W (+ the adapter's part).
Linear = Callable[[str, Array], Array]


def _site_linear(adapter: Optional[sites.Adapter], site_params: Mapping[str, Any],
                 weights: Mapping[str, Array], stack: str) -> Linear:
    def lin(suffix: str, x: Array) -> Array:
        return sites.linear(adapter, f"{stack}.{suffix}", site_params, x, weights[suffix])
    return lin


def _feed_forward(config: T5Config, lin: Linear, x: Array) -> Array:
    if config.is_gated:
        hidden = jax.nn.gelu(lin("mlp.wi_0", x), approximate=True) * lin("mlp.wi_1", x)
    else:
        hidden = jax.nn.relu(lin("mlp.wi", x))
    return lin("mlp.wo", hidden)


def _encoder_layer(config: T5Config, lin: Linear, w: Mapping[str, Array], h: Array, bias: Array,
                   mask: Optional[Array]) -> Array:
    eps, n = config.layer_norm_epsilon, config.num_heads
    x = _rms_norm(h, w["self_attn.norm"], eps)
    q, k, v = (_heads(lin(f"self_attn.{p}", x), n) for p in "qkv")
    h = h + lin("self_attn.o", _attend(q, k, v, bias, mask))
    return h + _feed_forward(config, lin, _rms_norm(h, w["mlp.norm"], eps))


def _cross_kv(config: T5Config, lin: Linear, encoder_out: Array) -> tuple[Array, Array]:
    """A decoder layer's cross-attention keys and values ``(B, S, N, H)`` from the encoder."""
    n = config.num_heads
    return _heads(lin("cross_attn.k", encoder_out), n), _heads(lin("cross_attn.v", encoder_out), n)


def _decoder_layer(config: T5Config, lin: Linear, w: Mapping[str, Array], h: Array,
                   cross_kv: tuple[Array, Array], self_bias: Array, self_mask: Array,
                   cross_mask: Optional[Array], cache: Optional[tuple[Array, Array]] = None,
                   index: Array | int = 0) -> tuple[Array, tuple[Array, Array]]:
    """One decoder layer on ``h (B, T, d)``.

    Without ``cache`` the T tokens attend to each other. With ``cache`` (this layer's keys/values,
    ``(B, L, N, H)`` each) the new keys/values are written at ``index`` and the queries attend over
    the whole cache (``self_mask`` hides the slots not yet written).

    Returns:
      The new ``h`` and this call's own ``(k, v)`` of shape ``(B, T, N, H)`` (to store in a cache).
    """
    eps, n = config.layer_norm_epsilon, config.num_heads
    x = _rms_norm(h, w["self_attn.norm"], eps)
    q, k, v = (_heads(lin(f"self_attn.{p}", x), n) for p in "qkv")
    keys, values = k, v
    if cache is not None:
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k, index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v, index, axis=1)
    h = h + lin("self_attn.o", _attend(q, keys, values, self_bias, self_mask))
    x = _rms_norm(h, w["cross_attn.norm"], eps)
    q = _heads(lin("cross_attn.q", x), n)
    # HF gives cross-attention an all-zero position bias, i.e. none.
    h = h + lin("cross_attn.o", _attend(q, *cross_kv, None, cross_mask))
    h = h + _feed_forward(config, lin, _rms_norm(h, w["mlp.norm"], eps))
    return h, (k, v)


def _scan_layers(body: Callable, h: Array, xs: Any, remat: Union[bool, str]):
    if remat:  # True saves nothing; a string names a jax.checkpoint_policies policy
        policy = (jax.checkpoint_policies.nothing_saveable if remat is True
                  else getattr(jax.checkpoint_policies, remat))
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, h, xs)


# ----------------------------------------------------------------------------------------------
# Weights: one nested {name: shape} table drives random init, HF loading and site_shapes.


def _weight_shapes(config: T5Config) -> dict:
    """Nested ``{name: shape}`` of every weight; layer weights carry a leading ``(num_layers,)``
    axis and are keyed by site suffix (``"self_attn.q"``; norms are ``"<group>.norm"``)."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff

    def attention(group: str) -> dict:
        return {f"{group}.norm": (d,), f"{group}.q": (d, inner), f"{group}.k": (d, inner),
                f"{group}.v": (d, inner), f"{group}.o": (inner, d)}

    wi = {"mlp.wi_0": (d, ff), "mlp.wi_1": (d, ff)} if config.is_gated else {"mlp.wi": (d, ff)}
    mlp = {"mlp.norm": (d,), **wi, "mlp.wo": (ff, d)}

    def stack(num_layers: int, cross: bool) -> dict:
        layer = {**attention("self_attn"), **(attention("cross_attn") if cross else {}), **mlp}
        table = (config.relative_attention_num_buckets, config.num_heads)
        return {"relative_attention_bias": table, "final_norm": (d,),
                "layers": {name: (num_layers, *shape) for name, shape in layer.items()}}

    shapes = {"shared": (config.vocab_size, d), "encoder": stack(config.num_layers, False),
              "decoder": stack(config.num_decoder_layers, True)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


def _map_shapes(make: Callable[[tuple[str, ...], tuple], Array], shapes: dict,
                path: tuple[str, ...] = ()) -> dict:
    """Build the nested weight dict: ``make(path, shape)`` for every leaf of ``shapes``."""
    return {k: _map_shapes(make, v, path + (k,)) if isinstance(v, dict) else make(path + (k,), v)
            for k, v in shapes.items()}


def _init_std(config: T5Config, name: str) -> Optional[float]:
    """HF's init scale for a weight (by its last name part); None for norms (initialised to one)."""
    d, inner, f = config.d_model, config.num_heads * config.d_kv, config.initializer_factor
    if name.endswith("norm"):
        return None
    leaf = name.rsplit(".", 1)[-1]
    return f * {"shared": 1.0, "lm_head": 1.0, "relative_attention_bias": d ** -0.5,
                "q": (d * config.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5,
                "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5,
                "wo": config.d_ff ** -0.5}[leaf]


def _random_weights(config: T5Config, rngs: nnx.Rngs, dtype) -> dict:
    def make(path, shape):
        std = _init_std(config, path[-1])
        if std is None:
            return jnp.ones(shape, dtype)
        return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return _map_shapes(make, _weight_shapes(config))


def _hf_layer_tensor(get: TensorGetter, stack: str, index: int, name: str,
                     shape: tuple) -> np.ndarray:
    """One layer's weight in our ``(d_in, d_out)`` layout from its torch-layout HF tensor."""
    group, leaf = name.split(".")
    sublayer, module = {"self_attn": (0, "SelfAttention"), "cross_attn": (1, "EncDecAttention"),
                        "mlp": (1 if stack == "encoder" else 2, "DenseReluDense")}[group]
    prefix = f"{stack}.block.{index}.layer.{sublayer}"
    if leaf == "norm":
        return np.asarray(get(f"{prefix}.layer_norm.weight", shape))
    return np.asarray(get(f"{prefix}.{module}.{leaf}.weight", shape[::-1])).T


def _hf_weights(config: T5Config, get: TensorGetter, dtype) -> dict:
    def make(path, shape):
        if path == ("shared",):
            array = np.asarray(get("shared.weight", shape))
        elif path == ("lm_head",):
            array = np.asarray(get("lm_head.weight", shape[::-1])).T
        elif path[1] == "relative_attention_bias":  # only block 0 of each stack owns the table
            array = get(f"{path[0]}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                        shape)
        elif path[1] == "final_norm":
            array = get(f"{path[0]}.final_layer_norm.weight", shape)
        else:
            stack, _, name = path
            array = np.stack([_hf_layer_tensor(get, stack, i, name, shape[1:])
                              for i in range(shape[0])])
        return jnp.asarray(np.asarray(array), dtype=dtype)
    return _map_shapes(make, _weight_shapes(config))


# ----------------------------------------------------------------------------------------------
# Modules


class _Layers(nnx.Module):
    """Every layer's weights of one stack, each an ``nnx.Param`` with a leading layer axis."""

    def __init__(self, weights: Mapping[str, Array]):
        self.names = tuple(weights)
        for name, value in weights.items():
            setattr(self, name.replace(".", "_"), nnx.Param(value))

    def arrays(self) -> dict[str, Array]:
        """``{site suffix or norm name: stacked array}``, the ``xs`` of the layer scan."""
        return {name: getattr(self, name.replace(".", "_"))[...] for name in self.names}


class _Stack(nnx.Module):
    """An encoder or decoder stack: relative-position table, stacked layers, final norm."""

    def __init__(self, weights: Mapping[str, Any]):
        self.relative_attention_bias = nnx.Param(weights["relative_attention_bias"])
        self.final_norm = nnx.Param(weights["final_norm"])
        self.layers = _Layers(weights["layers"])


class T5(nnx.Module):
    """T5 / Flan-T5 for conditional generation.

    Args:
      config: the architecture.
      rngs: random init (HF's scheme scaled by ``config.initializer_factor``); unused with
        ``weights``.
      dtype: float32 or bfloat16 for weights and activations (norms and softmax accumulate in
        float32; logits are float32).
      remat: rematerialise each scanned layer in the backward pass (saves activation memory):
        True saves nothing; the name of a ``jax.checkpoint_policies`` policy saves what it allows.
      attention: None (default): attention with explicit boolean masks. ``"cudnn"`` (GPU,
        bfloat16: cuDNN flash attention) or ``"xla"``: the teacher-forced forward (``encode``,
        ``decode_hidden``) attends over each row's length instead, which assumes right padding
        (T5's contract); outputs at padding positions differ (nothing reads them). Decoding with
        a cache always uses the masks. A plain attribute.
      weights: the nested weight dict built by ``from_hf_tensors`` instead of a random init.
    """

    is_encoder_decoder = True

    def __init__(self, config: T5Config, *, rngs: Optional[nnx.Rngs] = None, dtype=jnp.float32,
                 remat: Union[bool, str] = False, weights: Optional[Mapping[str, Any]] = None,
                 attention: Optional[str] = None):
        if weights is None:
            if rngs is None:
                raise ValueError("T5 needs `rngs` for a random init, or `weights`")
            weights = _random_weights(config, rngs, dtype)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.shared = nnx.Param(weights["shared"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(weights["lm_head"])
        self.encoder = _Stack(weights["encoder"])
        self.decoder = _Stack(weights["decoder"])

    # -- interface used by the engine -------------------------------------------------------

    def site_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{site name: (num_layers, d_in, d_out)}`` for every adaptable linear."""
        shapes = _weight_shapes(self.config)
        return {f"{stack}.{name}": shape for stack in ("encoder", "decoder")
                for name, shape in shapes[stack]["layers"].items() if not name.endswith(".norm")}

    def __call__(self, input_ids: Array, attention_mask: Optional[Array], decoder_input_ids: Array,
                 decoder_attention_mask: Optional[Array] = None, *,
                 adapter: Optional[sites.Adapter] = None) -> Array:
        """Teacher-forced logits.

        Args:
          input_ids: ``(B, S)`` encoder tokens, right padded.
          attention_mask: ``(B, S)`` 1 for real tokens, 0 for padding (None: no padding).
          decoder_input_ids: ``(B, T)`` decoder tokens (starting with ``decoder_start_token_id``).
          decoder_attention_mask: ``(B, T)`` 1/0 over decoder keys (None: all real).
          adapter: the method's sites, or None for the plain model.

        Returns:
          ``(B, T, vocab)`` float32 logits.
        """
        encoder_out = self.encode(input_ids, attention_mask, adapter=adapter)
        hidden = self.decode_hidden(decoder_input_ids, encoder_out, attention_mask,
                                    decoder_attention_mask, adapter=adapter)
        return self.logits(hidden)

    def encode(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               adapter: Optional[sites.Adapter] = None) -> Array:
        """``(B, S)`` tokens -> final-normed encoder output ``(B, S, d_model)``."""
        config = self.config
        positions = jnp.arange(input_ids.shape[1])
        bias = self._stack_bias(self.encoder, positions, positions, bidirectional=True)
        mask = (_key_mask(attention_mask) if self.attention is None
                else _lengths(attention_mask, *input_ids.shape, False, self.attention))

        def layer(h, xs):
            w, site_params = xs
            lin = _site_linear(adapter, site_params, w, "encoder")
            return _encoder_layer(config, lin, w, h, bias, mask), None

        xs = (self.encoder.layers.arrays(), sites.layer_params(adapter, "encoder."))
        h, _ = _scan_layers(layer, self._embed(input_ids), xs, self.remat)
        return _rms_norm(h, self.encoder.final_norm[...], config.layer_norm_epsilon)

    def decode_hidden(self, decoder_input_ids: Array, encoder_out: Array,
                      attention_mask: Optional[Array],
                      decoder_attention_mask: Optional[Array] = None, *,
                      adapter: Optional[sites.Adapter] = None) -> Array:
        """Teacher-forced decoder: ``(B, T)`` tokens -> final-normed hidden ``(B, T, d_model)``.

        ``attention_mask`` is the encoder's ``(B, S)`` padding mask (hides padded encoder outputs).
        """
        config = self.config
        t = decoder_input_ids.shape[1]
        positions = jnp.arange(t)
        bias = self._stack_bias(self.decoder, positions, positions, bidirectional=False)
        self_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if decoder_attention_mask is not None:
            self_mask = self_mask & _key_mask(decoder_attention_mask)
        cross_mask = _key_mask(attention_mask)
        if self.attention is not None:
            self_mask = _lengths(decoder_attention_mask, *decoder_input_ids.shape, True, self.attention)
            cross_mask = _lengths(attention_mask, *encoder_out.shape[:2], False, self.attention)

        def layer(h, xs):
            w, site_params = xs
            lin = _site_linear(adapter, site_params, w, "decoder")
            h, _ = _decoder_layer(config, lin, w, h, _cross_kv(config, lin, encoder_out), bias,
                                  self_mask, cross_mask)
            return h, None

        xs = (self.decoder.layers.arrays(), sites.layer_params(adapter, "decoder."))
        h, _ = _scan_layers(layer, self._embed(decoder_input_ids), xs, self.remat)
        return _rms_norm(h, self.decoder.final_norm[...], config.layer_norm_epsilon)

    def logits(self, h: Array) -> Array:
        """LM head on final-normed decoder hidden ``(..., d_model)`` -> ``(..., vocab)`` float32."""
        if self.config.scale_decoder_outputs:
            h = h * (self.config.d_model ** -0.5)
        w = self.shared[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))

    def generate_ids(self, input_ids: Array, attention_mask: Optional[Array], *,
                     max_new_tokens: int, eos_token_id: int | Sequence[int],
                     adapter: Optional[sites.Adapter] = None) -> Array:
        """Greedy decoding with a self-attention KV cache; jittable with ``max_new_tokens`` static.

        The encoder runs once and each decoder layer's cross-attention keys/values are computed once
        from its output. Decoding starts from ``config.decoder_start_token_id``; once an example has
        produced an EOS, its later positions hold ``config.pad_token_id`` (as HF ``generate`` does).

        Args:
          input_ids: ``(B, S)`` right-padded encoder tokens.
          attention_mask: ``(B, S)`` 1/0 (None: no padding).
          max_new_tokens: number of tokens to produce (static).
          eos_token_id: an id or ids that end an example.
          adapter: applied to the encoder and to every decoding step.

        Returns:
          ``(B, max_new_tokens)`` int32 generated ids (without the start token).
        """
        config = self.config
        batch = input_ids.shape[0]
        encoder_out = self.encode(input_ids, attention_mask, adapter=adapter)
        weights = self.decoder.layers.arrays()
        site_params = sites.layer_params(adapter, "decoder.")

        def cross_layer(_, xs):
            w, p = xs
            return None, _cross_kv(config, _site_linear(adapter, p, w, "decoder"), encoder_out)

        _, (cross_k, cross_v) = jax.lax.scan(cross_layer, None, (weights, site_params))
        cross_mask = _key_mask(attention_mask)
        positions = jnp.arange(max_new_tokens)
        self_bias = self._stack_bias(self.decoder, positions, positions, bidirectional=False)
        cache_shape = (config.num_decoder_layers, batch, max_new_tokens, config.num_heads,
                       config.d_kv)
        eos = jnp.asarray(eos_token_id, jnp.int32).reshape(-1)

        def step(carry, t):
            token, cache_k, cache_v, done = carry
            bias = jax.lax.dynamic_slice_in_dim(self_bias, t, 1, axis=2)
            mask = (positions <= t)[None, None, None, :]

            def layer(h, xs):
                w, p, layer_k, layer_v, ck, cv = xs
                lin = _site_linear(adapter, p, w, "decoder")
                return _decoder_layer(config, lin, w, h, (ck, cv), bias, mask, cross_mask,
                                      cache=(layer_k, layer_v), index=t)

            h, (k, v) = jax.lax.scan(layer, self._embed(token[:, None]),
                                     (weights, site_params, cache_k, cache_v, cross_k, cross_v))
            cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k, t, axis=2)
            cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v, t, axis=2)
            h = _rms_norm(h, self.decoder.final_norm[...], config.layer_norm_epsilon)
            next_token = jnp.argmax(self.logits(h[:, 0]), axis=-1).astype(jnp.int32)
            next_token = jnp.where(done, config.pad_token_id, next_token)
            done = done | jnp.isin(next_token, eos)
            return (next_token, cache_k, cache_v, done), next_token

        init = (jnp.full((batch,), config.decoder_start_token_id, jnp.int32),
                jnp.zeros(cache_shape, self.dtype), jnp.zeros(cache_shape, self.dtype),
                jnp.zeros((batch,), bool))
        _, tokens = jax.lax.scan(step, init, positions)
        return tokens.T

    # -- helpers ---------------------------------------------------------------------------

    def _embed(self, ids: Array) -> Array:
        return jnp.take(self.shared[...], ids, axis=0)

    def _stack_bias(self, stack: _Stack, query_positions: Array, key_positions: Array, *,
                    bidirectional: bool) -> Array:
        return _position_bias(stack.relative_attention_bias[...], query_positions, key_positions,
                              bidirectional=bidirectional,
                              max_distance=self.config.relative_attention_max_distance)


def from_hf_tensors(config: T5Config, get: TensorGetter, *, dtype=jnp.float32) -> T5:
    """Build a ``T5`` from Hugging Face tensors (names as in ``T5ForConditionalGeneration``).

    Args:
      config: the architecture. With ``config.tie_word_embeddings`` the lm_head is
        ``shared.weight``, otherwise ``lm_head.weight`` is read. Transformers v5 writes
        ``tie_word_embeddings: true`` even for a Flan-T5 whose ``lm_head.weight`` differs from
        ``shared.weight``, so the loader must untie when the checkpoint holds a distinct head.
      get: ``get(hf_name, expected_shape_in_hf_layout) -> array``; raises on a missing or
        misshapen tensor.
      dtype: storage/compute dtype.

    Torch linears are ``(out, in)`` and are transposed to ``(in, out)``; per-block tensors are
    stacked over layers. Every weight comes from ``get`` (nothing is randomly initialised).
    """
    return T5(config, dtype=dtype, weights=_hf_weights(config, get, dtype))
