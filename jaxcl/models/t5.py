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
so compile time does not grow with depth (or, with ``scan_layers=False``, unrolled). Every linear in
attention and feed-forward is an adapter site (``sites.linear``): ``{encoder,decoder}.self_attn.{q,k,v,o}``,
``decoder.cross_attn.{q,k,v,o}`` and ``{encoder,decoder}.mlp.{wi | wi_0,wi_1 ; wo}``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.models import common, sites

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
    # Every distance from max_distance on shares the last bucket, so a table of the first
    # max_distance + 1 distances, computed on the host, gives every bucket.
    table = jnp.asarray(_distance_buckets(num_buckets, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 ``(max_distance + 1,)``: the bucket of each distance in one direction. The reference
    computes the log-spaced buckets in float32 with a correctly rounded log; a compiled ``log`` may
    be one ulp off, which moves distances whose exact value is a bucket edge (e.g. 18 for 12 causal
    buckets and max_distance 162) into the bucket below, so the same float32 steps run here in numpy
    with the log rounded from float64."""
    max_exact = num_buckets // 2
    distance = np.arange(max_distance + 1)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    far = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return np.where(distance < max_exact, distance, far).astype(np.int32)


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


class _Sites(NamedTuple):
    """One layer's adapter sites in one stack, addressed by suffix (``"self_attn.q"``)."""

    adapter: Optional[sites.Adapter]
    params: Mapping[str, Any]  # this layer's site states
    weights: Mapping[str, Array]  # this layer's weights
    stack: str  # "encoder" or "decoder"
    observer: Optional[sites.Observer] = None

    def lin(self, suffix: str, x: Array) -> Array:
        """``x @ W`` (+ the adapter's part) of the site ``suffix``."""
        return sites.linear(self.adapter, f"{self.stack}.{suffix}", self.params, x, self.weights[suffix])

    def seen(self, suffixes: Sequence[str], x: Array, token_mask: Optional[Array] = None) -> dict:
        """The observations of ``x``, the input of the sites ``suffixes`` (``token_mask``: when ``x``
        is not over the stack's own tokens, as the encoder output that cross-attention reads)."""
        observer = self.observer
        if observer is not None and token_mask is not None:
            observer = observer._replace(token_mask=token_mask)
        return sites.observe(observer, [f"{self.stack}.{s}" for s in suffixes], x)


def _feed_forward(config: T5Config, at: _Sites, x: Array) -> tuple[Array, dict]:
    wi = ("mlp.wi_0", "mlp.wi_1") if config.is_gated else ("mlp.wi",)
    seen = at.seen(wi, x)
    if config.is_gated:
        hidden = jax.nn.gelu(at.lin("mlp.wi_0", x), approximate=True) * at.lin("mlp.wi_1", x)
    else:
        hidden = jax.nn.relu(at.lin("mlp.wi", x))
    return at.lin("mlp.wo", hidden), {**seen, **at.seen(("mlp.wo",), hidden)}


def _self_attention(config: T5Config, at: _Sites, h: Array, attend: Callable[[Array, Array, Array], Array]
                    ) -> tuple[Array, tuple[Array, Array], dict]:
    """Pre-norm self-attention block: ``(h + attention output, this call's (k, v), observations)``."""
    x = _rms_norm(h, at.weights["self_attn.norm"], config.layer_norm_epsilon)
    seen = at.seen(("self_attn.q", "self_attn.k", "self_attn.v"), x)
    q, k, v = (_heads(at.lin(f"self_attn.{p}", x), config.num_heads) for p in "qkv")
    o = attend(q, k, v)
    return h + at.lin("self_attn.o", o), (k, v), {**seen, **at.seen(("self_attn.o",), o)}


def _encoder_layer(config: T5Config, at: _Sites, h: Array, bias: Array,
                   mask: Union[None, Array, _Lengths]) -> tuple[Array, dict]:
    h, _, seen = _self_attention(config, at, h, lambda q, k, v: _attend(q, k, v, bias, mask))
    out, seen_mlp = _feed_forward(config, at, _rms_norm(h, at.weights["mlp.norm"], config.layer_norm_epsilon))
    return h + out, {**seen, **seen_mlp}


def _cross_kv(config: T5Config, at: _Sites, encoder_out: Array) -> tuple[Array, Array]:
    """A decoder layer's cross-attention keys and values ``(B, S, N, H)`` from the encoder."""
    n = config.num_heads
    return _heads(at.lin("cross_attn.k", encoder_out), n), _heads(at.lin("cross_attn.v", encoder_out), n)


def _decoder_layer(config: T5Config, at: _Sites, h: Array, self_attend: Callable[[Array, Array, Array], Array],
                   cross_kv: tuple[Array, Array], cross_mask: Union[None, Array, _Lengths]
                   ) -> tuple[Array, tuple[Array, Array], dict]:
    """One decoder layer on ``h (B, T, d)``; ``self_attend(q, k, v)`` is its self-attention (over the
    T tokens, or over a KV cache and the new tokens).

    Returns:
      The new ``h``, this call's own ``(k, v)`` of shape ``(B, T, N, H)`` (to store in a cache), and
      the observations.
    """
    eps = config.layer_norm_epsilon
    h, kv, seen = _self_attention(config, at, h, self_attend)
    x = _rms_norm(h, at.weights["cross_attn.norm"], eps)
    q = _heads(at.lin("cross_attn.q", x), config.num_heads)
    # HF gives cross-attention an all-zero position bias, i.e. none.
    o = _attend(q, *cross_kv, None, cross_mask)
    h = h + at.lin("cross_attn.o", o)
    out, seen_mlp = _feed_forward(config, at, _rms_norm(h, at.weights["mlp.norm"], eps))
    return h + out, kv, {**seen, **at.seen(("cross_attn.q",), x), **at.seen(("cross_attn.o",), o), **seen_mlp}


# ----------------------------------------------------------------------------------------------
# Weights: one nested table of shapes and logical axes drives random init, HF loading, site_shapes,
# site_axes and param_axes.


def weight_table(config: T5Config) -> dict:
    """Every weight, nested ``{name: common.Weight(shape, logical axes)}``; layer weights carry a
    leading ``(num_layers,)`` axis named ``layers`` and are keyed by site suffix (``"self_attn.q"``;
    norms are ``"<group>.norm"``). ``T5.param_axes`` renames the keys as the module state has them."""
    W = common.Weight
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff

    def attention(group: str) -> dict:
        return {f"{group}.norm": W((d,), ("embed",)), f"{group}.q": W((d, inner), ("embed", "q_heads")),
                f"{group}.k": W((d, inner), ("embed", "kv_heads")), f"{group}.v": W((d, inner), ("embed", "kv_heads")),
                f"{group}.o": W((inner, d), ("q_heads", "embed"))}

    up = W((d, ff), ("embed", "mlp"))
    wi = {"mlp.wi_0": up, "mlp.wi_1": up} if config.is_gated else {"mlp.wi": up}
    mlp = {"mlp.norm": W((d,), ("embed",)), **wi, "mlp.wo": W((ff, d), ("mlp", "embed"))}

    def stack(num_layers: int, cross: bool) -> dict:
        layer = {**attention("self_attn"), **(attention("cross_attn") if cross else {}), **mlp}
        table = W((config.relative_attention_num_buckets, config.num_heads), ("relpos", "heads"))
        return {"relative_attention_bias": table, "final_norm": W((d,), ("embed",)),
                "layers": {name: w.stacked(num_layers) for name, w in layer.items()}}

    table = {"shared": W((config.vocab_size, d), ("vocab", "embed")), "encoder": stack(config.num_layers, False),
             "decoder": stack(config.num_decoder_layers, True)}
    if not config.tie_word_embeddings:
        table["lm_head"] = W((d, config.vocab_size), ("embed", "vocab"))
    return table


def _map_weights(make: Callable[[tuple[str, ...], tuple], Array], table: dict,
                 path: tuple[str, ...] = ()) -> dict:
    """Build the nested weight dict: ``make(path, shape)`` for every leaf of ``table``."""
    return {k: make(path + (k,), v.shape) if common.is_weight(v) else _map_weights(make, v, path + (k,))
            for k, v in table.items()}


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
    return _map_weights(make, weight_table(config))


def _hf_module(stack: str, index: int, name: str) -> str:
    """The transformers module of layer weight ``name`` (``"self_attn.q"``, ``"mlp.norm"``) in block
    ``index`` of ``stack``."""
    group, leaf = name.split(".")
    sublayer, module = {"self_attn": (0, "SelfAttention"), "cross_attn": (1, "EncDecAttention"),
                        "mlp": (1 if stack == "encoder" else 2, "DenseReluDense")}[group]
    prefix = f"{stack}.block.{index}.layer.{sublayer}"
    return f"{prefix}.layer_norm" if leaf == "norm" else f"{prefix}.{module}.{leaf}"


def _hf_layer_tensor(get: TensorGetter, stack: str, index: int, name: str,
                     shape: tuple) -> np.ndarray:
    """One layer's weight in our ``(d_in, d_out)`` layout from its torch-layout HF tensor."""
    if name.endswith(".norm"):
        return np.asarray(get(f"{_hf_module(stack, index, name)}.weight", shape))
    return np.asarray(get(f"{_hf_module(stack, index, name)}.weight", shape[::-1])).T


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
        # device_put, not jnp.asarray: that compiles a staging program per shape
        return jax.device_put(np.asarray(array).astype(jnp.dtype(dtype)))
    return _map_weights(make, weight_table(config))


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
      scan_layers: True (default) runs the layers as one ``jax.lax.scan`` (compile time independent
        of depth); False unrolls them into a Python loop that slices the stacked weights with
        static indices (no per-layer dynamic-slice or loop carry; compile time grows with depth),
        the form maxtext's fastest GPU recipes use. Same values. A plain attribute.
      weights: the nested weight dict built by ``from_hf_tensors`` instead of a random init.
    """

    is_encoder_decoder = True
    peft_names = sites.T5_PEFT_NAMES  # PEFT target_modules names of the sites (``sites.resolve_sites``)

    def __init__(self, config: T5Config, *, rngs: Optional[nnx.Rngs] = None, dtype=jnp.float32,
                 remat: Union[bool, str] = False, weights: Optional[Mapping[str, Any]] = None,
                 attention: Optional[str] = None, scan_layers: bool = True):
        if weights is None:
            if rngs is None:
                raise ValueError("T5 needs `rngs` for a random init, or `weights`")
            weights = _random_weights(config, rngs, dtype)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.scan_layers = scan_layers
        self.shared = nnx.Param(weights["shared"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(weights["lm_head"])
        self.encoder = _Stack(weights["encoder"])
        self.decoder = _Stack(weights["decoder"])

    # -- interface used by the engine -------------------------------------------------------

    def site_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{site name: (num_layers, d_in, d_out)}`` for every adaptable linear."""
        return {site: w.shape for site, w in self._site_table().items()}

    def site_weights(self) -> dict[str, Array]:
        """``{site name: (num_layers, d_in, d_out)}`` the stacked base weight of every site."""
        arrays = {"encoder": self.encoder.layers.arrays(), "decoder": self.decoder.layers.arrays()}
        return {site: arrays[site.split(".", 1)[0]][site.split(".", 1)[1]] for site in self._site_table()}

    def site_axes(self) -> dict[str, tuple[str, str]]:
        """``{site name: (logical axis of its input, of its output)}``, e.g.
        ``decoder.cross_attn.k: ("embed", "kv_heads")``, ``encoder.mlp.wo: ("mlp", "embed")``."""
        return {site: w.axes[1:] for site, w in self._site_table().items()}

    @staticmethod
    def hf_module(site: str, layer: int) -> str:
        """The transformers module of ``site`` in layer ``layer`` (``"encoder.self_attn.q", 0`` ->
        ``"encoder.block.0.layer.0.SelfAttention.q"``): where PEFT puts that site's LoRA."""
        stack, name = site.split(".", 1)
        return _hf_module(stack, layer, name)

    def param_axes(self) -> dict:
        """A pytree shaped like ``nnx.to_pure_dict(nnx.state(model))`` whose leaves are the tuples of
        logical axis names of each parameter, one per dimension (stacked layer weights start with
        ``"layers"``; vocabulary: ``common.Weight``)."""
        def state_keys(tree):  # the layer modules store "self_attn.q" as attribute self_attn_q
            return {k.replace(".", "_"): v.axes if common.is_weight(v) else state_keys(v) for k, v in tree.items()}
        return state_keys(weight_table(self.config))

    def embed_inputs(self, input_ids: Array) -> Array:
        """Input token embeddings ``(B, S, d_model)`` (the shared table, model dtype) of ``input_ids``
        ``(B, S)``: what the encoder, and the decoder for decoder ids, start from."""
        return jnp.take(self.shared[...], input_ids, axis=0)

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
        return self._encode(input_ids, attention_mask, adapter)[0]

    def decode_hidden(self, decoder_input_ids: Array, encoder_out: Array,
                      attention_mask: Optional[Array],
                      decoder_attention_mask: Optional[Array] = None, *,
                      adapter: Optional[sites.Adapter] = None) -> Array:
        """Teacher-forced decoder: ``(B, T)`` tokens -> final-normed hidden ``(B, T, d_model)``.

        ``attention_mask`` is the encoder's ``(B, S)`` padding mask (hides padded encoder outputs).
        """
        return self._decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask, adapter)[0]

    def observe(self, input_ids: Array, attention_mask: Optional[Array], fn: Callable[[str, Array, Array], Any], *,
                sites: Sequence[str], decoder_input_ids: Optional[Array] = None,
                decoder_attention_mask: Optional[Array] = None,
                adapter: Optional[sites.Adapter] = None) -> dict[str, Any]:
        """Evaluate ``fn`` on what each of ``sites`` reads, in every layer of one teacher-forced pass.

        As ``Llama.observe``: inside each stack's layer scan ``fn(site, x, token_mask)`` is called on
        the site's input ``x`` ``(B, S, d_in)`` and returned as a scan output. ``token_mask`` (in
        ``x``'s dtype) is the encoder's ``attention_mask`` for encoder sites and for
        ``decoder.cross_attn.{k,v}`` (they read the encoder output), the decoder's otherwise. Always
        runs the mask attention (not the ``attention`` option).

        Args:
          input_ids, attention_mask: ``(B, S)`` encoder tokens and mask.
          fn: ``(site name, x, token_mask) -> pytree``.
          sites: full site names (``site_shapes``), e.g. ``"encoder.self_attn.q"``.
          decoder_input_ids, decoder_attention_mask: ``(B, T)``; needed for decoder sites only.
          adapter: the adapter of the forward pass.

        Returns:
          ``{site: fn's pytree with a leading (num_layers of its stack,) axis}``.
        """
        return _observe(self, input_ids, attention_mask, fn, sites, decoder_input_ids, decoder_attention_mask,
                        adapter)

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
          adapter: applied to the encoder and to every decoding step (a weight rewrite that is the
            same for every example is formed once, before decoding: ``sites.form_weights``).

        Returns:
          ``(B, max_new_tokens)`` int32 generated ids (without the start token).
        """
        adapter = sites.form_weights(adapter, self.site_weights())
        config = self.config
        batch = input_ids.shape[0]
        encoder_out = self.encode(input_ids, attention_mask, adapter=adapter)
        weights = self.decoder.layers.arrays()
        site_params = sites.layer_params(adapter, "decoder.")

        def cross_layer(_, xs):
            w, p = xs
            return None, _cross_kv(config, _Sites(adapter, p, w, "decoder"), encoder_out)

        _, (cross_k, cross_v) = common.run_layers(cross_layer, None, (weights, site_params), scan=self.scan_layers)
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

                def attend(q, k, v):  # over the cache with this step's k/v written at slot t
                    keys = jax.lax.dynamic_update_slice_in_dim(layer_k, k, t, axis=1)
                    values = jax.lax.dynamic_update_slice_in_dim(layer_v, v, t, axis=1)
                    return _attend(q, keys, values, bias, mask)

                h, kv, _ = _decoder_layer(config, _Sites(adapter, p, w, "decoder"), h, attend, (ck, cv), cross_mask)
                return h, kv

            h, (k, v) = common.run_layers(layer, self.embed_inputs(token[:, None]),
                                          (weights, site_params, cache_k, cache_v, cross_k, cross_v),
                                          scan=self.scan_layers)
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

    # -- the stacks ------------------------------------------------------------------------

    def _encode(self, input_ids: Array, attention_mask: Optional[Array], adapter: Optional[sites.Adapter],
                observer: Optional[sites.Observer] = None) -> tuple[Array, dict]:
        """``(final-normed encoder output, {site: observations stacked over layers})``."""
        config = self.config
        positions = jnp.arange(input_ids.shape[1])
        bias = self._stack_bias(self.encoder, positions, positions, bidirectional=True)
        mask = (_key_mask(attention_mask) if self.attention is None or observer is not None
                else _lengths(attention_mask, *input_ids.shape, False, self.attention))

        def layer(h, xs):
            w, site_params = xs
            return _encoder_layer(config, _Sites(adapter, site_params, w, "encoder", observer), h, bias, mask)

        xs = (self.encoder.layers.arrays(), sites.layer_params(adapter, "encoder."))
        h, observed = common.run_layers(layer, self.embed_inputs(input_ids), xs, scan=self.scan_layers, remat=self.remat)
        return _rms_norm(h, self.encoder.final_norm[...], config.layer_norm_epsilon), observed

    def _decode(self, decoder_input_ids: Array, encoder_out: Array, attention_mask: Optional[Array],
                decoder_attention_mask: Optional[Array], adapter: Optional[sites.Adapter],
                observer: Optional[sites.Observer] = None, encoder_mask: Optional[Array] = None
                ) -> tuple[Array, dict]:
        """Teacher-forced decoder: ``(final-normed hidden, {site: observations stacked over layers})``;
        ``encoder_mask``: the token mask of the cross-attention k/v observations."""
        config = self.config
        t = decoder_input_ids.shape[1]
        positions = jnp.arange(t)
        bias = self._stack_bias(self.decoder, positions, positions, bidirectional=False)
        self_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if decoder_attention_mask is not None:
            self_mask = self_mask & _key_mask(decoder_attention_mask)
        cross_mask = _key_mask(attention_mask)
        if self.attention is not None and observer is None:
            self_mask = _lengths(decoder_attention_mask, *decoder_input_ids.shape, True, self.attention)
            cross_mask = _lengths(attention_mask, *encoder_out.shape[:2], False, self.attention)

        def layer(h, xs):
            w, site_params = xs
            at = _Sites(adapter, site_params, w, "decoder", observer)
            h, _, seen = _decoder_layer(config, at, h, lambda q, k, v: _attend(q, k, v, bias, self_mask),
                                        _cross_kv(config, at, encoder_out), cross_mask)
            return h, {**seen, **at.seen(("cross_attn.k", "cross_attn.v"), encoder_out, encoder_mask)}

        xs = (self.decoder.layers.arrays(), sites.layer_params(adapter, "decoder."))
        h, observed = common.run_layers(layer, self.embed_inputs(decoder_input_ids), xs, scan=self.scan_layers, remat=self.remat)
        return _rms_norm(h, self.decoder.final_norm[...], config.layer_norm_epsilon), observed

    # -- helpers ---------------------------------------------------------------------------

    def _site_table(self) -> dict[str, common.Weight]:
        """``{site name: its stacked weight's table entry}``."""
        table = weight_table(self.config)
        return {f"{stack}.{name}": w for stack in ("encoder", "decoder")
                for name, w in table[stack]["layers"].items() if not name.endswith(".norm")}

    def _stack_bias(self, stack: _Stack, query_positions: Array, key_positions: Array, *,
                    bidirectional: bool) -> Array:
        return _position_bias(stack.relative_attention_bias[...], query_positions, key_positions,
                              bidirectional=bidirectional,
                              max_distance=self.config.relative_attention_max_distance)


def _observe(model: T5, input_ids, attention_mask, fn, names: Sequence[str], decoder_input_ids,
             decoder_attention_mask, adapter) -> dict:
    """``T5.observe`` (apart, as its ``sites`` argument hides the module ``sites`` there)."""
    known = model.site_shapes()
    unknown = [names] if isinstance(names, str) else sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"observe: sites {unknown} are not site names of this model; it has {sorted(known)}")
    decoder_sites = frozenset(n for n in names if n.startswith("decoder."))
    if decoder_sites and decoder_input_ids is None:
        raise ValueError(f"observe: decoder sites {sorted(decoder_sites)} need decoder_input_ids")
    encoder_mask = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask
    encoder_out, observed = model._encode(input_ids, attention_mask, adapter,
                                          sites.Observer(fn, frozenset(names) - decoder_sites, encoder_mask))
    if decoder_sites:
        decoder_mask = (jnp.ones(decoder_input_ids.shape) if decoder_attention_mask is None
                        else decoder_attention_mask)
        _, seen = model._decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask, adapter,
                                sites.Observer(fn, decoder_sites, decoder_mask), encoder_mask)
        observed.update(seen)
    return observed


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
