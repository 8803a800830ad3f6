"""A tiny HF-like character tokenizer for the data tests (importable by name from any test file)."""


class CharTokenizer:
    """A tiny HF-like tokenizer: one id per character (ord + 3); 0 pad, 1 BOS, 2 EOS.

    ``add_bos`` / ``add_eos`` say which special tokens it adds by default, like a Llama-style
    (BOS) or T5-style (trailing EOS) tokenizer.
    """

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, add_bos=False, add_eos=False, pad_token_id=0):
        self.add_bos, self.add_eos, self.pad_token_id = add_bos, add_eos, pad_token_id

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):  # a batch, as HF tokenizers take one
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        ids = [ord(c) + 3 for c in text]
        if add_special_tokens:
            ids = [1] * self.add_bos + ids + [2] * self.add_eos
        return {"input_ids": ids}

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)
