"""Llama-family decoder-only transformers in Flax NNX, computing what transformers' ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` and ``MistralForCausalLM`` compute.

Covers grouped-query attention, tied or untied embeddings, ``rope_theta``, the ``"llama3"`` RoPE
scaling, a ``head_dim`` that differs from ``hidden_size // num_attention_heads`` and the RMSNorm eps.
Qwen2/Qwen2.5 and Mistral are Llama with two switches (``LlamaConfig.biases``: Qwen2's q/k/v biases,
and Llama's own ``attention_bias``/``mlp_bias``; ``LlamaConfig.sliding_window``: Mistral's windowed
attention), so they share this file.

Layout choices:
  * The decoder layers' weights are stacked over layers (leading ``num_layers`` axis, see
    ``LlamaLayers``) and the forward is one ``jax.lax.scan``, so compile time does not grow with depth
    (or, with ``scan_layers=False``, a loop that indexes them statically).
  * Linear weights are stored ``(d_in, d_out)`` and every attention/MLP projection goes through
    ``sites.linear`` under the names ``attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down``. A bias
    is added after the site (it is not adaptable).
  * Positions come from the attention mask (``max(cumsum(mask) - 1, 0)``), so left-padded batches
    get the same positions as unpadded sequences. Every query may always attend to its own slot, so
    the rows of padding queries (fully masked otherwise) stay finite. The sliding window counts
    slots, as transformers does; a row's tokens are contiguous, so that is the distance in tokens.
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

from jaxcl.models import common, sites

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

    Attributes:
      biases: the projections (``"q" "k" "v" "o" "gate" "up" "down"``) that add a bias after
        ``x @ W``: Qwen2 has ``("q", "k", "v")``, Llama's ``attention_bias``/``mlp_bias`` set all
        attention/MLP ones.
      sliding_window: every query attends to at most this many slots: itself and the
        ``sliding_window - 1`` before it (Mistral; Qwen2 with ``use_sliding_window``). None: all.
      rope_freq_factors: per-frequency divisors ``(head_dim // 2,)`` of the inverse RoPE frequencies,
        as llama.cpp stores RoPE scaling (a GGUF ``rope_freqs`` tensor); exclusive with
        ``rope_scaling``.
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
    rope_freq_factors: Optional[tuple[float, ...]] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    biases: tuple[str, ...] = ()
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        unknown = sorted(set(self.biases) - set(_SITE_OF))
        if unknown:
            raise ValueError(f"biases {unknown} are not projections (expected some of {list(_SITE_OF)})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.rope_freq_factors is not None:
            if self.rope_scaling is not None:
                raise ValueError("rope_freq_factors and rope_scaling are exclusive")
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                                 f"expected head_dim // 2 = {self.head_dim // 2}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Map a transformers ``config.json`` dict (v4 or v5 layout) of a ``llama``, ``qwen2`` or
        ``mistral`` model to a ``LlamaConfig``.

        Raises:
          ValueError: naming the field, for a missing required field or a value this model does not
            implement (another model_type, an activation other than silu, a RoPE type other than
            default/llama3, partial rotary embeddings, Qwen2 sliding windows on only some layers).
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in _FAMILIES:
            raise ValueError(f"Llama config: model_type {model_type!r} is not one of {list(_FAMILIES)}")

        def required(name):
            if hf.get(name) is None:
                raise ValueError(f"{model_type} config: required field {name!r} is missing")
            return hf[name]

        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{model_type} config: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        heads = int(required("num_attention_heads"))
        hidden = int(required("hidden_size"))
        layers = int(required("num_hidden_layers"))
        rope_theta, rope_scaling = _rope_from_hf(hf, model_type)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=int(required("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=layers,
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
            biases=_FAMILIES[model_type](hf),
            sliding_window=_sliding_window_from_hf(hf, model_type, layers),
        )


def _llama_biases(hf: Mapping[str, Any]) -> tuple[str, ...]:
    return (("q", "k", "v", "o") if hf.get("attention_bias") else ()) + \
        (("gate", "up", "down") if hf.get("mlp_bias") else ())


# model_type -> the projections with a bias (transformers hard-codes them for Qwen2 and Mistral).
_FAMILIES: dict[str, Callable[[Mapping[str, Any]], tuple[str, ...]]] = {
    "llama": _llama_biases, "qwen2": lambda hf: ("q", "k", "v"), "mistral": lambda hf: ()}


def _sliding_window_from_hf(hf: Mapping[str, Any], model_type: str, num_layers: int) -> Optional[int]:
    """Mistral windows every layer; Qwen2 only with ``use_sliding_window``, and then (as transformers'
    ``layer_types``) the layers from ``max_window_layers`` on. Llama has no window."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "mistral":
        return int(window)
    if not hf.get("use_sliding_window", False):
        return None
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(num_layers)]
    if len(set(types)) > 1:
        raise ValueError(f"qwen2 config: layer_types {types} mix sliding and full attention "
                         "(use_sliding_window with max_window_layers); only one kind for all layers is supported")
    return int(window) if types[0] == "sliding_attention" else None


def _rope_from_hf(hf: Mapping[str, Any], model_type: str) -> tuple[float, Optional[Llama3RopeScaling]]:
    # transformers v5 writes `rope_parameters` (theta inside); v4 writes `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{model_type} config: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{model_type} config: rope_scaling type {rope_type!r} is not supported "
                         "(supported: none, 'default', 'llama3')")
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 2048))))
    except KeyError as missing:
        raise ValueError(f"{model_type} config: llama3 rope_scaling needs field {missing}") from None
    return theta, scaling


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` float32, as transformers computes them.

    With ``"llama3"`` scaling, wavelengths longer than ``original / low_freq_factor`` are divided by
    ``factor``, those shorter than ``original / high_freq_factor`` are kept, and the band in between
    interpolates smoothly between the two. ``rope_freq_factors`` divide the frequencies as given.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
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


def _attention_mask(query_slots: Array, key_valid: Array, window: Optional[int] = None) -> Array:
    """Boolean ``(B, 1, S, T)`` mask: causal over slots (within ``window`` slots) AND key not padding,
    OR the query's own slot.

    Args:
      query_slots: ``(S,)`` slot index (in the key axis) of each query.
      key_valid: ``(B, T)`` which key slots hold real tokens.
      window: the sliding window (None: unbounded).
    """
    slots = jnp.arange(key_valid.shape[-1])
    causal = slots[None, :] <= query_slots[:, None]
    if window is not None:
        causal = causal & (slots[None, :] > query_slots[:, None] - window)
    own = slots[None, :] == query_slots[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]


def weight_table(config: LlamaConfig) -> dict:
    """Every weight of the model, nested like ``nnx.to_pure_dict(nnx.state(model))``: leaves are
    ``common.Weight(shape, logical axes)``. Random init, HF loading, ``site_shapes``, ``site_axes`` and
    ``param_axes`` all read this one table.

    Layer weights (``LlamaLayers``) are stacked with a leading ``layers`` axis: ``attn_norm``,
    ``mlp_norm``: ``(L, d)``; ``q``: ``(L, d, H*hd)``; ``k``, ``v``: ``(L, d, KV*hd)``; ``o``:
    ``(L, H*hd, d)``; ``gate``, ``up``: ``(L, d, d_ff)``; ``down``: ``(L, d_ff, d)``; and for each
    projection ``p`` in ``config.biases`` a ``p_bias``: ``(L, d_out)``.
    """
    W = common.Weight
    d, f, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    layer = {"attn_norm": W((d,), ("embed",)), "q": W((d, q_dim), ("embed", "q_heads")),
             "k": W((d, kv_dim), ("embed", "kv_heads")), "v": W((d, kv_dim), ("embed", "kv_heads")),
             "o": W((q_dim, d), ("q_heads", "embed")), "mlp_norm": W((d,), ("embed",)),
             "gate": W((d, f), ("embed", "mlp")), "up": W((d, f), ("embed", "mlp")),
             "down": W((f, d), ("mlp", "embed"))}
    layer.update({f"{p}_bias": W(layer[p].shape[1:], layer[p].axes[1:]) for p in config.biases})
    table = {"embed": W((vocab, d), ("vocab", "embed")),
             "layers": {name: w.stacked(config.num_hidden_layers) for name, w in layer.items()},
             "norm": W((d,), ("embed",))}
    if not config.tie_word_embeddings:
        table["lm_head"] = W((d, vocab), ("embed", "vocab"))
    return table


class LlamaLayers(nnx.Module):
    """All decoder layers' weights, each stacked with a leading ``(num_layers,)`` axis (see
    ``weight_table``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        table = weight_table(config)["layers"]
        self.names = tuple(table)
        init = nnx.initializers.normal(config.initializer_range)
        for name, (shape, _) in table.items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            elif name.endswith("_bias"):
                value = jnp.zeros(shape, dtype)
            else:
                value = init(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value))

    def stacked(self) -> dict[str, Array]:
        """``{weight name: stacked array}``, the ``xs`` of the layer scan."""
        return {name: getattr(self, name)[...] for name in self.names}


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
      scan_layers: True (default) runs the layers as one ``jax.lax.scan`` (compile time independent
        of depth); False unrolls them into a Python loop that slices the stacked weights with
        static indices (no per-layer dynamic-slice or loop carry; compile time grows with depth),
        the form maxtext's fastest GPU recipes use. Same values. A plain attribute.
    """

    is_encoder_decoder = False
    peft_names = sites.LLAMA_PEFT_NAMES  # PEFT target_modules names of the sites (``sites.resolve_sites``)

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: Union[bool, str] = False,
                 attention: Optional[str] = None, scan_layers: bool = True):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attention = attention
        self.scan_layers = scan_layers
        init = nnx.initializers.normal(config.initializer_range)
        table = weight_table(config)
        self.embed = nnx.Param(init(rngs.params(), table["embed"].shape, dtype))
        self.layers = LlamaLayers(config, rngs=rngs, dtype=dtype)
        self.norm = nnx.Param(jnp.ones(table["norm"].shape, dtype))
        self.lm_head = (None if config.tie_word_embeddings
                        else nnx.Param(init(rngs.params(), table["lm_head"].shape, dtype)))

    # ----------------------------------------------------------------- public interface

    def site_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{site name: (num_layers, d_in, d_out)}`` for every adaptable projection."""
        layers = weight_table(self.config)["layers"]
        return {site: layers[w].shape for w, site in _SITE_OF.items()}

    def site_weights(self) -> dict[str, Array]:
        """``{site name: (num_layers, d_in, d_out)}`` the stacked base weight of every site."""
        stacked = self.layers.stacked()
        return {site: stacked[w] for w, site in _SITE_OF.items()}

    def site_axes(self) -> dict[str, tuple[str, str]]:
        """``{site name: (logical axis of its input, of its output)}``, e.g. ``attn.q: ("embed",
        "q_heads")``, ``mlp.down: ("mlp", "embed")`` (vocabulary: ``common.Weight``)."""
        layers = weight_table(self.config)["layers"]
        return {site: layers[w].axes[1:] for w, site in _SITE_OF.items()}

    @staticmethod
    def hf_module(site: str, layer: int) -> str:
        """The transformers module of ``site`` in layer ``layer`` (``"attn.q", 0`` ->
        ``"model.layers.0.self_attn.q_proj"``): where PEFT puts that site's LoRA."""
        weight = next(w for w, s in _SITE_OF.items() if s == site)
        return f"model.layers.{layer}.{_HF_MODULE[weight]}"

    def param_axes(self) -> dict:
        """A pytree shaped like ``nnx.to_pure_dict(nnx.state(model))`` whose leaves are the tuples of
        logical axis names of each parameter, one per dimension (stacked layer weights start with
        ``"layers"``)."""
        return jax.tree.map(lambda w: w.axes, weight_table(self.config), is_leaf=common.is_weight)

    def embed_inputs(self, input_ids: Array) -> Array:
        """Input token embeddings ``(B, S, d)`` in the model dtype for ``input_ids`` ``(B, S)``."""
        return jnp.take(self.embed[...], input_ids, axis=0)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 adapter: Optional[sites.Adapter] = None) -> Array:
        """Logits ``(B, S, vocab)`` float32 for ``input_ids`` ``(B, S)`` (mask: 1 = token, 0 = pad)."""
        return self.logits(self.hidden(input_ids, attention_mask, adapter=adapter))

    def hidden(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               adapter: Optional[sites.Adapter] = None, num_layers: Optional[int] = None,
               final_norm: bool = True) -> Array:
        """Hidden states ``(B, S, d)`` after the first ``num_layers`` layers (all by default)."""
        x, _ = self._forward(input_ids, attention_mask, adapter, num_layers)
        return self.final_norm(x) if final_norm else x

    def observe(self, input_ids: Array, attention_mask: Optional[Array], fn: Callable[[str, Array, Array], Any], *,
                sites: Sequence[str], adapter: Optional[sites.Adapter] = None,
                num_layers: Optional[int] = None) -> dict[str, Any]:
        """Evaluate ``fn`` on what each of ``sites`` reads, in every layer of one forward pass.

        Inside the layer scan, ``fn(site, x, token_mask)`` is called on the site's input activations
        ``x`` ``(B, S, d_in)`` (after the adapters of the sites before it) with ``token_mask``
        ``(B, S)`` in ``x``'s dtype (1 = token, 0 = padding); its result is a scan output, so the
        answer stacks it over layers. E.g. the input covariance of each site, for InfLoRA-style
        subspaces: ``fn = lambda s, x, m: jnp.einsum("bsi,bsj,bs->ij", x, x, m)``. Always runs the
        mask attention (not the ``attention`` option, whose rotated rows would reorder ``x``).

        Args:
          input_ids, attention_mask: ``(B, S)``, as for ``hidden``.
          fn: ``(site name, x, token_mask) -> pytree``.
          sites: full site names (see ``site_shapes``; ``sites.resolve_sites`` turns patterns into them).
          adapter: the adapter of the forward pass.
          num_layers: observe only the first layers (all by default).

        Returns:
          ``{site: fn's pytree with a leading (num_layers,) axis}``.
        """
        _, observed = self._forward(input_ids, attention_mask, adapter, num_layers,
                                    _observer(self.site_shapes(), fn, sites, input_ids, attention_mask))
        return observed

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
        attn_mask = _attention_mask(start + jnp.arange(input_ids.shape[1]), valid, self.config.sliding_window)
        x = self.embed_inputs(input_ids)
        attend = functools.partial(jax.nn.dot_product_attention, mask=attn_mask)
        x, cache, _ = self._layers(x, cos, sin, attend, adapter, None, cache=cache, start=start)
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
          adapter: applied to the prompt and to every generated token (a weight rewrite that is the
            same for every example is formed once, before decoding: ``sites.form_weights``).

        Returns:
          ``(B, max_new_tokens)`` int32; positions after an example's first eos hold ``eos_token_id``
          (the first one if several).
        """
        adapter = sites.form_weights(adapter, self.site_weights())
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

    def _forward(self, input_ids: Array, attention_mask: Optional[Array], adapter: Optional[sites.Adapter],
                 num_layers: Optional[int], observer: Optional[sites.Observer] = None) -> tuple[Array, dict]:
        """Embeddings through the (first ``num_layers``) layers, without the final norm:
        ``(x (B, S, d), {site: observations stacked over layers})``."""
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        seq = jnp.arange(input_ids.shape[1])
        window = self.config.sliding_window
        rotate = self.attention is not None and observer is None
        if not rotate:
            attend = functools.partial(jax.nn.dot_product_attention, mask=_attention_mask(seq, mask, window))
        else:  # rotate each row's tokens to the front: causal attention over lengths
            first = jnp.argmax(mask, axis=-1)[:, None]
            order = (seq + first) % seq.shape[0]
            input_ids, mask = jnp.take_along_axis(input_ids, order, 1), jnp.take_along_axis(mask, order, 1)
            lengths = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)
            attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, key_value_seq_lengths=lengths,
                                       implementation=self.attention,
                                       local_window_size=None if window is None else (window - 1, 0))
        cos, sin = _rope_tables(rope_inv_freq(self.config), positions_from_mask(mask), self.dtype)
        x, _, observed = self._layers(self.embed_inputs(input_ids), cos, sin, attend, adapter, num_layers,
                                      cache=None, start=0, observer=observer)
        if rotate:
            x = jnp.take_along_axis(x, ((seq - first) % seq.shape[0])[..., None], axis=1)
        return x, observed

    def _layers(self, x: Array, cos: Array, sin: Array, attend: Callable[[Array, Array, Array], Array],
                adapter: Optional[sites.Adapter], num_layers: Optional[int], *, cache: Optional[KVCache], start,
                observer: Optional[sites.Observer] = None) -> tuple[Array, Optional[KVCache], dict]:
        """Scan the (first ``num_layers``) decoder layers over ``x`` ``(B, S, d)``;
        ``attend(q, k, v)`` is the attention (with its mask or lengths bound).

        Returns:
          ``x``, the cache, and ``{site: observer.fn's results stacked over layers}``.
        """
        c = self.config
        weights = self.layers.stacked()
        site_params = sites.layer_params(adapter)
        if num_layers is not None:
            weights, site_params = jax.tree.map(lambda a: a[:num_layers], (weights, site_params))
        batch, seq, _ = x.shape

        def body(carry, xs):
            x, cache = carry
            w, sp, layer = xs

            def proj(name, x):  # the site, then its bias (not adaptable)
                y = sites.linear(adapter, _SITE_OF[name], sp, x, w[name])
                return y + w[f"{name}_bias"] if f"{name}_bias" in w else y

            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            observed = sites.observe(observer, ("attn.q", "attn.k", "attn.v"), h)
            q = proj("q", h).reshape(batch, seq, -1, c.head_dim)
            k = proj("k", h).reshape(batch, seq, -1, c.head_dim)
            v = proj("v", h).reshape(batch, seq, -1, c.head_dim)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if cache is not None:
                at = (layer, jnp.int32(0), start, jnp.int32(0), jnp.int32(0))
                cache = cache._replace(k=jax.lax.dynamic_update_slice(cache.k, k[None], at),
                                       v=jax.lax.dynamic_update_slice(cache.v, v[None], at))
                k, v = cache.k[layer], cache.v[layer]
            o = attend(q, k, v).reshape(batch, seq, -1)
            observed.update(sites.observe(observer, ("attn.o",), o))
            x = x + proj("o", o)
            h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            observed.update(sites.observe(observer, ("mlp.gate", "mlp.up"), h))
            hidden = jax.nn.silu(proj("gate", h)) * proj("up", h)
            observed.update(sites.observe(observer, ("mlp.down",), hidden))
            return (x + proj("down", hidden), cache), observed

        layer_ids = jnp.arange(weights["q"].shape[0], dtype=jnp.int32)
        (x, cache), observed = common.run_layers(body, (x, cache), (weights, site_params, layer_ids),
                                                 scan=self.scan_layers, remat=self.remat)
        return x, cache, observed


def _observer(site_shapes: Mapping[str, Any], fn, names: Sequence[str], input_ids: Array,
              attention_mask: Optional[Array]) -> sites.Observer:
    """The ``sites.Observer`` of ``observe``; unknown site names are a ValueError naming them."""
    unknown = sorted(set(names) - set(site_shapes))
    if isinstance(names, str) or unknown:
        raise ValueError(f"observe: sites {[names] if isinstance(names, str) else unknown} are not site names "
                         f"of this model; it has {sorted(site_shapes)}")
    mask = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask
    return sites.Observer(fn, frozenset(names), mask)


TensorGetter = Callable[[str, tuple[int, ...]], np.ndarray]

# HF module of each stacked weight inside ``model.layers.{i}``.
_HF_MODULE = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _hf_layer_name(name: str) -> str:
    """``"q"`` -> ``"self_attn.q_proj.weight"``, ``"q_bias"`` -> ``"self_attn.q_proj.bias"``."""
    base = name.removesuffix("_bias")
    return f"{_HF_MODULE[base]}.{'weight' if base == name else 'bias'}"


def from_hf_tensors(config: LlamaConfig, get: TensorGetter, *, dtype=jnp.float32) -> Llama:
    """Build a ``Llama`` from HF-named tensors (``LlamaForCausalLM`` state-dict names and layout, which
    ``Qwen2ForCausalLM`` and ``MistralForCausalLM`` share).

    Args:
      config: the architecture.
      get: ``get(hf_name, expected_shape) -> np.ndarray``; raises for a missing or misshapen tensor.
      dtype: weight dtype of the result.

    Every parameter is assigned from ``get``: the model is created abstractly (no random init).
    """
    np_dtype = jnp.dtype(dtype)
    d = config.hidden_size

    # Assembled on the host (numpy), then one transfer per weight: eager jnp ops per layer would
    # dispatch (and on an accelerator compile) hundreds of small programs.
    def load(name, shape, transpose=False) -> np.ndarray:
        array = np.asarray(get(name, shape))
        return (array.T if transpose else array).astype(np_dtype)

    weights = {
        "embed": load("model.embed_tokens.weight", (config.vocab_size, d)),
        "norm": load("model.norm.weight", (d,)),
        "layers": {name: np.stack([load(f"model.layers.{i}.{_hf_layer_name(name)}", shape[1:][::-1],
                                        transpose=len(shape) == 3)
                                   for i in range(config.num_hidden_layers)])
                   for name, (shape, _) in weight_table(config)["layers"].items()},
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = load("lm_head.weight", (config.vocab_size, d), transpose=True)
    weights = jax.device_put(weights)  # (jnp.asarray would compile a staging program per shape)
    # Built abstractly (no random init), then every parameter is replaced by a loaded array.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype)))
    nnx.replace_by_pure_dict(state, weights)
    unset = [path for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if not isinstance(leaf, jax.Array)]
    if unset:  # a parameter added to Llama without a loading rule above
        raise AssertionError(f"from_hf_tensors left parameters unset: {unset}")
    return nnx.merge(graphdef, state)
