"""Optax optimizers and learning-rate schedules from the run config."""
from __future__ import annotations

import optax

from jaxcl.train.config import TrainConfig


def schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Constant, or linear warm-up then cosine decay to zero over ``total_steps``."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                         optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
        return optax.constant_schedule(cfg.lr)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(total_steps, cfg.warmup_steps + 1))


def optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The per-task optimizer; it only ever sees the trained leaves (see ``step.py``)."""
    lr = schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum))
    if cfg.max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx
