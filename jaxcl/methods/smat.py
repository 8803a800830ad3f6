"""SMAT: sparse interpolated experts over backbone weights, selected from a task embedding.

Math: docs/smat.md.

At every adapted site and layer the weight seen by the model is

    θ = θ_pre + m ⊙ δ,    m = Σ_i s_i z_i  (i = 1..E experts)

with ``δ`` a dense delta shared by all experts (init 0), ``z_i`` hard-concrete masks
(``kernels.sparse_experts``: β=2/3, ζ=1.1, γ=−0.1; log α ~ N(0, 0.5) clamped to [ln 0.01, ln 100]
after every step, as CoFi-style L0 training does) and ``s`` the expert weights: a normalised
relaxed-Bernoulli sample (temperature τ) of the selector logits ``l = K e``. The task embedding is
``e = tanh(f̂ W)``, with ``f̂`` the unit-normalised mean, over a task's support examples, of the unit
mean hidden state of the frozen backbone over each prompt (T5: of the encoder output). ``W`` and
``K`` are the trainable selector. τ anneals as ``max(tau_min, tau_start − step / tau_steps)``.
The backbone is never trained, so where ``m = 0`` the weight is θ_pre exactly (``0 ⊙ δ = 0``).

Sparsity: per expert, the expected density ``ρ_i = mean P(z_i ≠ 0)`` (``expected_l0``) over all its
entries is held at ``1 − sparsity`` by a Lagrangian in ``extra_loss``,
``Σ_i λ1_i (ρ_i − t) + λ2_i (ρ_i − t)²``, whose multipliers are trained by gradient ascent
(``transform_grads`` negates their gradient). With log α clamped at ln 0.01 an entry's ρ is at least
0.047, so ρ_i = 0.05 leaves at most ~1% of an expert's entries open at evaluation.

Evaluation is deterministic: gates at their noise-free value (``hard_concrete(train=False)``) and
``s = normalise(sigmoid(l / τ))``.

Mapping the paper's episodes onto the engine:
  * a task's support set is its first ``support_size`` training examples; its embedding input
    ``f_t`` is computed once at ``begin_task`` (the backbone is frozen, so it never changes) and kept
    in ``fixed["features"][t]``;
  * training is episodic over the tasks seen so far through replay: SMAT declares a replay of
    earlier tasks' examples (``replay_fraction``, ``replay_per_task``), and every example — current or replayed — uses
    the embedding of its own task (per-example ``task_ids``), so a batch is a mix of episodes. Within
    a batch each example therefore has its own expert mixture and its own weights
    ``(B, d_in, d_out)`` per site (memory: ``B ×`` the adapted weights, per layer);
  * evaluation of a seen task uses its stored support embedding: like the paper's few-shot
    protocol, SMAT is told which task (support set) a test batch belongs to;
  * a task not trained yet (the engine's forward-transfer evaluation) has no stored support set —
    the engine gives methods no training examples of an unseen task at evaluation — so its embedding
    comes from the evaluation batch's own prompts (unlabelled, transductive). Evaluation batches
    hold one task each, so the whole batch uses the weighting of its first row.
  * τ follows the run's optimizer step (``StepContext.total_step``); evaluation uses τ at the last
    step trained (kept in the fixed state at ``end_task``).

Learning rates: δ, the gate log-odds and the multipliers want very different step sizes, so
``optimizer`` gives the gates and the multipliers the run's optimizer with its updates scaled by
``mask_lr_scale`` / ``lagrangian_lr_scale`` (under Adam: that many times the run's learning rate).
Optional knowledge distillation is not implemented.

State: params ``SMATParams(delta={site: (L_a, d_in, d_out)}, log_alpha={site: (E, L_a, d_in, d_out)},
selector=Selector(w (d, h), k (h, E)), lagrange=Lagrange(linear (E,), quadratic (E,)))`` with ``L_a``
the adapted (upper) layers of the site; fixed ``SMATFixed(features (T, d), seen (T,), steps (),
adapted={site: (L,) bool})``.

References:
  SMAT: sparse interpolated mixture-of-experts meta-tuning (official code:
  github.com/szc12153/sparse_interpolated_experts); hard-concrete gates: Louizos et al., 2018,
  https://arxiv.org/abs/1712.01312.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, final

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl.kernels import sparse_experts
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState, ReplaySpec, TaskInfo
from jaxcl.methods.features import prompt_mask, prompt_mean
from jaxcl.models.sites import Adapter, SiteHook, resolve_sites


class Selector(NamedTuple):
    w: jax.Array   # (d, h)
    k: jax.Array   # (h, E)


class Lagrange(NamedTuple):
    linear: jax.Array     # (E,)
    quadratic: jax.Array  # (E,)


class SMATParams(NamedTuple):
    delta: dict
    log_alpha: dict
    selector: Selector
    lagrange: Lagrange


class SMATFixed(NamedTuple):
    features: jax.Array  # (T, d) each seen task's support embedding input
    seen: jax.Array      # (T,) bool
    steps: jax.Array     # () int32, optimizer steps trained so far (τ at evaluation)
    adapted: dict        # {site: (L,) bool} the layers the experts adapt (its length: the model's depth)


class SMATContext(NamedTuple):
    features: jax.Array  # (B, d)
    tau: jax.Array       # ()


def _add_delta(name, p, w, ctx):
    """The site's weight ``W + Δ``; ``Δ`` is ``(d_in, d_out)`` or per example ``(B, d_in, d_out)``."""
    del name, ctx
    return w.astype(p["delta"].dtype) + p["delta"]


_HOOK = SiteHook(weight_fn=_add_delta)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _normalise(r: jax.Array) -> jax.Array:
    return r / jnp.sum(r, axis=-1, keepdims=True)


@nnx.jit
def _support_rows(model, input_ids, mask):
    return _unit(prompt_mean(model, input_ids, mask))


@final
@dataclasses.dataclass(frozen=True)
class SMAT(Method):
    """Sparse interpolated experts with a task-embedding selector.

    Attributes:
      sites: site names or suffixes to adapt (``models.sites.resolve_sites``; T5: e.g. ``attn.q``,
        ``mlp.wo``). Memory grows with E x the adapted weights (gates and their optimizer state) plus,
        in training, batch x the adapted weights (per-example weights): adding the MLP projections
        multiplies it by ~6.5 on Llama shapes (SmolLM2 with E = 8 then needs over 24 GB on CPU).
      first_layer: adapt the layers from ``round(first_layer · L)`` on (0.5: the upper half).
      num_experts: E.
      sparsity: target share of zeros per expert (as expected density 1 − sparsity).
      beta, zeta, gamma: hard-concrete temperature and stretch.
      log_alpha_std: standard deviation of the initial gate log-odds.
      tau_start, tau_min, tau_steps: τ = max(tau_min, tau_start − step / tau_steps).
      selector_dim: width h of the task embedding.
      support_size: support examples per task for its embedding.
      mask_lr_scale, lagrangian_lr_scale: learning-rate multipliers (under Adam) of the gate
        log-odds and the Lagrange multipliers.
      replay_fraction, replay_per_task: the episodic replay of earlier tasks (see the module docstring).
    """

    name = "smat"
    sites: tuple = ("attn.q", "attn.v")
    first_layer: float = 0.5
    num_experts: int = 8
    sparsity: float = 0.95
    beta: float = 2 / 3
    zeta: float = 1.1
    gamma: float = -0.1
    log_alpha_std: float = 0.5
    tau_start: float = 5.0
    tau_min: float = 0.5
    tau_steps: float = 4000.0
    selector_dim: int = 64
    support_size: int = 16
    mask_lr_scale: float = 30.0
    lagrangian_lr_scale: float = 30.0
    replay_fraction: float = 0.2
    replay_per_task: int = 50

    def __post_init__(self):
        if not 0.0 <= self.first_layer < 1.0:
            raise ValueError(f"smat first_layer must be in [0, 1), got {self.first_layer}")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"smat sparsity must be in (0, 1), got {self.sparsity}")
        if self.num_experts < 1 or self.selector_dim < 1 or self.support_size < 1:
            raise ValueError("smat num_experts, selector_dim and support_size must be >= 1")
        if not (0.0 < self.tau_min <= self.tau_start and self.tau_steps > 0):
            raise ValueError(f"smat needs 0 < tau_min <= tau_start and tau_steps > 0, got "
                             f"{self.tau_min}, {self.tau_start}, {self.tau_steps}")
        if not (self.mask_lr_scale > 0 and self.lagrangian_lr_scale > 0):
            raise ValueError("smat mask_lr_scale and lagrangian_lr_scale must be > 0")
        if not self.sites:
            raise ValueError("smat sites must name at least one site")
        self.replay  # validates the replay options

    @property
    def replay(self):
        return ReplaySpec(self.replay_fraction, self.replay_per_task)

    # -- state -----------------------------------------------------------------------------------
    def init(self, key, model, num_tasks):
        sites = resolve_sites(model.site_shapes, self.sites)
        d = model.hidden_size
        key_gates, key_selector = jax.random.split(key)
        delta, shapes, adapted = {}, {}, {}
        for site in sites:
            num_layers, d_in, d_out = model.site_shapes[site]
            first = int(round(self.first_layer * num_layers))
            delta[site] = jnp.zeros((num_layers - first, d_in, d_out), jnp.float32)
            shapes[site] = (self.num_experts,) + delta[site].shape
            adapted[site] = logical(jnp.arange(num_layers) >= first, ("layers",))
        # One draw cut into pieces: random-normal programs are slow to compile, one per shape.
        sizes = [int(np.prod(shapes[s])) for s in sites]
        flat = sparse_experts.init_log_alpha(key_gates, (sum(sizes),), self.log_alpha_std)
        log_alpha = {s: piece.reshape(shapes[s]) for s, piece in zip(sites, jnp.split(flat, np.cumsum(sizes)[:-1]))}
        h, e = self.selector_dim, self.num_experts
        draw = jax.random.normal(key_selector, (d * h + h * e,), jnp.float32)
        axes = {s: ("layers",) + tuple(model.site_axes[s]) for s in sites}
        params = SMATParams(
            delta={s: logical(v, axes[s]) for s, v in delta.items()},
            log_alpha={s: logical(v, ("experts",) + axes[s]) for s, v in log_alpha.items()},
            selector=Selector(logical(draw[: d * h].reshape(d, h), ("embed", "bottleneck")),
                              logical(draw[d * h:].reshape(h, e) / math.sqrt(h), ("bottleneck", "experts"))),
            # distinct buffers: the train step donates its state, and one buffer cannot be donated twice
            lagrange=Lagrange(logical(jnp.zeros((e,)), ("experts",)), logical(jnp.zeros((e,)), ("experts",))))
        fixed = SMATFixed(logical(jnp.zeros((num_tasks, d)), ("tasks", "embed")),
                          logical(jnp.zeros((num_tasks,), bool), ("tasks",)), logical(jnp.zeros((), jnp.int32), ()),
                          adapted)
        return MethodState(params, fixed)

    def begin_task(self, key, state, task: TaskInfo):
        del key
        features = self.support_features(task)
        fixed = state.fixed
        return state._replace(fixed=fixed._replace(features=fixed.features.at[task.index].set(features),
                                                   seen=fixed.seen.at[task.index].set(True)))

    def end_task(self, state, task):
        return state._replace(fixed=state.fixed._replace(steps=jnp.int32(task.total_steps)))

    def support_features(self, task: TaskInfo) -> jax.Array:
        """``(d,)``: unit mean over the first ``support_size`` examples of their unit prompt means."""
        if task.model is None or task.batches is None:
            raise ValueError("smat.begin_task needs TaskInfo.model and TaskInfo.batches for the task embedding")
        rows = []
        for batch in task.batches():
            real = np.asarray(batch["real"], bool)
            mask = prompt_mask({k: jnp.asarray(batch[k]) for k in ("attention_mask", "loss_mask")},
                               task.model.is_encoder_decoder)
            out = _support_rows(task.model, jnp.asarray(batch["input_ids"]), mask)
            rows.append(np.asarray(out)[real])
            if sum(len(r) for r in rows) >= self.support_size:
                break
        rows = np.concatenate(rows)[: self.support_size]
        if not len(rows):
            raise ValueError(f"smat: task {task.name!r} has no training example for its support set")
        return _unit(jnp.asarray(rows.mean(axis=0)))

    # -- pieces of the forward pass --------------------------------------------------------------
    def tau(self, step: jax.Array) -> jax.Array:
        return jnp.maximum(self.tau_min, self.tau_start - step.astype(jnp.float32) / self.tau_steps)

    def selector_logits(self, selector: Selector, features: jax.Array) -> jax.Array:
        """``(B, E)`` logits ``l = K e`` with ``e = tanh(f̂ W)``."""
        return jnp.tanh(_unit(features) @ selector.w) @ selector.k

    def expert_weights(self, params: SMATParams, features: jax.Array, tau: jax.Array, key=None) -> jax.Array:
        """``(B, E)`` expert weights: relaxed-Bernoulli sample (``key``) or its noise-free value."""
        logits = self.selector_logits(params.selector, features)
        if key is not None:
            tiny = jnp.finfo(jnp.float32).eps
            u = jax.random.uniform(key, logits.shape, jnp.float32, tiny, 1.0 - tiny)
            logits = logits + jnp.log(u) - jnp.log1p(-u)
        return _normalise(jax.nn.sigmoid(logits / tau))

    def gates(self, params: SMATParams, site: str, key=None) -> jax.Array:
        """``(E, L_a, d_in, d_out)`` hard-concrete masks: sampled (``key``) or deterministic."""
        return sparse_experts.hard_concrete(key, params.log_alpha[site], self.beta, self.zeta, self.gamma,
                                            train=key is not None)

    def expected_density(self, params: SMATParams) -> jax.Array:
        """``(E,)`` expected share of non-zero gates per expert over all adapted entries."""
        nonzero = sum(jnp.sum(sparse_experts.expected_l0(la, self.beta, self.zeta, self.gamma), axis=(1, 2, 3))
                      for la in params.log_alpha.values())
        size = sum(np.prod(x.shape[1:]) for x in params.log_alpha.values())
        return nonzero / size

    # -- protocol --------------------------------------------------------------------------------
    def train_ctx(self, model, state, batch, step):
        del model
        return SMATContext(state.fixed.features[batch["task_ids"]], self.tau(step.total_step))

    def eval_ctx(self, model, state, batch):
        fixed = state.fixed
        task = batch["task_ids"][0]  # evaluation batches hold one task each
        mask = batch["attention_mask"] > 0

        def from_batch():  # an unseen task: its test prompts are its (unlabelled) support set
            return _unit(jnp.mean(_unit(prompt_mean(model, batch["input_ids"], mask)), axis=0))

        features = jax.lax.cond(fixed.seen[task], lambda: fixed.features[task], from_batch)
        return SMATContext(jnp.broadcast_to(features, (mask.shape[0], features.shape[0])), self.tau(fixed.steps))

    def adapter(self, state, ctx, key=None):
        params = state.params
        sites = sorted(params.delta)
        keys = [None] * (len(sites) + 1) if key is None else list(jax.random.split(key, len(sites) + 1))
        weights = self.expert_weights(params, ctx.features, ctx.tau, keys[-1])
        if key is None:
            weights = weights[0]  # evaluation batches hold one task
        out = {}
        for site, k in zip(sites, keys):
            mixed = sparse_experts.interpolate(self.gates(params, site, k), weights)
            if key is None:
                delta = mixed * params.delta[site]                                # (L_a, d_in, d_out)
            else:
                delta = jnp.moveaxis(mixed, 0, 1) * params.delta[site][:, None]    # (L_a, B, d_in, d_out)
            below = state.fixed.adapted[site].shape[0] - delta.shape[0]
            delta = jnp.concatenate([jnp.zeros((below,) + delta.shape[1:], delta.dtype), delta])
            out[site] = {"delta": delta}
        return Adapter(_HOOK, out, ctx)

    def extra_loss(self, model, state, batch, step):
        del model, batch, step
        params = state.params
        gap = self.expected_density(params) - (1.0 - self.sparsity)
        return jnp.sum(params.lagrange.linear * gap + params.lagrange.quadratic * jnp.square(gap))

    def transform_grads(self, grads, state, key, step):
        del state, key, step
        # Gradient ascent on the multipliers: the optimizer descends, so hand it the negated gradient.
        method = grads["method"]._replace(lagrange=jax.tree.map(jnp.negative, grads["method"].lagrange))
        return dict(grads, method=method)

    def optimizer(self, tx):
        def labels(params):
            m = params["method"]
            method = SMATParams(jax.tree.map(lambda _: "run", m.delta), jax.tree.map(lambda _: "gates", m.log_alpha),
                                jax.tree.map(lambda _: "run", m.selector), jax.tree.map(lambda _: "lagrange", m.lagrange))
            return {"method": method, "base": jax.tree.map(lambda _: "run", params["base"])}

        return optax.multi_transform({"run": tx, "gates": optax.chain(tx, optax.scale(self.mask_lr_scale)),
                                      "lagrange": optax.chain(tx, optax.scale(self.lagrangian_lr_scale))}, labels)

    def post_update(self, state, step):
        del step
        clipped = jax.tree.map(lambda x: jnp.clip(x, sparse_experts.LOG_ALPHA_MIN, sparse_experts.LOG_ALPHA_MAX),
                               state.params.log_alpha)
        return state._replace(params=state.params._replace(log_alpha=clipped))

    def report(self, state):
        params, fixed = state.params, state.fixed
        zeros = sum(jnp.sum(self.gates(params, s) == 0, axis=(1, 2, 3)) for s in params.log_alpha)
        size = sum(int(np.prod(x.shape[1:])) for x in params.log_alpha.values())
        seen = np.flatnonzero(np.asarray(fixed.seen))
        tau = self.tau(fixed.steps)
        selection = np.asarray(self.expert_weights(params, fixed.features[seen], tau)) if len(seen) else np.zeros((0,))
        return {
            "sites": sorted(params.delta), "num_experts": self.num_experts, "entries_per_expert": size,
            "sparsity_per_expert": (np.asarray(zeros) / size).round(6).tolist(),
            "expected_density_per_expert": np.asarray(self.expected_density(params)).round(6).tolist(),
            "lagrange_linear": np.asarray(params.lagrange.linear).round(6).tolist(),
            "lagrange_quadratic": np.asarray(params.lagrange.quadratic).round(6).tolist(),
            "expert_weights_per_task": {str(t): selection[i].round(4).tolist() for i, t in enumerate(seen)},
            "steps": int(fixed.steps), "tau": float(tau),
        }
