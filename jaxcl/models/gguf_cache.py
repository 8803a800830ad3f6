"""A converted GGUF, kept as a Hugging Face folder so that the next load skips the conversion.

Reading a GGUF is slow where it is least expected: the ``gguf`` package parses every metadata field
(a 49k-token vocabulary and its merges are ~100k small fields), each weight is dequantised in numpy,
and the byte-level BPE tokenizer is built from those fields. The first ``load_model`` of a file
writes what came out (the float32 weights under their Hugging Face names as ``model.safetensors``,
the ``config.json`` the metadata gave, the tokenizer's own files) into a user cache folder; later
loads of the same file (same resolved path, size and modification time) read that folder instead,
which gives the same weights bit for bit and the same tokenizer.

The folder is ``~/.cache/jaxcl/gguf`` unless the environment variable ``JAXCL_MODEL_CACHE`` names
another one, or says ``off``. A file with Llama 3.1 RoPE scaling (a ``rope_freqs`` tensor, which no
``config.json`` field holds exactly) is never cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Optional

import numpy as np

DEFAULT_FOLDER = os.path.join("~", ".cache", "jaxcl", "gguf")
ENV = "JAXCL_MODEL_CACHE"
# Bump when the conversion changes what it produces: older entries are then never read.
# 2: the tokenizer as ``jaxcl.models.tokenizer.Tokenizer`` writes it.
FORMAT = 2


def entry(gguf_path: pathlib.Path) -> Optional[pathlib.Path]:
    """The cache folder of ``gguf_path`` (it may not exist yet), or None when caching is off."""
    setting = os.environ.get(ENV, DEFAULT_FOLDER)
    if setting.lower() in ("", "off", "none", "0"):
        return None
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{FORMAT}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return pathlib.Path(setting).expanduser() / f"{resolved.stem}-{key}"


def tokenizer(folder: pathlib.Path):
    """The cached tokenizer, of the class ``write`` saved: ``jaxcl.models.tokenizer.Tokenizer`` (byte-
    level BPE vocabularies, read without transformers, which would import torch where torch is
    installed: seconds on a GPU machine), else transformers' ``PreTrainedTokenizerFast``."""
    from jaxcl.models.tokenizer import Tokenizer

    if Tokenizer.saved_in(folder):
        return Tokenizer.from_folder(folder)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def write(folder: pathlib.Path, hf_config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], tokenizer) -> None:
    """Write the entry atomically: a reader sees a complete folder or none (a failed write, e.g. a
    full disk, leaves nothing behind and is not an error: the model was loaded all the same)."""
    from safetensors.numpy import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=1))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
