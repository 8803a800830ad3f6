"""OA-Adapter: soft-threshold budgets, orthogonality penalty and projection, frozen past, full run + plot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxcl import cli
from jaxcl.methods import OAAdapter, TaskInfo
from jaxcl.methods.oa_adapter import soft_threshold
from jaxcl.train import config as jconfig
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import tiny_config

SHAPES = {"attn.q": (3, 12, 10), "attn.v": (3, 12, 6)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_soft_threshold_gives_exact_zeros_below_tau_and_a_gradient_to_tau(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=32).astype(np.float32)
    tau = np.float32(abs(rng.normal()) * 0.8)
    w = rng.normal(size=32).astype(np.float32)
    gamma = np.asarray(soft_threshold(jnp.asarray(g), jnp.asarray(tau)))
    off = np.abs(g) <= tau
    assert np.all(gamma[off] == 0.0)
    np.testing.assert_allclose(gamma[~off], np.sign(g[~off]) * (np.abs(g[~off]) - tau), rtol=1e-6, atol=1e-7)
    d_tau, d_g = jax.grad(lambda t, gg: jnp.sum(w * soft_threshold(gg, t)), argnums=(0, 1))(jnp.asarray(tau), jnp.asarray(g))
    np.testing.assert_allclose(d_tau, -np.sum(np.sign(g[~off]) * w[~off]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_g), np.where(off, 0.0, w), rtol=1e-6)


def _state_with_past(method, seed, num_tasks=4, trained=2):
    """A state whose first ``trained`` slots hold random adapters with some gates switched off."""
    key = jax.random.PRNGKey(seed)
    state = method.init(key, SHAPES, num_tasks)
    for t in range(trained):
        state = method.begin_task(jax.random.fold_in(key, t), state, TaskInfo(t, num_tasks), SHAPES)
        adapters = {}
        for i, (site, cur) in enumerate(sorted(state["train"]["adapter"].items())):
            k = jax.random.fold_in(key, 100 * t + i)
            g = jax.random.uniform(jax.random.fold_in(k, 1), cur["g"].shape, minval=-1.0, maxval=1.0)
            adapters[site] = dict(cur, w2=jax.random.normal(jax.random.fold_in(k, 2), cur["w2"].shape),
                                  g=g / method.gate_lr_multiplier,
                                  tau=jnp.full(cur["tau"].shape, 0.4 / method.gate_lr_multiplier))
        state = method.end_task({"train": {"adapter": adapters}, "fixed": state["fixed"]}, TaskInfo(t, num_tasks))
    return state


def test_r_eff_counts_the_active_gates_and_the_parameters_they_use():
    method = OAAdapter()
    state = _state_with_past(method, seed=1, num_tasks=3, trained=2)
    report = method.report(state)
    used = 0
    for site, (num_layers, d_in, d_out) in SHAPES.items():
        gamma = np.asarray(state["fixed"]["past"][site]["gamma"])  # (L, T, r)
        expected = (gamma != 0).sum(axis=-1).T                    # (T, L)
        assert report["r_eff"][site] == expected.tolist()
        assert 0 < expected[:2].sum() < 2 * num_layers * method.r_max  # some gates on, some off
        assert expected[2].sum() == 0                                  # the untrained slot uses nothing
        used += expected.sum() * (d_in + d_out)
    assert report["adapter_params_used"] == used
    assert report["adapter_params_allocated"] == 3 * sum(L * 8 * (i + o) for L, i, o in SHAPES.values())


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), trained=st.integers(0, 3))
def test_orthogonality_penalty_equals_a_numpy_reference(seed, trained):
    method = OAAdapter(lambda_orth=1.0, l1=0.0)
    state = _state_with_past(method, seed, num_tasks=4, trained=trained)
    rng = np.random.default_rng(seed)
    current = {site: dict(p, w2=jnp.asarray(rng.normal(size=p["w2"].shape), jnp.float32))
               for site, p in state["train"]["adapter"].items()}
    state = {"train": {"adapter": current}, "fixed": state["fixed"]}
    expected = 0.0
    for site, cur in current.items():
        past = state["fixed"]["past"][site]
        for layer in range(SHAPES[site][0]):
            for s in range(trained):
                active = np.asarray(past["gamma"][layer, s]) != 0
                columns = np.asarray(past["w2"][layer, s], np.float64)[:, active]
                expected += np.sum((columns.T @ np.asarray(cur["w2"][layer], np.float64)) ** 2)
    np.testing.assert_allclose(float(method.extra_loss(state, None)), expected, rtol=1e-4, atol=1e-6)


def test_l1_on_the_gates_pushes_the_threshold_up_and_the_gains_down():
    method = OAAdapter(lambda_orth=0.0, l1=1.0)
    state = _state_with_past(method, seed=2, num_tasks=2, trained=0)
    grads = jax.grad(lambda tr: method.extra_loss({"train": tr, "fixed": state["fixed"]}, None))(state["train"])
    for cur in grads["adapter"].values():
        assert np.all(np.asarray(cur["tau"]) < 0)  # descent raises τ
        assert np.all(np.asarray(cur["g"]) > 0)    # and lowers the (positive) gains


def test_hard_projection_makes_the_new_w2_orthogonal_to_past_active_columns_only():
    method = OAAdapter(hard_projection=True)
    state = _state_with_past(method, seed=3, num_tasks=4, trained=2)
    state = method.begin_task(jax.random.PRNGKey(9), state, TaskInfo(2, 4), SHAPES)
    rng = np.random.default_rng(0)
    raw = {site: dict(p, w2=jnp.asarray(rng.normal(size=p["w2"].shape), jnp.float32))
           for site, p in state["train"]["adapter"].items()}
    projected = method.post_update({"train": {"adapter": raw}, "fixed": state["fixed"]})["train"]["adapter"]
    for site, p in projected.items():
        past = state["fixed"]["past"][site]
        for layer in range(SHAPES[site][0]):
            gamma = np.asarray(past["gamma"][layer, :2])
            cols = np.concatenate([np.asarray(past["w2"][layer, s])[:, gamma[s] != 0] for s in range(2)], axis=1)
            # the reference: remove the component in span(active columns), nothing else
            q, _ = np.linalg.qr(cols.astype(np.float64))
            x = np.asarray(raw[site]["w2"][layer], np.float64)
            np.testing.assert_allclose(np.asarray(p["w2"][layer]), x - q @ (q.T @ x), atol=1e-4)
            assert np.abs(cols.T @ np.asarray(p["w2"][layer])).max() < 1e-4


def test_full_run_keeps_past_adapters_bit_identical_and_reports_and_plots_budgets(stream_root, tmp_path, tiny_model):
    cfg = jconfig.from_dict(tiny_config(stream_root, method="oa_adapter", method_args={"hard_projection": True}))
    results = run(cfg, str(tmp_path), model_and_tokenizer=tiny_model, progress=False)
    report = results["method_report"]
    assert set(report["r_eff"]) == {"attn.q", "attn.v"}
    for per_task in report["r_eff"].values():
        counts = np.array(per_task)
        assert counts.shape == (3, 2) and counts.min() >= 0 and counts.max() <= 8 and counts.sum() > 0
    assert 0 < report["adapter_params_used"] <= report["adapter_params_allocated"]

    # Checkpoints after tasks 2 and 3 (the last two kept): training task 3 left slots 0 and 1 untouched,
    # and with hard projection its active W2 columns are orthogonal to theirs.
    ckpt = Checkpointer(str(tmp_path))
    last, _ = ckpt.latest()
    before, after = (ckpt.restore(s, "fixed")["past"] for s in (last - 1, last))
    ckpt.close()
    for site in before:
        for name in ("w1", "w2", "gamma"):
            np.testing.assert_array_equal(np.asarray(before[site][name][:, :2]), np.asarray(after[site][name][:, :2]))
            np.testing.assert_array_equal(np.asarray(before[site][name][:, 2]), 0.0)
        w2, gamma = np.asarray(after[site]["w2"]), np.asarray(after[site]["gamma"])
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
    with pytest.raises(ValueError, match="match no site"):
        OAAdapter(sites=("attn.k2",)).init(jax.random.PRNGKey(0), SHAPES, 2)
