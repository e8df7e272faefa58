"""int8 weights with group scales (models/int8.py, pallas_kernels/int8_gemm.py): the Pallas GEMM in
interpret mode against its jnp reference and float64 per tiling, what it refuses, per-channel
scales in groups it takes, the fusion of int8 projections beside int4 ones, and (GPU) the compiled
kernel at the 8B shapes."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.models.fused import fuse_projections
from jaxvllm.models.int4 import quantize_int4
from jaxvllm.models.int8 import CHANNEL_GROUP, int8_linear, kernel_groups
from pallas_kernels import int8_gemm, int8_matmul, int8_matmul_reference
from pallas_kernels.int8_gemm import Tiles
from pallas_kernels.triton_rows import input_splits


def _random_int8(rng, n: int, k: int, group: int, with_min: bool = False):
    """Random signed bytes [n, k], float32 scales [k / group, n] (Q8_0's range of values), mins
    (or None) of the same shape, and the weight they hold, float64 [n, k]."""
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = rng.uniform(2e-4, 2e-3, (k // group, n)).astype(np.float32)
    mn = rng.uniform(-0.1, 0.05, scale.shape).astype(np.float32) if with_min else None
    w = q.astype(np.float64) * np.repeat(scale.T.astype(np.float64), group, axis=1)
    if with_min:
        w += np.repeat(mn.T.astype(np.float64), group, axis=1)
    return q, scale, mn, w


@pytest.mark.parametrize("rows, group, tiles, with_min", [
    (1, 32, None, False),                                   # the engine's tiling (default_tiles)
    (5, 32, Tiles(block_n=32, splits=4), False),            # four slices' partial sums
    (16, 64, Tiles(block_n=128, splits=1, groups_per_step=4), False),  # four groups a step
    (50, 32, Tiles(block_m=16, splits=2, groups_per_step=3), False),   # 4 row tiles; 2 a step
    (3, 32, Tiles(dequant="bits"), False),                  # bytes to floats by their bits
    (7, 16, None, True),                                    # a min per group of 16 (Q6_K's size)
    (1, 32, Tiles(dequant="bits", splits=2), True),
    (100, 32, Tiles(block_m=64, splits=1), True),           # past MAX_ROWS: two 64-row tiles
    (5, 32, Tiles(dequant="f16"), False),                   # float16 pairs (emulated here)
    (9, 16, Tiles(dequant="f16", splits=2), True),
    (3, 128, None, True)])                                  # GPTQ's groups, zero points as mins
def test_int8_gemm_kernel_against_reference(rows, group, tiles, with_min):
    """The Pallas GEMM (interpret mode) and its jnp reference against float64: bf16 x, each weight
    rounded once to bf16 after its scale (and min)."""
    rng = np.random.default_rng(rows)
    n, k = 256, 512
    q, scale, mn, w = _random_int8(rng, n, k, group, with_min)
    args = (jnp.asarray(q), jnp.asarray(scale), None if mn is None else jnp.asarray(mn))
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    got = int8_matmul(x, *args, tiles=tiles, interpret=True)
    want = int8_matmul_reference(x, *args)
    assert got.shape == want.shape == (rows, n) and got.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ w.T
    for y in (got, want):
        assert np.abs(np.asarray(y, np.float64) - exact).max() < 0.01 * np.abs(exact).max()


def test_int8_gemm_float32_is_exact_to_float32_rounding():
    """With float32 x the dequantized weight is q * scale in float32 (exact but for that product's
    rounding): the kernel within float32 accumulation error of float64."""
    rng = np.random.default_rng(7)
    q, scale, _, w = _random_int8(rng, 64, 256, 32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    got = int8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), interpret=True)
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_every_byte_through_each_dequantization_is_exact():
    """Every int8 value with a unit scale (and a zero min) through the kernel's dequantizations
    (interpret mode's emulation of the float16 pairs): the value itself."""
    from pallas_kernels.int8_gemm import DEQUANT, dequantize_tile
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(8, 32)
    ones, zeros = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32)
    for how in DEQUANT:
        dtype = jnp.float16 if how == "f16" else jnp.bfloat16
        for mn in (None, zeros):
            w = dequantize_tile(q, ones, mn, how, dtype, asm=False)
            assert w.dtype == dtype
            np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(q, np.float32))


def test_float16_pairs_keep_any_row_magnitude():
    """dequant="f16" runs on float16 inputs made row by row: rows of 1e6 (past float16's 65504)
    and 1e-6 (float16 subnormals) come out as exact as rows of 1, each within bf16's rounding of
    float64 relative to its own row; a zero row stays zero."""
    rng = np.random.default_rng(11)
    q, scale, _, w = _random_int8(rng, 64, 256, 32)
    x = rng.standard_normal((4, 256)) * np.array([[1e6], [1e-6], [1.0], [0.0]])
    xb = jnp.asarray(x, jnp.bfloat16)
    got = np.asarray(int8_matmul(xb, jnp.asarray(q), jnp.asarray(scale),
                                 tiles=Tiles(dequant="f16"), interpret=True), np.float64)
    exact = np.asarray(xb, np.float64) @ w.T
    assert np.isfinite(got).all() and not got[3].any()
    for r in range(3):
        assert np.abs(got[r] - exact[r]).max() < 0.01 * np.abs(exact[r]).max(), r


def test_int8_linear_keeps_leading_dims():
    rng = np.random.default_rng(1)
    q, scale, mn, w = _random_int8(rng, 64, 128, 32, with_min=True)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    y = int8_linear(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), jnp.asarray(mn))
    assert y.shape == (2, 3, 64) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_a_channel_scale_is_repeated_into_groups_the_gemm_takes():
    """A per-channel scale and min (8-bit checkpoints' "channel" strategy: one group of all 512
    inputs, past the kernel's MAX_GROUP) become one per CHANNEL_GROUP inputs holding the same
    weights; groups the kernel takes already stay as they are."""
    rng = np.random.default_rng(2)
    q, scale, mn, w = _random_int8(rng, 64, 512, 512, with_min=True)
    assert not int8_gemm.fits(64, 512, 512)
    s, m = kernel_groups(scale.T, mn.T, 512)  # [out, groups], as the loader holds them
    assert s.shape == m.shape == (64, 512 // CHANNEL_GROUP)
    assert int8_gemm.fits(64, 512, CHANNEL_GROUP)
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(int8_matmul_reference(x, jnp.asarray(q), jnp.asarray(s.T), jnp.asarray(m.T))),
        np.asarray(int8_matmul_reference(x, jnp.asarray(q), jnp.asarray(scale), jnp.asarray(mn))))
    got = int8_matmul(x.astype(jnp.bfloat16), jnp.asarray(q), jnp.asarray(s.T), jnp.asarray(m.T),
                      interpret=True)
    exact = np.asarray(x, np.float64) @ w.T
    assert np.abs(np.asarray(got, np.float64) - exact).max() < 0.01 * np.abs(exact).max()
    small = scale[:, :1].T
    assert kernel_groups(small, None, 256)[0] is small  # within MAX_GROUP: the kernel takes it


def test_int8_gemm_splits_shrink_as_rows_grow():
    """Slices of >= 512 inputs, at most 16, and partial sums of at most an eighth of the weight's
    bytes: 8 slices of 4096 inputs (128 groups of 32) up to 16 rows, 4 at 32, 2 at 64; 16 of
    14336 for one row; one slice where K holds a single slice."""
    share = int8_gemm.PARTIAL_SHARE
    assert [input_splits(m, 4096, 128, share) for m in (1, 16, 32, 64)] == [8, 8, 4, 2]
    assert input_splits(1, 14336, 448, share) == 16 and input_splits(1, 576, 18, share) == 1


def test_int8_gemm_kernel_refuses_what_it_cannot_tile():
    assert int8_gemm.fits(256, 512, 32) and int8_gemm.fits(256, 512, 256)
    assert not int8_gemm.fits(200, 512, 32)    # N not a multiple of the column tile
    assert not int8_gemm.fits(256, 512, 8)     # a group below the tensor cores' 16 inputs
    assert not int8_gemm.fits(256, 480, 48)    # not a power of two
    assert not int8_gemm.fits(256, 1024, 512)  # past MAX_GROUP
    q, scale, _, _ = _random_int8(np.random.default_rng(0), 256, 512, 32)
    args = (jnp.asarray(q), jnp.asarray(scale))
    with pytest.raises(ValueError, match="scale"):
        int8_matmul(jnp.ones((1, 512), jnp.bfloat16), args[0], args[1].T, interpret=True)
    with pytest.raises(ValueError, match="min"):
        int8_matmul(jnp.ones((1, 512), jnp.bfloat16), *args, args[1][:4], interpret=True)
    with pytest.raises(ValueError, match="3 splits"):
        int8_matmul(jnp.ones((1, 512), jnp.bfloat16), *args, tiles=Tiles(splits=3), interpret=True)
    with pytest.raises(ValueError, match="dequant 'f8'"):
        int8_matmul(jnp.ones((1, 512), jnp.bfloat16), *args, tiles=Tiles(dequant="f8"),
                    interpret=True)


def test_fuse_projections_joins_int8_and_keeps_layouts_apart():
    """int8 q/k/v fuse into one weight with their scales side by side (no offsets); gate/up whose
    layouts differ (gate int4, up int8) stay apart, and so do int8 ones with and without mins;
    int8 ones with mins fuse with them."""
    rng = np.random.default_rng(2)
    lp = {}
    for name, n in (("q", 64), ("k", 32), ("v", 32), ("up", 96)):
        q, scale, _, _ = _random_int8(rng, n, 64, 32)
        lp[name], lp[name + "_scale"] = jnp.asarray(q), jnp.asarray(scale)
    lp["gate"], lp["gate_scale"], lp["gate_zero"] = quantize_int4(
        jnp.asarray(rng.standard_normal((64, 96)), jnp.float32), 32)
    fused = fuse_projections({"layers": [dict(lp)]})["layers"][0]
    assert fused["q+k+v"].dtype == jnp.int8 and fused["q+k+v"].shape == (128, 64)
    np.testing.assert_array_equal(fused["q+k+v_scale"],
                                  np.concatenate([lp[n + "_scale"] for n in "qkv"], axis=1))
    assert not any(k.startswith(("q_", "k_", "v_")) or k in "qkv" for k in fused)
    assert "gate+up" not in fused and {"gate", "gate_zero", "up", "up_scale"} <= set(fused)
    for name, n in (("gate", 96), ("up", 96)):
        q, scale, mn, _ = _random_int8(rng, n, 64, 32, with_min=name == "up")
        lp[name], lp[name + "_scale"] = jnp.asarray(q), jnp.asarray(scale)
        if mn is not None:
            lp[name + "_min"] = jnp.asarray(mn)
    lp.pop("gate_zero")
    assert "gate+up" not in fuse_projections({"layers": [dict(lp)]})["layers"][0]
    lp["gate_min"] = jnp.zeros_like(lp["gate_scale"])
    fused = fuse_projections({"layers": [dict(lp)]})["layers"][0]
    np.testing.assert_array_equal(fused["gate+up_min"],
                                  np.concatenate([lp["gate_min"], lp["up_min"]], axis=1))
    assert not {"gate", "up", "gate_min", "up_scale"} & set(fused)


@pytest.mark.gpu
@pytest.mark.parametrize("dequant", int8_gemm.DEQUANT)
@pytest.mark.parametrize("rows, n, k, group, with_min", [
    (1, 6144, 4096, 32, False), (16, 4096, 14336, 32, False), (64, 28672, 4096, 32, False),
    (1, 28672, 4096, 16, False), (8, 6144, 4096, 32, True), (1, 6144, 4096, 128, True)])
def test_gpu_int8_gemm_against_reference(rows, n, k, group, with_min, dequant):
    """Compiled for the GPU at the 8B shapes (q/k/v, down, gate/up), groups of 32 (Q8_0, Q5), 16
    (Q6_K) and 128 (GPTQ; a per-channel scale repeated), with and without mins, bf16 x, each
    dequantization: the Pallas GEMM against float64, and weights read back through unit rows
    within their rounding to bf16 (a wrong group's scale or a shifted column is off by far
    more)."""
    import jax
    rng = np.random.default_rng(n + rows)
    q, scale, mn, w = _random_int8(rng, n, k, group, with_min)
    args = (jnp.asarray(q), jnp.asarray(scale), None if mn is None else jnp.asarray(mn))
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    mm = jax.jit(lambda x, q, s, m: int8_matmul(x, q, s, m, tiles=dataclasses.replace(
        int8_gemm.default_tiles(x.shape[0]), dequant=dequant)))
    got = np.asarray(mm(x, *args), np.float64)
    exact = np.asarray(x, np.float64) @ w.T
    assert np.abs(got - exact).max() < 0.01 * np.abs(exact).max()
    cols = np.sort(rng.choice(k, 64, replace=False))
    w_got = np.asarray(mm(jnp.eye(k, dtype=jnp.bfloat16)[cols], *args), np.float64).T
    bound = 2.0**-7 * np.abs(w[:, cols]) + 1e-9
    if dequant == "f16" and with_min:
        # The scale and the min are rounded to float16 before the fma: an error of a float16
        # unit of each term, which a weight near zero (the two cancelling) does not scale with.
        terms = np.abs(w - np.repeat(mn.T, group, axis=1)) + np.repeat(np.abs(mn.T), group, axis=1)
        bound += 2.0**-10 * terms[:, cols]
    assert (np.abs(w_got - w[:, cols]) <= bound).all()
