"""SMAT: sparse interpolated experts over backbone weights, selected from a task embedding (DESIGN §6).

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
  * training is episodic over the tasks seen so far through replay: ``build("smat")`` turns on the
    engine's replay by default (``SMAT.episodic``), and every example — current or replayed — uses
    the embedding of its own task (per-example ``task_ids``), so a batch is a mix of episodes. Within
    a batch each example therefore has its own expert mixture and its own weights
    ``(B, d_in, d_out)`` per site (memory: ``B ×`` the adapted weights, per layer);
  * evaluation of a seen task uses its stored support embedding: like the paper's few-shot
    protocol, SMAT is told which task (support set) a test batch belongs to;
  * a task not trained yet (the engine's forward-transfer evaluation) has no stored support set —
    the engine gives methods no training examples of an unseen task at evaluation — so its embedding
    comes from the evaluation batch's own prompts (unlabelled, transductive). Evaluation batches
    hold one task each, so the whole batch uses the weighting of its first row.
  * the train step count needed by the τ schedule is not given to methods: ``train["step"]``
    counts optimizer steps (``post_update`` adds one; its gradient is zero, so the optimizer leaves
    it alone apart from weight decay, which the rounding in ``post_update`` undoes).

The engine has one optimizer for every trained leaf, while δ, the gate log-odds and the multipliers
want very different step sizes. ``log_alpha`` and the multipliers are therefore stored divided by
``mask_lr_scale`` / ``lagrangian_lr_scale``: under Adam(W) this multiplies their effective learning
rate by that factor (under SGD by its square). Optional knowledge distillation is not implemented.

State: ``train = {"delta": {site: (L_a, d_in, d_out)}, "log_alpha": {site: (E, L_a, d_in, d_out)},
"selector": {"w": (d, h), "k": (h, E)}, "lagrange": {"linear": (E,), "quadratic": (E,)}, "step": ()}``
with ``L_a`` the adapted (upper) layers of the site; ``fixed = {"features": (T, d), "seen": (T,),
"layers": {site: (L,)}}`` (1 on adapted layers; its length is the model's depth for the site).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.kernels import sparse_experts
from jaxcl.methods.base import Method, TaskInfo
from jaxcl.methods.lora_bank import select_sites
from jaxcl.methods.mist import prompt_mean
from jaxcl.models.sites import Adapter, SiteHook


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
def _support_rows(model, input_ids, prompt_mask):
    return _unit(prompt_mean(model, input_ids, prompt_mask))


def _prompt_mask(batch: dict, encoder_decoder: bool) -> np.ndarray:
    mask = np.asarray(batch["attention_mask"]) > 0
    return mask if encoder_decoder else mask & ~(np.asarray(batch["loss_mask"]) > 0)


@dataclasses.dataclass(frozen=True)
class SMAT(Method):
    """Sparse interpolated experts with a task-embedding selector.

    Attributes:
      sites: site-name suffixes to adapt (``lora_bank.select_sites``; T5: e.g. ``attn.q``, ``mlp.wo``).
        Memory grows with E x the adapted weights (gates and their optimizer state) plus, in
        training, batch x the adapted weights (per-example weights): adding the MLP projections
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
        log-odds and the Lagrange multipliers, by reparametrisation (see the module docstring).
    """

    name = "smat"
    episodic: ClassVar[bool] = True  # build() gives it replay of earlier tasks unless asked otherwise
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

    # -- state -----------------------------------------------------------------------------------
    def init(self, key, site_shapes, num_tasks):
        try:
            sites = select_sites(site_shapes, self.sites)
        except ValueError as e:
            raise ValueError(f"smat: {e}") from None
        queries = [shape[1] for name, shape in site_shapes.items() if name.endswith(".q")]
        if not queries:
            raise ValueError(f"smat needs a model with an attention query site (*.q); it has {sorted(site_shapes)}")
        d = queries[0]
        key_gates, key_selector = jax.random.split(key)
        delta, shapes, layers = {}, {}, {}
        for site in sites:
            num_layers, d_in, d_out = site_shapes[site]
            first = int(round(self.first_layer * num_layers))
            delta[site] = jnp.zeros((num_layers - first, d_in, d_out), jnp.float32)
            shapes[site] = (self.num_experts,) + delta[site].shape
            layers[site] = jnp.asarray(np.arange(num_layers) >= first, jnp.float32)
        # One draw cut into pieces: random-normal programs are slow to compile, one per shape.
        sizes = [int(np.prod(shapes[s])) for s in sites]
        flat = sparse_experts.init_log_alpha(key_gates, (sum(sizes),), self.log_alpha_std) / self.mask_lr_scale
        log_alpha = {s: piece.reshape(shapes[s])
                     for s, piece in zip(sites, jnp.split(flat, np.cumsum(sizes)[:-1]))}
        h, e = self.selector_dim, self.num_experts
        draw = jax.random.normal(key_selector, (d * h + h * e,), jnp.float32)
        selector = {"w": draw[: d * h].reshape(d, h), "k": draw[d * h:].reshape(h, e) / math.sqrt(h)}
        # distinct buffers: the train step donates its state, and one buffer cannot be donated twice
        lagrange = {"linear": jnp.zeros((self.num_experts,), jnp.float32),
                    "quadratic": jnp.zeros((self.num_experts,), jnp.float32)}
        train = {"delta": delta, "log_alpha": log_alpha, "selector": selector, "lagrange": lagrange,
                 "step": jnp.zeros((), jnp.float32)}
        fixed = {"features": jnp.zeros((num_tasks, d), jnp.float32), "seen": jnp.zeros((num_tasks,), jnp.float32),
                 "layers": layers}
        return {"train": train, "fixed": fixed}

    def begin_task(self, key, state, task: TaskInfo, site_shapes):
        del key, site_shapes
        features = self.support_features(task)
        fixed = state["fixed"]
        fixed = dict(fixed, features=fixed["features"].at[task.index].set(features),
                     seen=fixed["seen"].at[task.index].set(1.0))
        return {"train": state["train"], "fixed": fixed}

    def support_features(self, task: TaskInfo) -> jax.Array:
        """``(d,)``: unit mean over the first ``support_size`` examples of their unit prompt means."""
        if task.model is None or task.batches is None:
            raise ValueError("smat.begin_task needs TaskInfo.model and TaskInfo.batches for the task embedding")
        rows = []
        for batch in task.batches():
            real = np.asarray(batch["real"], bool)
            prompt = _prompt_mask(batch, task.model.is_encoder_decoder)
            out = _support_rows(task.model, jnp.asarray(batch["input_ids"]), jnp.asarray(prompt))
            rows.append(np.asarray(out)[real])
            if sum(len(r) for r in rows) >= self.support_size:
                break
        rows = np.concatenate(rows)[: self.support_size]
        if not len(rows):
            raise ValueError(f"smat: task {task.name!r} has no training example for its support set")
        return _unit(jnp.asarray(rows.mean(axis=0)))

    # -- pieces of the forward pass --------------------------------------------------------------
    def log_alpha(self, train: dict, site: str) -> jax.Array:
        return train["log_alpha"][site] * self.mask_lr_scale

    def tau(self, step: jax.Array) -> jax.Array:
        return jnp.maximum(self.tau_min, self.tau_start - step / self.tau_steps)

    def selector_logits(self, selector: dict, features: jax.Array) -> jax.Array:
        """``(B, E)`` logits ``l = K e`` with ``e = tanh(f̂ W)``."""
        return jnp.tanh(_unit(features) @ selector["w"]) @ selector["k"]

    def expert_weights(self, train: dict, features: jax.Array, key=None) -> jax.Array:
        """``(B, E)`` expert weights: relaxed-Bernoulli sample (``key``) or its noise-free value."""
        tau = self.tau(jax.lax.stop_gradient(train["step"]))
        logits = self.selector_logits(train["selector"], features)
        if key is not None:
            tiny = jnp.finfo(jnp.float32).eps
            u = jax.random.uniform(key, logits.shape, jnp.float32, tiny, 1.0 - tiny)
            logits = logits + jnp.log(u) - jnp.log1p(-u)
        return _normalise(jax.nn.sigmoid(logits / tau))

    def gates(self, train: dict, site: str, key=None) -> jax.Array:
        """``(E, L_a, d_in, d_out)`` hard-concrete masks: sampled (``key``) or deterministic."""
        return sparse_experts.hard_concrete(key, self.log_alpha(train, site), self.beta, self.zeta, self.gamma,
                                            train=key is not None)

    def expected_density(self, train: dict) -> jax.Array:
        """``(E,)`` expected share of non-zero gates per expert over all adapted entries."""
        nonzero = sum(jnp.sum(sparse_experts.expected_l0(self.log_alpha(train, s), self.beta, self.zeta, self.gamma),
                              axis=(1, 2, 3)) for s in train["log_alpha"])
        size = sum(np.prod(x.shape[1:]) for x in train["log_alpha"].values())
        return nonzero / size

    # -- protocol --------------------------------------------------------------------------------
    def train_ctx(self, model, state, batch):
        del model
        return {"features": state["fixed"]["features"][batch["task_ids"]]}

    def eval_ctx(self, model, state, batch, task):
        fixed = state["fixed"]
        prompt = batch["attention_mask"] > 0

        def from_batch():  # an unseen task: its test prompts are its (unlabelled) support set
            return _unit(jnp.mean(_unit(prompt_mean(model, batch["input_ids"], prompt)), axis=0))

        features = jax.lax.cond(fixed["seen"][task] > 0, lambda: fixed["features"][task], from_batch)
        return {"features": jnp.broadcast_to(features, (prompt.shape[0], features.shape[0]))}

    def adapter(self, state, ctx, key=None):
        train = state["train"]
        sites = list(train["delta"])
        keys = [None] * (len(sites) + 1) if key is None else list(jax.random.split(key, len(sites) + 1))
        weights = self.expert_weights(train, ctx["features"], keys[-1])
        if key is None:
            weights = weights[0]  # evaluation batches hold one task
        params = {}
        for site, k in zip(sites, keys):
            mixed = sparse_experts.interpolate(self.gates(train, site, k), weights)
            if key is None:
                delta = mixed * train["delta"][site]                          # (L_a, d_in, d_out)
            else:
                delta = jnp.moveaxis(mixed, 0, 1) * train["delta"][site][:, None]  # (L_a, B, d_in, d_out)
            below = state["fixed"]["layers"][site].shape[0] - delta.shape[0]
            delta = jnp.concatenate([jnp.zeros((below,) + delta.shape[1:], delta.dtype), delta])
            params[site] = {"delta": delta}
        return Adapter(_HOOK, params, ctx)

    def extra_loss(self, state, base):
        del base
        train = state["train"]
        gap = self.expected_density(train) - (1.0 - self.sparsity)
        lagrange = jax.tree.map(lambda x: x * self.lagrangian_lr_scale, train["lagrange"])
        return jnp.sum(lagrange["linear"] * gap + lagrange["quadratic"] * jnp.square(gap))

    def transform_grads(self, grads, state, key):
        del state, key
        # Gradient ascent on the multipliers: the optimizer descends, so hand it the negated gradient.
        method = dict(grads["method"], lagrange=jax.tree.map(jnp.negative, grads["method"]["lagrange"]))
        return dict(grads, method=method)

    def post_update(self, state):
        train = state["train"]
        low = sparse_experts.LOG_ALPHA_MIN / self.mask_lr_scale
        high = sparse_experts.LOG_ALPHA_MAX / self.mask_lr_scale
        train = dict(train, log_alpha=jax.tree.map(lambda x: jnp.clip(x, low, high), train["log_alpha"]),
                     step=jnp.round(train["step"]) + 1.0)
        return {"train": train, "fixed": state["fixed"]}

    def report(self, state):
        train, fixed = state["train"], state["fixed"]
        zeros = sum(jnp.sum(self.gates(train, s) == 0, axis=(1, 2, 3)) for s in train["log_alpha"])
        size = sum(int(np.prod(x.shape[1:])) for x in train["log_alpha"].values())
        seen = np.flatnonzero(np.asarray(fixed["seen"]) > 0)
        selection = np.asarray(self.expert_weights(train, fixed["features"][seen])) if len(seen) else np.zeros((0,))
        return {
            "sites": list(train["delta"]), "num_experts": self.num_experts, "entries_per_expert": size,
            "sparsity_per_expert": (np.asarray(zeros) / size).round(6).tolist(),
            "expected_density_per_expert": np.asarray(self.expected_density(train)).round(6).tolist(),
            "lagrange_linear": (np.asarray(train["lagrange"]["linear"]) * self.lagrangian_lr_scale).round(6).tolist(),
            "lagrange_quadratic": (np.asarray(train["lagrange"]["quadratic"]) * self.lagrangian_lr_scale).round(6).tolist(),
            "expert_weights_per_task": {str(t): selection[i].round(4).tolist() for i, t in enumerate(seen)},
            "steps": int(train["step"]), "tau": float(self.tau(train["step"])),
        }
