"""Helpers of the Llama-family parity tests (importable by name from this folder's test files)."""
from __future__ import annotations

import numpy as np
import torch


def padded_batches(seed: int = 0, width: int = 12, lengths=(12, 7, 3), vocab: int = 64):
    """``[(ids, mask, left_padded)]``: a right-padded and a left-padded batch of rows of ``lengths``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(lengths), width))
    right = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int64)
    left = right[:, ::-1].copy()
    return [(ids, right, False), (ids, left, True)]


def torch_logits(model, ids, mask, left_padded: bool) -> np.ndarray:
    kwargs = {}
    if left_padded:  # transformers derives positions from the mask only when told
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.float().numpy()


def rel_err(ours, ref, mask) -> float:
    """``max |ours - ref| / max |ref|`` over the real (mask 1) tokens."""
    keep = np.asarray(mask).astype(bool)
    return float(np.abs(ours[keep] - ref[keep]).max() / np.abs(ref[keep]).max())
