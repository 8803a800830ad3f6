"""Silence transformers' import-time notice "PyTorch was not found. Models won't be available ...".

jaxcl uses transformers for tokenizers and configs only and never for its torch models, so on a
torch-free install the notice is wrong about what matters to the user. Only that message is
dropped; every other transformers warning still shows. Imported first by ``jaxcl/__init__.py``,
before anything imports transformers.
"""
import logging

NOTICE = "PyTorch was not found."


class _NoTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOTICE)


# transformers logs from its library root logger, named "transformers"
logging.getLogger("transformers").addFilter(_NoTorchNotice())
