"""Optax optimizers and learning-rate schedules from the run config.

The schedule is a pure function of the optimizer's step count and of the task's length, which may
be a traced value: the train step builds its optimizer from ``StepContext.num_steps``, so tasks of
different lengths share one compiled program (the optimizer's state has the same structure for any
length, so ``init`` can use any).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxcl.train.config import TrainConfig


def schedule(cfg: TrainConfig, total_steps) -> optax.Schedule:
    """Constant (after an optional linear warm-up), or linear warm-up then cosine decay to zero at
    ``total_steps`` (a Python int or a traced int32)."""
    warmup = cfg.warmup_steps

    def lr(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = jnp.minimum(1.0, count / warmup) if warmup else 1.0
        if cfg.schedule == "constant":
            return cfg.lr * ramp
        span = jnp.maximum(jnp.asarray(total_steps, jnp.float32) - warmup, 1.0)
        progress = jnp.clip((count - warmup) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return cfg.lr * jnp.where(count < warmup, ramp, cosine)

    return lr


def optimizer(cfg: TrainConfig, total_steps=1) -> optax.GradientTransformation:
    """The per-task optimizer; it only ever sees the trained leaves (see ``step.py``)."""
    lr = schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum))
    if cfg.max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx
