"""OA-Adapter: the threshold held at τ >= 0, budgets, orthogonality penalty and projection, frozen
past adapters, and a full run with its report and plot. (The soft-threshold math itself is tested
in tests/kernels/test_bottleneck.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxcl import cli
from jaxcl.methods import MethodState, ModelInfo, OAAdapter, StepContext, TaskInfo
from jaxcl.methods import axes
from jaxcl.train import config as jconfig
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import EngineSteps, tiny_config, tiny_llama, tiny_stream

SHAPES = {"attn.q": (3, 12, 10), "attn.v": (3, 12, 6)}
MODEL = ModelInfo(SHAPES, {"attn.q": ("embed", "q_heads"), "attn.v": ("embed", "kv_heads")}, 12, False)
STEP = StepContext.start(0, 1, 0)


def _state_with_past(method, seed, num_tasks=4, trained=2):
    """A state whose first ``trained`` slots hold random adapters with some gates switched off."""
    key = jax.random.PRNGKey(seed)
    state = axes.values(method.init(key, MODEL, num_tasks))
    for t in range(trained):
        state = method.begin_task(jax.random.fold_in(key, t), state, TaskInfo(t, num_tasks))
        adapters = {}
        for i, (site, cur) in enumerate(sorted(state.params.items())):
            k = jax.random.fold_in(key, 100 * t + i)
            g = jax.random.uniform(jax.random.fold_in(k, 1), cur.g.shape, minval=-1.0, maxval=1.0)
            adapters[site] = cur._replace(w2=jax.random.normal(jax.random.fold_in(k, 2), cur.w2.shape),
                                          g=g / method.gate_lr_multiplier,
                                          tau=jnp.full(cur.tau.shape, 0.4 / method.gate_lr_multiplier))
        state = method.end_task(state._replace(params=adapters), TaskInfo(t, num_tasks))
    return method.begin_task(jax.random.fold_in(key, trained), state, TaskInfo(trained, num_tasks))


def test_post_update_clamps_a_negative_threshold_to_zero_and_keeps_positive_ones():
    method = OAAdapter()
    state = _state_with_past(method, seed=0, num_tasks=2, trained=0)
    wanted = {"attn.q": jnp.array([-0.3, 0.0, 0.02]), "attn.v": jnp.array([0.05, -1e-6, -2.0])}
    pushed = {site: cur._replace(tau=wanted[site]) for site, cur in state.params.items()}
    out = method.post_update(state._replace(params=pushed), STEP).params
    for site, cur in out.items():
        np.testing.assert_array_equal(cur.tau, np.maximum(np.asarray(wanted[site]), 0.0))
        # with τ = 0 every dimension passes at its own gain: nothing is amplified beyond |g|
        k = method.gate_lr_multiplier
        assert np.all(np.abs(np.asarray(method.gates(cur))) <= np.abs(k * np.asarray(cur.g)) + 1e-7)


def _push_everything_down(step_size):
    """An optimizer whose every update is ``-step_size``: it drives τ below zero in one step."""
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda grads, state, params=None: (
                                            jax.tree.map(lambda g: -step_size * jnp.ones_like(g), grads), state))


def test_a_threshold_the_optimizer_pushes_negative_is_clamped_in_the_engine_step(stream_root, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    stream = tiny_stream(stream_root, tiny_tokenizer)
    method = OAAdapter(dropout=0.0)
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 3))
    state = state._replace(params={s: c._replace(tau=c.tau + 0.01) for s, c in state.params.items()})
    steps = EngineSteps(method, model, _push_everything_down(0.05), stream.spec.max_answer_len)
    feed = stream.train_feed(0, [0], [], None)
    after, _, _ = steps.run(state, [feed(0)], StepContext.start(0, 1, 0))
    for site, cur in after.params.items():
        before = state.params[site]
        # the update was applied (w1 moved by -0.05), τ would be 0.01 - 0.05 < 0 but is held at 0
        np.testing.assert_allclose(cur.w1, np.asarray(before.w1) - 0.05, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(cur.tau, 0.0)


def test_r_eff_counts_the_active_gates_and_the_parameters_they_use():
    method = OAAdapter()
    state = _state_with_past(method, seed=1, num_tasks=3, trained=2)
    report = method.report(state)
    used = 0
    for site, (num_layers, d_in, d_out) in SHAPES.items():
        gamma = np.asarray(state.fixed.past[site].gamma)  # (L, T, r)
        expected = (gamma != 0).sum(axis=-1).T              # (T, L)
        assert report["r_eff"][site] == expected.tolist()
        assert 0 < expected[:2].sum() < 2 * num_layers * method.r_max  # some gates on, some off
        assert expected[2].sum() == 0                                  # the untrained slot uses nothing
        used += expected.sum() * (d_in + d_out)
    assert report["adapter_params_used"] == used
    assert report["adapter_params_allocated"] == 3 * sum(L * 8 * (i + o) for L, i, o in SHAPES.values())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), trained=st.integers(0, 3), side=st.sampled_from(["output", "input", "both"]))
def test_orthogonality_penalty_equals_a_numpy_reference(seed, trained, side):
    method = OAAdapter(lambda_orth=1.0, l1=0.0, orthogonal_to=side)
    state = _state_with_past(method, seed, num_tasks=4, trained=trained)
    rng = np.random.default_rng(seed)
    current = {site: p._replace(w2=jnp.asarray(rng.normal(size=p.w2.shape), jnp.float32))
               for site, p in state.params.items()}
    state = state._replace(params=current)
    expected = 0.0
    for site, cur in current.items():
        past = state.fixed.past[site]
        for layer in range(SHAPES[site][0]):
            for s in range(trained):
                active = np.asarray(past.gamma[layer, s]) != 0
                if side in ("output", "both"):  # past active W2 columns against every current column
                    columns = np.asarray(past.w2[layer, s], np.float64)[:, active]
                    expected += np.sum((columns.T @ np.asarray(cur.w2[layer], np.float64)) ** 2)
                if side in ("input", "both"):  # past active W1 rows against every current row
                    rows = np.asarray(past.w1[layer, s], np.float64)[active]
                    expected += np.sum((rows @ np.asarray(cur.w1[layer], np.float64).T) ** 2)
    assert (expected > 0) == (trained > 0)
    np.testing.assert_allclose(float(method.extra_loss(None, state, {}, STEP)), expected, rtol=1e-4, atol=1e-6)


def test_l1_on_the_gates_pushes_the_threshold_up_and_the_gains_down():
    method = OAAdapter(lambda_orth=0.0, l1=1.0)
    state = _state_with_past(method, seed=2, num_tasks=2, trained=0)
    grads = jax.grad(lambda p: method.extra_loss(None, MethodState(p, state.fixed), {}, STEP))(state.params)
    for cur in grads.values():
        assert np.all(np.asarray(cur.tau) < 0)  # descent raises τ
        assert np.all(np.asarray(cur.g) > 0)    # and lowers the (positive) gains


def test_hard_projection_makes_the_new_w2_orthogonal_to_past_active_columns_only():
    method = OAAdapter(hard_projection=True)
    state = _state_with_past(method, seed=3, num_tasks=4, trained=2)
    rng = np.random.default_rng(0)
    raw = {site: p._replace(w2=jnp.asarray(rng.normal(size=p.w2.shape), jnp.float32)) for site, p in state.params.items()}
    projected = method.post_update(state._replace(params=raw), STEP).params
    for site, p in projected.items():
        past = state.fixed.past[site]
        for layer in range(SHAPES[site][0]):
            gamma = np.asarray(past.gamma[layer, :2])
            cols = np.concatenate([np.asarray(past.w2[layer, s])[:, gamma[s] != 0] for s in range(2)], axis=1)
            # the reference: remove the component in span(active columns), nothing else
            q, _ = np.linalg.qr(cols.astype(np.float64))
            x = np.asarray(raw[site].w2[layer], np.float64)
            np.testing.assert_allclose(np.asarray(p.w2[layer]), x - q @ (q.T @ x), atol=1e-4)
            assert np.abs(cols.T @ np.asarray(p.w2[layer])).max() < 1e-4


@pytest.mark.slow
def test_full_run_keeps_past_adapters_bit_identical_and_reports_and_plots_budgets(stream_root, tmp_path, tiny_model):
    cfg = jconfig.from_dict(tiny_config(stream_root, method="oa_adapter", method_args={"hard_projection": True}))
    results = run(cfg, str(tmp_path), model_and_tokenizer=tiny_model, progress=False)
    report = results["method_report"]
    assert set(report["r_eff"]) == {"attn.q", "attn.v"}
    assert 0 < report["adapter_params_used"] <= report["adapter_params_allocated"]

    # Checkpoints after tasks 2 and 3 (the last two kept): training task 3 left slots 0 and 1 untouched,
    # and with hard projection its active W2 columns are orthogonal to theirs.
    ckpt = Checkpointer(str(tmp_path))
    last, _ = ckpt.latest()
    model_info = ModelInfo.of(tiny_model[0])
    template = axes.values(OAAdapter(hard_projection=True).init(jax.random.PRNGKey(0), model_info, 3)).fixed
    before, after = (ckpt.restore(s, "fixed", template).past for s in (last - 1, last))
    ckpt.close()
    for site in before:
        for name in ("w1", "w2", "gamma"):
            old, new = np.asarray(getattr(before[site], name)), np.asarray(getattr(after[site], name))
            np.testing.assert_array_equal(old[:, :2], new[:, :2])
            np.testing.assert_array_equal(old[:, 2], 0.0)
        w2, gamma = np.asarray(after[site].w2), np.asarray(after[site].gamma)
        assert np.any(w2[:, 2] != 0)
        assert report["r_eff"][site] == (gamma != 0).sum(axis=-1).T.tolist()
        for layer in range(w2.shape[0]):
            old = np.concatenate([w2[layer, s][:, gamma[layer, s] != 0] for s in range(2)], axis=1)
            assert np.abs(old.T @ w2[layer, 2]).max() < 1e-4 * max(1.0, np.abs(w2[layer]).max() ** 2)

    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "budgets.png").stat().st_size > 1000


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="r_max"):
        OAAdapter(r_max=0)
    with pytest.raises(ValueError, match="orthogonal_to"):
        OAAdapter(orthogonal_to="w1")
    with pytest.raises(ValueError, match="tau_init must be >= 0"):
        OAAdapter(tau_init=-0.1)
    with pytest.raises(ValueError, match="match no site"):
        OAAdapter(sites=("attn.k2",)).init(jax.random.PRNGKey(0), MODEL, 2)
