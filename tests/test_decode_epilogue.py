"""The one-row decode step's GEMM epilogues (pallas_kernels/decode_epilogue.py): each kernel
(interpreted here, compiled on GPUs) against its jnp reference, and the references against the
model's own XLA path (models/layers.py, llama.write_kv) and float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.models.layers import apply_rope, rms_norm
from jaxvllm.models.llama import write_kv
from pallas_kernels.decode_epilogue import add_rms_norm, rope_write_kv
from pallas_kernels.reference import FP8, add_rms_norm_reference, rope_write_kv_reference

on_gpu = jax.default_backend() == "gpu"


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _partials(key, slices, t, n, scaled):
    ks = jax.random.split(key, 2)
    partials = jax.random.normal(ks[0], (slices, t, n)) * (300.0 if scaled else 0.5)
    scale = jax.random.uniform(ks[1], (n,), minval=1e-3, maxval=4e-3) if scaled else None
    return partials, scale


def _total(partials, scale, dtype):
    y = partials.sum(0)
    return (y if scale is None else y * scale).astype(dtype)


@pytest.mark.parametrize("t, h, slices, scaled, dtype", [
    (1, 256, 4, True, jnp.bfloat16), (3, 128, 1, False, jnp.bfloat16),
    (1, 64, 2, True, jnp.float32)])
def test_add_rms_norm(t, h, slices, scaled, dtype):
    ks = jax.random.split(jax.random.key(t * h + slices), 3)
    x = (jax.random.normal(ks[0], (t, h)) * 3).astype(dtype)
    partials, scale = _partials(ks[1], slices, t, h, scaled)
    weight = (1 + 0.1 * jax.random.normal(ks[2], (h,))).astype(dtype)
    new, normed = add_rms_norm(x, partials, scale, weight, 1e-5, interpret=not on_gpu)
    ref_new, ref_normed = add_rms_norm_reference(x, partials, scale, weight, 1e-5)
    assert new.dtype == dtype and normed.dtype == dtype and new.shape == normed.shape == (t, h)
    # The residual add: the same but for the order of the slices' float32 sum (hidden by the
    # rounding to bf16, not in float32).
    np.testing.assert_allclose(_f64(new), _f64(ref_new), rtol=0 if dtype == jnp.bfloat16 else 1e-6,
                               atol=0 if dtype == jnp.bfloat16 else 1e-6)
    # The norm: float32 sums in another order, one rounding to the dtype apart at most.
    np.testing.assert_allclose(_f64(normed), _f64(ref_normed), rtol=2 ** -7, atol=1e-6)
    # The reference is the model's path: the GEMM's output added, then layers.rms_norm.
    model_new = x + _total(partials, scale, dtype)
    np.testing.assert_array_equal(_f64(ref_new), _f64(model_new))
    np.testing.assert_array_equal(_f64(ref_normed), _f64(rms_norm(model_new, weight, 1e-5)))
    x64 = _f64(model_new)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * _f64(weight)
    np.testing.assert_allclose(_f64(normed), want, rtol=2 ** -6, atol=1e-5)


def test_add_rms_norm_refuses_bad_shapes():
    x = jnp.ones((1, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="add_rms_norm"):
        add_rms_norm(x, jnp.ones((2, 1, 96)), None, jnp.ones(96, jnp.bfloat16), 1e-5,
                     interpret=True)
    with pytest.raises(ValueError, match="add_rms_norm"):
        add_rms_norm(jnp.ones((1, 64)), jnp.ones((2, 2, 64)), None, jnp.ones(64), 1e-5,
                     interpret=True)


def _rope_case(t, slices, scaled, cache_dtype, heads=4, kv_heads=2, d=16, blocks=6, bs=4,
               seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    n = (heads + 2 * kv_heads) * d
    partials, scale = _partials(ks[0], slices, t, n, scaled)
    angles = jax.random.uniform(ks[1], (t, d // 2), maxval=6.0)
    emb = jnp.concatenate([angles, angles], axis=-1)
    caches = [(jax.random.normal(k, (blocks, bs, kv_heads, d)) * 2).astype(cache_dtype)
              for k in ks[2:4]]
    slots = jax.random.permutation(ks[4], blocks * bs)[:t].astype(jnp.int32)
    slots = slots.at[-1].set(blocks * bs) if t > 1 else slots  # a padding token: not written
    return partials, scale, jnp.cos(emb), jnp.sin(emb), slots, *caches


@pytest.mark.parametrize("t, slices, scaled, cache_dtype", [
    (1, 4, True, jnp.bfloat16), (3, 1, False, jnp.bfloat16), (2, 2, True, FP8)])
def test_rope_write_kv(t, slices, scaled, cache_dtype):
    heads, kv_heads, d = 4, 2, 16
    partials, scale, cos, sin, slots, k_cache, v_cache = _rope_case(t, slices, scaled,
                                                                    cache_dtype, heads, kv_heads, d)
    old_k, old_v = np.asarray(_f64(k_cache)), np.asarray(_f64(v_cache))
    q, kc, vc = jax.jit(lambda *a: rope_write_kv(*a, num_heads=heads, dtype=jnp.bfloat16,
                                                 interpret=not on_gpu))(
        partials, scale, cos, sin, slots, k_cache, v_cache)
    rq, rk, rv = rope_write_kv_reference(partials, scale, cos, sin, slots, k_cache, v_cache,
                                         num_heads=heads, dtype=jnp.bfloat16)
    assert q.shape == (t, heads, d) and q.dtype == jnp.bfloat16
    assert kc.dtype == vc.dtype == cache_dtype
    # The rotation's two products and their sum rounded once (float32) or each (the reference's
    # bf16 arithmetic, as XLA on a CPU runs it): a few bf16 roundings of the operands apart, and
    # one e4m3 rounding more for an FP8 cache.
    close = lambda a, b, rtol: np.testing.assert_allclose(  # noqa: E731
        _f64(a), _f64(b), rtol=rtol, atol=2 ** -7 * np.abs(_f64(b)).max())
    close(q, rq, 2 ** -7)
    close(kc, rk, 2 ** -3 if cache_dtype == FP8 else 2 ** -7)
    np.testing.assert_array_equal(_f64(vc), _f64(rv))
    written = np.zeros(old_k.shape[:2], bool).reshape(-1)
    written[np.asarray(slots)[np.asarray(slots) < written.size]] = True
    untouched = ~written.reshape(old_k.shape[:2])
    np.testing.assert_array_equal(_f64(kc)[untouched], old_k[untouched])
    np.testing.assert_array_equal(_f64(vc)[untouched], old_v[untouched])
    # The reference is the model's path: the heads split, layers.apply_rope, llama.write_kv.
    y = _total(partials, scale, jnp.bfloat16).reshape(t, heads + 2 * kv_heads, d)
    mq = apply_rope(y[:, :heads], cos, sin)
    mk = write_kv(k_cache, apply_rope(y[:, heads:heads + kv_heads], cos, sin), slots)
    mv = write_kv(v_cache, y[:, heads + kv_heads:], slots)
    for got, want in ((rq, mq), (rk, mk), (rv, mv)):
        np.testing.assert_array_equal(_f64(got), _f64(want))


def test_rope_write_kv_against_float64():
    t, heads, kv_heads, d = 2, 4, 2, 16
    partials, scale, cos, sin, slots, k_cache, v_cache = _rope_case(
        t, 2, True, jnp.float32, heads, kv_heads, d, seed=3)
    slots = slots.at[-1].set(5)
    q, kc, vc = rope_write_kv(partials, scale, cos, sin, slots, k_cache, v_cache,
                              num_heads=heads, dtype=jnp.float32, interpret=not on_gpu)
    y = (_f64(partials).sum(0) * _f64(scale)).reshape(t, heads + 2 * kv_heads, d)
    c, s = _f64(cos)[:, None], _f64(sin)[:, None]
    rot = lambda h: h * c + np.concatenate([-h[..., d // 2:], h[..., :d // 2]], -1) * s  # noqa: E731
    np.testing.assert_allclose(_f64(q), rot(y[:, :heads]), rtol=1e-5, atol=1e-5)
    bs = k_cache.shape[1]
    for i, slot in enumerate(np.asarray(slots)):
        np.testing.assert_allclose(_f64(kc)[slot // bs, slot % bs], rot(y[:, heads:heads + kv_heads])[i],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_f64(vc)[slot // bs, slot % bs], y[i, heads + kv_heads:],
                                   rtol=1e-5, atol=1e-5)


def test_rope_write_kv_refuses_bad_shapes():
    partials, scale, cos, sin, slots, k_cache, v_cache = _rope_case(1, 1, False, jnp.bfloat16)
    with pytest.raises(ValueError, match="rope_write_kv"):
        rope_write_kv(partials, scale, cos, sin, slots, k_cache, v_cache, num_heads=3,
                      dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="rope_write_kv"):
        rope_write_kv(partials, scale, cos[:, :8], sin, slots, k_cache, v_cache, num_heads=4,
                      dtype=jnp.bfloat16, interpret=True)


@pytest.mark.gpu
def test_epilogues_at_the_8b_shape():
    """Compiled at the 8B shape's sizes (hidden 4096, 32 query and 8 KV heads of 128, FP8's
    one-row slices), against the references."""
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (1, 4096)).astype(jnp.bfloat16)
    partials, scale = _partials(ks[1], 4, 1, 4096, True)
    weight = jnp.ones(4096, jnp.bfloat16)
    for got, want in zip(add_rms_norm(x, partials, scale, weight, 1e-5),
                         add_rms_norm_reference(x, partials, scale, weight, 1e-5)):
        np.testing.assert_allclose(_f64(got), _f64(want), rtol=2 ** -7, atol=1e-6)
    for cache_dtype in (jnp.bfloat16, FP8):
        case = _rope_case(1, 4, True, cache_dtype, 32, 8, 128, blocks=64, bs=16)
        got = rope_write_kv(*case, num_heads=32, dtype=jnp.bfloat16)
        want = rope_write_kv_reference(*case, num_heads=32, dtype=jnp.bfloat16)
        for g, w in zip(got, want):  # as test_rope_write_kv's tolerances
            np.testing.assert_allclose(_f64(g), _f64(w), rtol=2 ** -3,
                                       atol=2 ** -7 * np.abs(_f64(w)).max())
