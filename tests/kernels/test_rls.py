"""Property tests of jaxcl.kernels.rls: block RLS equals joint ridge regression."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import rls

# (dtype, dims, gamma range, tolerance). float32 uses well-conditioned sizes; float64 also covers tiny
# dims, weak ridge and fewer rows than features.
REGIMES = {
    "float32": (jnp.float32, (48,), (1.0, 100.0), 1e-3),
    "float64": (jnp.float64, (17,), (0.01, 100.0), 1e-4),
}
# Every new shape costs a compilation of the update (~0.2-0.5 s on CPU), so dims and block sizes come
# from small menus; the split of each task into blocks, their order, gamma and the data stay random.
BLOCK_SIZES = (1, 3, 8)
# Jitted: one compilation per shape instead of one per primitive.
update = jax.jit(rls.update)
predict = jax.jit(rls.predict)
add_outputs = jax.jit(rls.add_outputs, static_argnums=1)


@st.composite
def streams(draw, regime):
    _, dims, (gmin, gmax), _ = REGIMES[regime]
    dim = draw(st.sampled_from(dims))
    gamma = draw(st.floats(gmin, gmax))
    n_tasks = draw(st.integers(1, 3))
    tasks = []
    for _ in range(n_tasks):
        blocks = [1] + draw(st.lists(st.sampled_from(BLOCK_SIZES), max_size=5))  # size 1 always included
        tasks.append((sum(blocks), 1, draw(st.permutations(blocks))))  # one output column per task, as Any-SSR
    order = draw(st.permutations(range(n_tasks)))
    return dim, gamma, [tasks[i] for i in order], draw(st.integers(0, 2**32 - 1))


def _joint_ridge(xs, ys, gamma):
    """(ΦᵀΦ + γI)⁻¹ΦᵀY in float64 numpy; task t's targets sit in its own columns, 0 elsewhere."""
    phi = np.concatenate(xs).astype(np.float64)
    total = sum(y.shape[1] for y in ys)
    y_joint = np.zeros((phi.shape[0], total))
    row = col = 0
    for y in ys:
        y_joint[row : row + y.shape[0], col : col + y.shape[1]] = y
        row, col = row + y.shape[0], col + y.shape[1]
    return np.linalg.solve(phi.T @ phi + gamma * np.eye(phi.shape[1]), phi.T @ y_joint)


def _rel_err(w, ref):
    return np.linalg.norm(np.asarray(w, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("regime", sorted(REGIMES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_blockwise_task_stream_equals_joint_ridge(regime, data, x64):
    dtype, *_, tol = REGIMES[regime]
    dim, gamma, tasks, seed = data.draw(streams(regime))
    rng = np.random.default_rng(seed)
    with x64() if dtype == jnp.float64 else contextlib.nullcontext():
        state = rls.init(dim, 0, gamma, dtype=dtype)
        probe = jnp.asarray(rng.standard_normal((5, dim)), dtype)
        xs, ys = [], []
        for n, n_out, blocks in tasks:
            w_before, before = np.asarray(state.W), np.asarray(predict(state, probe))
            state = add_outputs(state, n_out)
            # A new output column never changes the old columns (bit for bit) or their predictions
            # (up to the matmul's summation order, which may depend on the number of columns).
            w_after, after = np.asarray(state.W), np.asarray(predict(state, probe))
            np.testing.assert_array_equal(w_after[:, : w_before.shape[1]], w_before)
            np.testing.assert_array_equal(w_after[:, w_before.shape[1] :], 0.0)
            np.testing.assert_allclose(after[:, : before.shape[1]], before, rtol=1e-6, atol=1e-6)
            x = rng.standard_normal((n, dim)).astype(np.float64)
            y = rng.standard_normal((n, n_out)).astype(np.float64)
            y_wide = np.zeros((n, state.W.shape[1]))
            y_wide[:, -n_out:] = y
            start = 0
            for size in blocks:
                sl = slice(start, start + size)
                state = update(state, jnp.asarray(x[sl], dtype), jnp.asarray(y_wide[sl], dtype))
                start += size
            assert start == n
            xs.append(x.astype(np.dtype(dtype)))
            ys.append(y.astype(np.dtype(dtype)))
            assert state.W.dtype == dtype and state.R.dtype == dtype
            assert _rel_err(state.W, _joint_ridge(xs, ys, gamma)) <= tol
        phi = np.concatenate(xs).astype(np.float64)
        r_ref = np.linalg.inv(phi.T @ phi + gamma * np.eye(dim))
        assert _rel_err(state.R, r_ref) <= tol
        np.testing.assert_array_equal(np.asarray(state.R), np.asarray(state.R).T)


@settings(max_examples=8, deadline=None)
@given(
    dim=st.just(16),
    n_first=st.sampled_from(BLOCK_SIZES),
    n_second=st.sampled_from(BLOCK_SIZES),
    seed=st.integers(0, 2**32 - 1),
)
def test_incremental_columns_equal_columns_present_from_the_start(dim, n_first, n_second, seed):
    """add_outputs pads with exactly the ridge solution for zero targets on the rows already seen."""
    rng = np.random.default_rng(seed)
    x1, x2 = (jnp.asarray(rng.standard_normal((n, dim)), jnp.float32) for n in (n_first, n_second))
    y1, y2, y3 = rng.standard_normal(n_first), rng.standard_normal(n_second), rng.standard_normal(n_second)
    col = lambda *cols: jnp.asarray(np.stack(cols, 1), jnp.float32)  # noqa: E731
    zeros1, zeros2 = np.zeros_like(y1), np.zeros_like(y2)
    grown = update(rls.init(dim, 1, 10.0), x1, col(y1))
    grown = update(add_outputs(grown, 2), x2, col(zeros2, y2, y3))
    full = update(rls.init(dim, 3, 10.0), x1, col(y1, zeros1, zeros1))
    full = update(full, x2, col(zeros2, y2, y3))
    np.testing.assert_allclose(grown.W, full.W, rtol=1e-5, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(
    dim=st.sampled_from((5, 16)),
    n=st.sampled_from((1, 5, 16, 37)),
    block_size=st.sampled_from((1, 3, 16)),
    seed=st.integers(0, 2**32 - 1),
)
def test_update_blocks_equals_sequential_updates(dim, n, block_size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = rng.standard_normal((n, 2)).astype(np.float32)
    start = rls.init(dim, 2, 5.0)
    scanned = rls.update_blocks(start, jnp.asarray(x), jnp.asarray(y), block_size)
    looped = start
    for i in range(0, n, block_size):
        looped = update(looped, jnp.asarray(x[i : i + block_size]), jnp.asarray(y[i : i + block_size]))
    np.testing.assert_allclose(scanned.W, looped.W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scanned.R, looped.R, rtol=1e-4, atol=1e-7)
    assert _rel_err(scanned.W, _joint_ridge([x], [y], 5.0)) <= 1e-3


@settings(max_examples=6, deadline=None)
@given(
    dim=st.just(16),
    n=st.sampled_from((1, 3)),
    pad=st.sampled_from((1, 2)),
    seed=st.integers(0, 2**32 - 1),
)
def test_zero_rows_change_nothing(dim, n, pad, seed):
    """The padding update_blocks relies on: zero rows of X and Y leave R and W unchanged."""
    rng = np.random.default_rng(seed)
    state = update(
        rls.init(dim, 3, 2.0),
        jnp.asarray(rng.standard_normal((n, dim)), jnp.float32),
        jnp.asarray(rng.standard_normal((n, 3)), jnp.float32),
    )
    zeros_x, zeros_y = np.zeros((pad, dim), np.float32), np.zeros((pad, 3), np.float32)
    untouched = update(state, jnp.asarray(zeros_x), jnp.asarray(zeros_y))
    np.testing.assert_array_equal(untouched.R, state.R)  # bit for bit
    np.testing.assert_array_equal(untouched.W, state.W)

    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = rng.standard_normal((n, 3)).astype(np.float32)
    padded = update(state, jnp.asarray(np.pad(x, ((0, pad), (0, 0)))), jnp.asarray(np.pad(y, ((0, pad), (0, 0)))))
    plain = update(state, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(padded.R, plain.R, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(padded.W, plain.W, rtol=1e-5, atol=1e-6)


def test_init_follows_the_default_float_dtype(x64):
    assert rls.init(3, 1, 1.0).R.dtype == jnp.float32
    with x64():
        state = rls.init(3, 1, 1.0)
        assert state.R.dtype == state.W.dtype == jnp.float64
        assert rls.init(3, 1, 1.0, dtype=jnp.float32).W.dtype == jnp.float32
    assert rls.init(3, 1, 1.0, dtype=np.dtype(jnp.bfloat16)).R.dtype == jnp.bfloat16


def test_init_and_shape_errors():
    state = rls.init(4, 2, 0.5)
    np.testing.assert_array_equal(state.R, 2.0 * np.eye(4))
    np.testing.assert_array_equal(state.W, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="gamma"):
        rls.init(4, 2, 0.0)
    with pytest.raises(ValueError, match=r"X must be \(n, 4\)"):
        rls.update(state, jnp.ones((3, 5)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"Y must be \(n, 2\)"):
        rls.update(state, jnp.ones((3, 4)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="block_size"):
        rls.update_blocks(state, jnp.ones((3, 4)), jnp.ones((3, 2)), 0)
