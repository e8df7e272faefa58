"""The one-row decode step's GEMM epilogues (pallas_kernels/decode_epilogue.py, and FP8's GEMM
tails and norm prologues in pallas_kernels/fp8_gemm.py): each kernel (interpreted here, compiled on
GPUs) against its jnp reference, and the references against the model's own XLA path
(models/layers.py, llama.write_kv) and float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.models.layers import apply_rope, rms_norm
from jaxvllm.models.llama import write_kv
from pallas_kernels.decode_epilogue import add_rms_norm, rope_write_kv
from pallas_kernels.fp8_gemm import (ROW_BLOCK_N, fp8_partials, fp8_row_add_norm,
                                     fp8_row_norm_partials, one_row_tiles)
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


def _fp8_weight(key, n, k):
    return (jax.random.normal(key, (n, k)) * k ** -0.5).astype(FP8)


@pytest.mark.parametrize("n, k, dtype", [(256, 1024, jnp.bfloat16), (128, 64, jnp.float32)])
def test_fp8_row_add_norm(n, k, dtype):
    """One row's FP8 GEMM whose last program of each column block adds the slices to the residual
    stream: the stream add_rms_norm writes, the block sums of its squares, the counts zeroed for
    the next call (a second call through them gives the same)."""
    ks = jax.random.split(jax.random.key(n + k), 4)
    w = _fp8_weight(ks[0], n, k)
    scale = jax.random.uniform(ks[1], (n,), minval=1e-2, maxval=2e-2)
    y_in = jax.random.normal(ks[2], (1, k)).astype(dtype)
    residual = (jax.random.normal(ks[3], (1, n)) * 2).astype(dtype)
    counts = jnp.zeros(n // ROW_BLOCK_N, jnp.int32)
    new, ssq, counts = fp8_row_add_norm(y_in, w, scale, residual, counts, interpret=not on_gpu)
    partials = fp8_partials(y_in, w, tiles=one_row_tiles(n, k), interpret=not on_gpu)
    want, _ = add_rms_norm_reference(residual, partials, scale, jnp.ones(n, dtype), 1e-5)
    assert new.dtype == dtype and ssq.shape == counts.shape == (n // ROW_BLOCK_N,)
    np.testing.assert_allclose(_f64(new), _f64(want), rtol=0 if dtype == jnp.bfloat16 else 1e-6)
    np.testing.assert_allclose(_f64(ssq), (_f64(new) ** 2).reshape(-1, ROW_BLOCK_N).sum(1),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts), 0)
    again = fp8_row_add_norm(y_in, w, scale, residual, counts, interpret=not on_gpu)
    for a, b in zip((new, ssq, counts), again):
        np.testing.assert_array_equal(_f64(a), _f64(b))


@pytest.mark.parametrize("n, k, dtype", [(512, 256, jnp.bfloat16), (256, 64, jnp.float32)])
def test_fp8_row_norm_partials(n, k, dtype):
    """The RMSNorm finished by the GEMM from the block sums of squares (the weight in the prologue,
    the factor on the sums, in float32): the partial sums of the GEMM of layers.rms_norm's output
    within its bf16 roundings, and float64's."""
    ks = jax.random.split(jax.random.key(n), 3)
    x = (jax.random.normal(ks[0], (1, k)) * 3).astype(dtype)
    g = (1 + 0.1 * jax.random.normal(ks[1], (k,))).astype(dtype)
    w = _fp8_weight(ks[2], n, k)
    x32 = _f64(x)
    ssq = jnp.asarray((x32 ** 2).reshape(-1, ROW_BLOCK_N).sum(1), jnp.float32)
    got = fp8_row_norm_partials(x, ssq, g, 1e-5, w, interpret=not on_gpu)
    tiles = one_row_tiles(n, k)
    want = fp8_partials(rms_norm(x, g, 1e-5), w, tiles=tiles, interpret=not on_gpu)
    assert got.shape == want.shape == (tiles.splits, 1, n)
    np.testing.assert_allclose(_f64(got), _f64(want), atol=2 ** -7 * np.abs(_f64(want)).max())
    # against float64: the norm, the weight and the GEMM
    normed = x32 / np.sqrt((x32 ** 2).mean() + 1e-5) * _f64(g)
    np.testing.assert_allclose(_f64(got).sum(0), normed @ _f64(w).T,
                               atol=2 ** -6 * np.abs(normed @ _f64(w).T).max())


def test_fp8_row_kernels_refuse_bad_shapes():
    w = _fp8_weight(jax.random.key(0), 128, 64)
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="fp8_row_add_norm"):
        fp8_row_add_norm(x, w, jnp.ones(128), jnp.ones((1, 96)), jnp.zeros(4, jnp.int32),
                         interpret=True)
    with pytest.raises(ValueError, match="fp8_row_add_norm"):
        fp8_row_add_norm(x, w, jnp.ones(128), jnp.ones((1, 128)), jnp.zeros(3, jnp.int32),
                         interpret=True)
    with pytest.raises(ValueError, match="fp8_row_norm_partials"):
        fp8_row_norm_partials(x, jnp.ones(2), jnp.ones(32), 1e-5, w, interpret=True)
    with pytest.raises(ValueError, match="fp8_row_add_norm"):
        fp8_row_add_norm(jnp.ones((2, 64)), w, jnp.ones(128), jnp.ones((1, 128)),
                         jnp.zeros(4, jnp.int32), interpret=True)


@pytest.mark.gpu
def test_fp8_row_kernels_at_the_8b_shape():
    """Compiled at the 8B shape's o (4096 x 4096) and down (4096 x 14336) tails and q+k+v (6144 x
    4096) and gate+up (28672 x 4096) prologues against the references; the tails' counts (atomic
    on the GPU) leave the same outputs call after call."""
    ks = jax.random.split(jax.random.key(1), 6)
    residual = jax.random.normal(ks[0], (1, 4096)).astype(jnp.bfloat16)
    counts = jnp.zeros(4096 // ROW_BLOCK_N, jnp.int32)
    for i, k in enumerate((4096, 14336)):
        w = _fp8_weight(ks[1 + i], 4096, k)
        scale = jnp.full(4096, 1e-2)
        y_in = jax.random.normal(ks[3], (1, k)).astype(jnp.bfloat16)
        outs = [fp8_row_add_norm(y_in, w, scale, residual, counts) for _ in range(8)]
        partials = fp8_partials(y_in, w, tiles=one_row_tiles(4096, k))
        want, _ = add_rms_norm_reference(residual, partials, scale, jnp.ones(4096, jnp.bfloat16),
                                         1e-5)
        for new, ssq, c in outs:
            np.testing.assert_array_equal(_f64(new), _f64(want))
            np.testing.assert_array_equal(_f64(ssq), _f64(outs[0][1]))
            np.testing.assert_array_equal(np.asarray(c), 0)
        counts = outs[-1][2]
    new, ssq, _ = outs[0]
    g = jnp.ones(4096, jnp.bfloat16)
    for n in (6144, 28672):
        w = _fp8_weight(ks[4], n, 4096)
        got = fp8_row_norm_partials(new, ssq, g, 1e-5, w)
        want = fp8_partials(rms_norm(new, g, 1e-5), w, tiles=one_row_tiles(n, 4096))
        np.testing.assert_allclose(_f64(got), _f64(want), atol=2 ** -7 * np.abs(_f64(want)).max())
