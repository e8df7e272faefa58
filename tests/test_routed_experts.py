"""The routed-experts kernel (Pallas Triton, interpret mode on CPU) against its pure-jnp reference
and XLA's ragged_dot, over float, FP8, int4 and int8 experts, and the MoE layer's padding rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.models import moe
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.int4 import quantize_experts_int4, quantize_int4
from jaxvllm.models.int8 import quantize_experts_int8
from jaxvllm.models.quant import quantize_experts_fp8
from pallas_kernels import routed_experts
from pallas_kernels.reference import routed_swiglu_reference

_TILES = routed_experts.ExpertTiles(bm=16, bk=32, bn=16)


def _weights(key, e, h, i, dtype=jnp.float32):
    ks = jax.random.split(key, 3)
    return (jax.random.normal(ks[0], (e, h, i), dtype) * 0.2,
            jax.random.normal(ks[1], (e, h, i), dtype) * 0.2,
            jax.random.normal(ks[2], (e, i, h), dtype) * 0.2)


@pytest.mark.parametrize("sizes", [
    [0, 3, 0, 0, 1, 0],        # empty experts between picked ones, one-row groups
    [0, 0, 0, 0, 0, 37],       # one expert with more rows than a row tile (three tiles)
    [5, 0, 17, 0, 0, 2],
    [2, 1, 0, 0, 0, 0],        # fewer rows than experts: the grid has one slot per row
])
def test_routed_swiglu_matches_reference_and_ragged_dot(sizes):
    h, i = 64, 96
    sizes = np.array(sizes, np.int32)
    n = int(sizes.sum())
    rows = jax.random.normal(jax.random.key(n), (n, h), jnp.float32)
    w = _weights(jax.random.key(1), len(sizes), h, i)
    got = routed_experts.routed_swiglu(rows, jnp.asarray(sizes), *w, gate_up_tiles=_TILES,
                                       down_tiles=_TILES, interpret=True)
    ref = routed_swiglu_reference(rows, jnp.asarray(sizes), *w)
    xla = moe.grouped_swiglu(rows, jnp.asarray(sizes), *w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(xla), rtol=1e-4, atol=1e-4)


def test_routed_swiglu_leaves_rows_past_the_groups_alone_and_checks_tiles():
    h, i = 64, 96
    sizes = jnp.array([0, 4, 0, 2], jnp.int32)
    rows = jax.random.normal(jax.random.key(0), (9, h), jnp.float32)   # 3 rows in no group
    w = _weights(jax.random.key(2), 4, h, i)
    got = routed_experts.routed_swiglu(rows, sizes, *w, gate_up_tiles=_TILES, down_tiles=_TILES,
                                       interpret=True)
    ref = routed_swiglu_reference(rows, sizes, *w)
    np.testing.assert_allclose(np.asarray(got)[:6], np.asarray(ref)[:6], rtol=1e-4, atol=1e-4)
    narrow = _weights(jax.random.key(2), 4, h, 40)
    assert not routed_experts.fits(narrow[0], narrow[2], None, _TILES, _TILES)
    with pytest.raises(ValueError, match=r"\(4, 40, 64\).*do not fit"):
        routed_experts.routed_swiglu(rows, sizes, *_weights(jax.random.key(2), 4, h, 40),
                                     gate_up_tiles=_TILES, down_tiles=_TILES, interpret=True)


def _moe_layer(e=6, k=2, h=64, i=96):
    cfg = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=16, hidden_size=h,
                      intermediate_size=h, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32,
                      rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                      num_experts=e, num_experts_per_tok=k, moe_intermediate_size=i,
                      norm_topk_prob=True)
    ks = jax.random.split(jax.random.key(3), 2)
    gate, up, down = _weights(ks[0], e, h, i)
    lp = {"router": jax.random.normal(ks[1], (h, e)), "experts_gate": gate, "experts_up": up,
          "experts_down": down}
    return cfg, lp


def test_moe_padding_tokens_join_no_group():
    """Padding tokens (from num_tokens on) reach no expert: the experts see only the real tokens'
    rows, the real tokens' outputs are unchanged and the padding tokens' are zero."""
    cfg, lp = _moe_layer()
    x = jax.random.normal(jax.random.key(4), (8, 64))
    seen = []

    def spy(rows, group_sizes, *w):
        seen.append(int(jnp.sum(group_sizes)))
        return moe.grouped_swiglu(rows, group_sizes, *w)

    full = moe.moe(cfg, lp, x, spy)
    padded = moe.moe(cfg, lp, x, spy, num_tokens=jnp.int32(3))
    assert seen == [16, 6]
    np.testing.assert_allclose(np.asarray(padded[:3]), np.asarray(full[:3]), rtol=1e-5, atol=1e-6)
    assert not np.asarray(padded[3:]).any()


def test_moe_layer_with_the_routed_kernel_masks_undefined_rows():
    """The layer over the routed kernel (whose rows past the groups hold garbage: NaN here) equals
    the layer over XLA's ragged_dot, padding included."""
    cfg, lp = _moe_layer()
    x = jax.random.normal(jax.random.key(5), (8, 64))

    def routed(rows, group_sizes, *w):
        out = routed_experts.routed_swiglu(rows, group_sizes, *w, gate_up_tiles=_TILES,
                                           down_tiles=_TILES, interpret=True)
        in_group = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)
        return jnp.where(in_group[:, None], out, jnp.nan)

    got = moe.moe(cfg, lp, x, routed, num_tokens=jnp.int32(5))
    want = moe.moe(cfg, lp, x, moe.grouped_swiglu, num_tokens=jnp.int32(5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def _check_quantized(rows, sizes, q, quant, w, bound):
    """The routed kernel over quantized experts `q` with their companions `quant` equals its
    reference and XLA's grouped GEMM over them dequantized (bf16: XLA's path rounds the
    dequantized weights and gate's and up's outputs to bf16), and stays within `bound` (of the
    largest output) of the float experts `w` it was quantized from."""
    assert routed_experts.fits(q[0], q[2], quant, _TILES, _TILES)
    got = routed_experts.routed_swiglu(rows, sizes, *q, quant, gate_up_tiles=_TILES,
                                       down_tiles=_TILES, interpret=True)
    ref = routed_swiglu_reference(rows, sizes, *q, quant)
    xla = moe.grouped_swiglu(rows, sizes, *q, quant)
    f32 = lambda a: np.asarray(a, np.float32)
    tol = (1e-4 if rows.dtype == jnp.float32 else 2e-2) * np.abs(f32(ref)).max()
    np.testing.assert_allclose(f32(got), f32(ref), rtol=0, atol=tol)
    np.testing.assert_allclose(f32(xla), f32(ref), rtol=0, atol=tol)
    exact = f32(routed_swiglu_reference(rows.astype(jnp.float32), sizes, *w))
    assert np.abs(f32(got) - exact).max() < bound * np.abs(exact).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_experts_read_as_stored_match_their_dequantized_weights(dtype):
    """FP8 experts (a scale per expert and output column): the routed kernel, which converts each
    tile in registers and scales its columns, equals the reference on the same FP8 weights and
    XLA's grouped GEMM over the weights dequantized; all within FP8's rounding of the float
    weights."""
    h, i = 64, 96
    sizes = jnp.array([3, 0, 17, 0, 1, 2], jnp.int32)
    rows = jax.random.normal(jax.random.key(7), (23, h), jnp.float32).astype(dtype)
    w = _weights(jax.random.key(8), 6, h, i)
    q, scales = zip(*(quantize_experts_fp8(a) for a in w))
    scales = tuple((s,) for s in scales)
    assert all(a.dtype == jnp.float8_e4m3fn for a in q)
    _check_quantized(rows, sizes, q, scales, w, 0.08)


@pytest.mark.parametrize("dtype,offset,float_down", [
    (jnp.float32, "zero", False), (jnp.bfloat16, "zero", False), (jnp.bfloat16, "min", False),
    (jnp.float32, "min", True)])  # down unquantized, as a GGUF's down in more bits loads
def test_int4_experts_read_at_four_bits_match_their_dequantized_weights(dtype, offset,
                                                                        float_down):
    """int4 experts (each expert packed as an int4 linear, [E, out, in/2], a scale and a zero
    point or min per group of 32 inputs): the routed kernel, which splits each step's bytes into
    two tiles of weights in registers, equals the reference and XLA's grouped GEMM over the
    weights dequantized, two groups of gate's and up's inputs and three of down's."""
    h, i = 64, 96
    sizes = jnp.array([3, 0, 17, 0, 1, 2], jnp.int32)
    rows = jax.random.normal(jax.random.key(9), (23, h), jnp.float32).astype(dtype)
    w = _weights(jax.random.key(10), 6, h, i)
    if offset == "zero":
        packed = [quantize_experts_int4(a, 32) for a in w]
    else:
        packed = [jax.vmap(lambda e: quantize_int4(e, 32, "min"))(a) for a in w]
    q, quant = [p[0] for p in packed], [p[1:] for p in packed]
    assert q[0].shape == (6, i, h // 2) and quant[2][0].shape == (6, i // 32, h)
    if float_down:
        q[2], quant[2] = w[2], ()
    quant = tuple(quant)
    _check_quantized(rows, sizes, q, quant, w, 0.25)  # 16 levels a group


@pytest.mark.parametrize("dtype,with_min,group", [(jnp.float32, False, 32),
                                                  (jnp.bfloat16, True, 16)])
def test_int8_experts_read_at_a_byte_match_their_dequantized_weights(dtype, with_min, group):
    """int8 experts (each expert in the int8 linear layout, [E, out, in], a scale and maybe a min
    per group of inputs; up without the min where gate has one, down at 4 bits: each weight's
    companions its own): the routed kernel, a group a reduction step, equals the reference and
    XLA's grouped GEMM over the weights dequantized."""
    h, i = 64, 96
    sizes = jnp.array([3, 0, 17, 0, 1, 2], jnp.int32)
    rows = jax.random.normal(jax.random.key(11), (23, h), jnp.float32).astype(dtype)
    w = _weights(jax.random.key(12), 6, h, i)
    gate, up = (quantize_experts_int8(a, group, with_min=m) for a, m in ((w[0], with_min),
                                                                        (w[1], False)))
    down = quantize_experts_int4(w[2], 32)
    q = (gate[0], up[0], down[0])
    quant = (tuple(a for a in gate[1:] if a is not None), (up[1],), down[1:])
    assert q[0].dtype == jnp.int8 and q[0].shape == (6, i, h)
    _check_quantized(rows, sizes, q, quant, w, 0.25)


def test_int4_experts_in_activation_order():
    """int4 experts quantized in activation order (GPTQ's desc_act): gate's and up's inputs
    stored in one order per expert, `order` [E, H]. The routed kernel, which gathers each row's
    features into its expert's order, its reference over the gathered rows, and XLA's grouped
    GEMM, which puts the dequantized weights' inputs back in order, all compute the float experts
    (the order unused, they do not)."""
    h, i, e = 64, 96, 6
    sizes = jnp.array([3, 0, 17, 0, 1, 2], jnp.int32)
    rows = jax.random.normal(jax.random.key(13), (23, h), jnp.float32)
    w = _weights(jax.random.key(14), e, h, i)
    order = jnp.stack([jax.random.permutation(jax.random.key(15 + j), h) for j in range(e)])
    order = order.astype(jnp.int32)
    stored = [jnp.take_along_axis(a, order[:, :, None], axis=1) for a in w[:2]]
    packed = [quantize_experts_int4(a, 32) for a in (*stored, w[2])]
    q, quant = [p[0] for p in packed], tuple(p[1:] for p in packed)
    exact = np.asarray(routed_swiglu_reference(rows, sizes, *w))
    got = routed_experts.routed_swiglu(rows, sizes, *q, quant, order, gate_up_tiles=_TILES,
                                       down_tiles=_TILES, interpret=True)
    ref = routed_swiglu_reference(routed_experts.ordered_rows(rows, sizes, order), sizes, *q,
                                  quant)
    xla = moe.grouped_swiglu(rows, sizes, *q, quant, order)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), rtol=0, atol=1e-4 * scale)
    assert np.abs(np.asarray(got) - exact).max() < 0.25 * scale
    assert np.abs(np.asarray(moe.grouped_swiglu(rows, sizes, *q, quant)) - exact).max() \
        > 0.5 * scale
