"""The gated MLP's activation between FP8 GEMMs in one Pallas pass (pallas_kernels/gated_fp8.py):
the kernel (interpreted here, compiled on GPUs) against its jnp reference and float64, and an FP8
MLP through it (quant.fp8_gated_mlp, as the engine runs it on GPUs) against the same MLP through
XLA's path and against float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.config import TRITON_GEMM_MAX_TOKENS
from jaxvllm.models.fused import fuse_projections
from jaxvllm.models.layers import gated_mlp
from jaxvllm.models.quant import fp8_gated_fits, quantize_fp8
from pallas_kernels.gated_fp8 import chunk_size, gated_fp8
from pallas_kernels.reference import FP8, FP8_MAX, gated_fp8_reference


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _operands(t, n, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    gate = (jax.random.normal(ks[0], (t, n)) * 2e4).astype(jnp.bfloat16)
    up = (jax.random.normal(ks[1], (t, n)) * 2e4).astype(jnp.bfloat16)
    row_scale = jax.random.uniform(ks[2], (t, 1), minval=1e-5, maxval=1e-3)
    gate_scale = jax.random.uniform(ks[3], (n,), minval=1e-4, maxval=1e-3)
    up_scale = jax.random.uniform(ks[4], (n,), minval=1e-4, maxval=1e-3)
    return gate, up, row_scale, gate_scale, up_scale


def _h64(gate, up, row_scale, gate_scale, up_scale, activation):
    g = _f64(gate) * _f64(row_scale) * _f64(gate_scale)
    u = _f64(up) * _f64(row_scale) * _f64(up_scale)
    act = g / (1 + np.exp(-g)) if activation == "silu" else \
        0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    return act * u


@pytest.mark.parametrize("t, n, activation", [(5, 384, "silu"), (3, 2048 * 3, "silu"),
                                              (4, 640, "gelu_tanh")])
def test_kernel_against_reference_and_float64(t, n, activation):
    ops = _operands(t, n)
    ops = (ops[0].at[1].set(0), *ops[1:])  # an all-zero row: zeros out, no NaN
    q, s = gated_fp8(*ops, activation=activation, interpret=True)
    assert q.dtype == FP8 and q.shape == (t, n) and s.shape == (t, 1) and s.dtype == jnp.float32
    rq, rs = gated_fp8_reference(*ops, activation=activation)
    np.testing.assert_allclose(_f64(s), _f64(rs), rtol=1e-6)
    # The same FP8 values but where float32 rounds a value across an e4m3 rounding boundary.
    assert (_f64(q) != _f64(rq)).mean() < 1e-3
    np.testing.assert_allclose(_f64(q), _f64(rq), rtol=2 ** -3)
    h = _h64(*ops, activation)
    np.testing.assert_allclose(_f64(s)[:, 0], np.maximum(np.abs(h).max(1), 1e-12) / FP8_MAX,
                               rtol=1e-5)
    assert (np.abs(_f64(q)).max(1)[np.arange(t) != 1] == FP8_MAX).all()
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 of the scale.
    err = np.abs(_f64(q) * _f64(s) - h)
    assert (err <= 2.0 ** -4 * np.abs(h) + 2.0 ** -9 * _f64(s) * 1.01).all()
    assert not _f64(q)[1].any()


def test_kernel_reads_a_fused_gate_up_by_halves():
    """gate and up side by side (a fused gate+up GEMM's output, one scale vector for both): the
    same bits as the two apart; a width that does not halve into chunks is refused."""
    gate, up, row_scale, gate_scale, up_scale = _operands(3, 640)
    apart = gated_fp8(gate, up, row_scale, gate_scale, up_scale, interpret=True)
    fused = gated_fp8(jnp.concatenate([gate, up], 1), None, row_scale,
                      jnp.concatenate([gate_scale, up_scale]), None, interpret=True)
    for a, b in zip(apart, fused):
        np.testing.assert_array_equal(_f64(a), _f64(b))
    with pytest.raises(ValueError, match="equal halves"):
        gated_fp8(gate[:, :384], None, row_scale, gate_scale[:384], None, interpret=True)


def test_kernel_refuses_what_it_cannot_chunk():
    assert chunk_size(14336) == 2048 and chunk_size(1536) == 512 and chunk_size(96) is None
    assert chunk_size(32768) == 2048 and chunk_size(32768 + 2048) is None  # past the registers
    ops = _operands(2, 96)
    with pytest.raises(ValueError, match="multiple of 128"):
        gated_fp8(*ops, interpret=True)
    with pytest.raises(ValueError, match="activation 'relu'"):
        gated_fp8(*_operands(2, 128), activation="relu", interpret=True)


def _fp8_layer(hidden, inter, seed=1):
    ks = jax.random.split(jax.random.key(seed), 3)
    lp = {}
    for k, (name, shape) in zip(ks, (("gate", (hidden, inter)), ("up", (hidden, inter)),
                                     ("down", (inter, hidden)))):
        lp[name], lp[name + "_scale"] = quantize_fp8(jax.random.normal(k, shape) * 0.05)
    return lp


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fp8_mlp_through_the_kernel_matches_xla_and_float64(activation):
    """pallas=True (the engine on GPUs) takes the kernel past the decode buckets: the result is
    XLA's FP8 MLP (pallas=False) within FP8's rounding of act(gate) * up, and close to the float64
    MLP of the same FP8 weights."""
    hidden, inter, rows = 64, 256, TRITON_GEMM_MAX_TOKENS + 9
    lp = _fp8_layer(hidden, inter)
    x = jax.random.normal(jax.random.key(2), (rows, hidden), jnp.bfloat16)
    assert fp8_gated_fits(x, lp, ("gate", "up", "down"))
    fused = gated_mlp(x, lp, activation, pallas=True)
    plain = gated_mlp(x, lp, activation, pallas=False)
    assert fused.dtype == jnp.bfloat16 and fused.shape == (rows, hidden)
    w = {n: _f64(lp[n]).T * _f64(lp[n + "_scale"]) for n in ("gate", "up", "down")}
    g, u = _f64(x) @ w["gate"], _f64(x) @ w["up"]
    act = g / (1 + np.exp(-g)) if activation == "silu" else \
        0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    exact = (act * u) @ w["down"]
    scale = np.abs(exact).max()
    for y in (fused, plain):  # both quantize x and act(gate) * up per row: a few percent
        assert np.abs(_f64(y) - exact).max() < 0.06 * scale
    assert np.abs(_f64(fused) - _f64(plain)).max() < 0.03 * scale


def test_fp8_mlp_kernel_only_where_it_fits():
    """Not at the decode buckets (weight-only there), not with a bias or LoRA on the MLP, not with
    bf16 weights or an intermediate size the kernel cannot chunk."""
    lp = _fp8_layer(64, 256)
    many = jnp.ones((TRITON_GEMM_MAX_TOKENS + 1, 64), jnp.bfloat16)
    names = ("gate", "up", "down")
    assert fp8_gated_fits(many, lp, names)
    assert not fp8_gated_fits(many[:TRITON_GEMM_MAX_TOKENS], lp, names)
    assert not fp8_gated_fits(many, {**lp, "up_bias": jnp.zeros(256)}, names)
    assert not fp8_gated_fits(many, {**lp, "down_lora_a": jnp.zeros((256, 8))}, names)
    assert not fp8_gated_fits(many, {**lp, "gate": jnp.zeros((256, 64), jnp.bfloat16)}, names)
    assert not fp8_gated_fits(many, _fp8_layer(64, 96), names)
    fused = {k: v for k, v in lp.items() if not k.startswith(("gate", "up"))}  # int4's gate+up
    assert not fp8_gated_fits(many, {**fused, "gate+up": jnp.zeros((512, 32), jnp.uint8)}, names)
    assert fp8_gated_fits(many, fuse_projections({"layers": [lp]})["layers"][0], names)
    assert not fp8_gated_fits(many, fuse_projections({"layers": [_fp8_layer(64, 96)]})[
        "layers"][0], names)


def test_fp8_mlp_with_gate_up_fused_at_load():
    """The engine fuses an FP8 gate and up at load (models/fused.py): the MLP through the kernel
    then runs one GEMM for both and gives what it gave apart, past the decode buckets and in
    them."""
    lp = _fp8_layer(64, 256)
    fused = fuse_projections({"layers": [lp]})["layers"][0]
    assert "gate+up" in fused and "gate" not in fused and fused["gate+up_scale"].shape == (512,)
    for rows in (1, TRITON_GEMM_MAX_TOKENS, TRITON_GEMM_MAX_TOKENS + 9):
        x = jax.random.normal(jax.random.key(rows), (rows, 64), jnp.bfloat16)
        np.testing.assert_allclose(_f64(gated_mlp(x, fused, pallas=True)),
                                   _f64(gated_mlp(x, lp, pallas=True)), rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t, n, activation", [(1, 14336, "silu"), (37, 14336, "silu"),
                                              (512, 7168, "silu"), (300, 1536, "silu"),
                                              (37, 14336, "gelu_tanh")])
def test_gpu_kernel_against_reference(t, n, activation, fused):
    ops = _operands(t, n)
    gated = jax.jit(functools.partial(gated_fp8, activation=activation))
    if fused:  # gate and up side by side, as a fused gate+up GEMM writes them
        gate, up, row_scale, gate_scale, up_scale = ops
        q, s = gated(jnp.concatenate([gate, up], 1), None, row_scale,
                     jnp.concatenate([gate_scale, up_scale]), None)
    else:
        q, s = gated(*ops)
    rq, rs = jax.jit(functools.partial(gated_fp8_reference, activation=activation))(*ops)
    np.testing.assert_allclose(_f64(s), _f64(rs), rtol=1e-5)
    assert (_f64(q) != _f64(rq)).mean() < 1e-3
    np.testing.assert_allclose(_f64(q), _f64(rq), rtol=2 ** -3)
