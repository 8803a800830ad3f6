"""A Hugging Face fast tokenizer without transformers: the ``tokenizers`` library and its special tokens.

jaxcl builds the tokenizer of a GGUF file itself (``loading._gguf_tokenizer``). Wrapping it in
transformers' ``PreTrainedTokenizerFast`` would import transformers, which imports torch where torch
is installed: seconds of every run's start on a GPU machine, for a tokenizer that only encodes and
decodes. ``Tokenizer`` answers what jaxcl asks of a tokenizer (``data/tokenization.py``: calls on a
text or a batch of texts, ``eos_token_id``, ``pad_token_id``; ``decode``) with the same results as
``PreTrainedTokenizerFast`` over the same backend; ``to_transformers()`` gives that full
transformers object (chat templates, ``convert_ids_to_tokens``, ...) on demand.

``save_pretrained(folder)`` writes ``tokenizer.json`` and a ``tokenizer_config.json`` that both
``Tokenizer.from_folder`` and transformers' ``AutoTokenizer`` read.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Optional, Sequence, Union

_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
_MARK = "jaxcl_class"  # in tokenizer_config.json: which class wrote the folder


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with named special tokens and an optional chat template.

    Args:
      backend: the ``tokenizers.Tokenizer`` (vocabulary, pre-tokenizer, decoder, added tokens).
      bos_token, eos_token, unk_token, pad_token: the special tokens' strings (None: none).
      chat_template: a Jinja chat template (used by ``apply_chat_template``).

    Examples:
      >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
      >>> backend = Backend(models.WordLevel({"<pad>": 0, "</s>": 1, "hi": 2, "there": 3}, unk_token="<pad>"))
      >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
      >>> tok = Tokenizer(backend, eos_token="</s>", pad_token="<pad>")
      >>> tok("hi there")["input_ids"], tok(["hi", "there hi"])["input_ids"], tok.eos_token_id
      ([2, 3], [[2], [3, 2]], 1)
    """

    def __init__(self, backend, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 unk_token: Optional[str] = None, pad_token: Optional[str] = None,
                 chat_template: Optional[str] = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike]) -> "Tokenizer":
        """The tokenizer ``save_pretrained`` wrote into ``folder``."""
        from tokenizers import Tokenizer as Backend

        folder = pathlib.Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        return cls(Backend.from_file(str(folder / "tokenizer.json")), chat_template=config.get("chat_template"),
                   **{name: config.get(name) for name in _SPECIALS})

    @staticmethod
    def saved_in(folder: Union[str, os.PathLike]) -> bool:
        """Whether ``folder`` holds a tokenizer ``save_pretrained`` of this class wrote."""
        path = pathlib.Path(folder) / "tokenizer_config.json"
        return path.is_file() and json.loads(path.read_text()).get(_MARK) == "Tokenizer"

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", _MARK: type(self).__name__,
                  "chat_template": self.chat_template, **{name: getattr(self, name) for name in _SPECIALS}}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (imports transformers)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.backend, chat_template=self.chat_template,
                                       **{name: getattr(self, name) for name in _SPECIALS})

    # -- the ids of the special tokens ------------------------------------------------------------
    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> Optional[int]:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id(self.pad_token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encoding and decoding --------------------------------------------------------------------
    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True) -> dict:
        """``{"input_ids": ids}`` of one text, or a list of ids per text of a batch."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encodings = self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: Sequence[dict], **kwargs: Any):
        """transformers' ``apply_chat_template`` (through ``to_transformers()``)."""
        return self.to_transformers().apply_chat_template(conversation, **kwargs)
