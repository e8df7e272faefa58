"""FP8 weights (W8A8, `quantization="fp8"`): each linear weight stored as float8 e4m3 with one
float32 scale per output channel, each token's activations quantized with their own scale as the
layer runs (but in the smallest decode buckets, weight-only), one FP8 matmul with float32
accumulation, both scales applied to its output.

The layout keeps the weight's name, stores it transposed, [out, in], and adds `<name>_scale` [out]
beside it (models/params.py). [out, in] is the K-major layout cuBLASLt's FP8 GEMM reads both
operands in: with the [in, out] of the model's other weights XLA transposed every FP8 weight on
every step (a copy of the weight, read and written, beside the GEMM that reads it). Tensor
parallelism splits an FP8 weight and its scale by that layout (worker/sharding.py). The embedding,
the LM head, norms and routers stay in the model's dtype.

The experts of mixture-of-experts layers are stored in float8 e4m3 in their own layout, [experts,
in, out] as the model's dtype holds them, with `<name>_scale` [experts, out]: one scale per expert
and output channel. They run weight-only (models/moe.py): the routed-experts kernel converts each
tile in registers, the grouped GEMMs for many rows take the weights dequantized to the model's
dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxvllm.config import QUANTIZATIONS, TRITON_GEMM_MAX_TOKENS
from jaxvllm.models.grouped import TP_AXIS, per_device, tp_size
from pallas_kernels import fp8_matmul_reference
from pallas_kernels.fp8_gemm import fp8_matmul, fp8_partials, one_row_tiles
from pallas_kernels.gated_fp8 import chunk_size, gated_fp8
from pallas_kernels.reference import FP8, quantize_rows_fp8

# The linear weights quantized (the dense MLP, attention, a shared expert).
QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up", "shared_down")
# A mixture-of-experts layer's routed experts, [experts, in, out] (models/params.py).
EXPERTS = ("experts_gate", "experts_up", "experts_down")


@jax.jit
def quantize_fp8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[in, out] -> (float8 e4m3 [out, in], float32 scale [out]) with w.T ~= q * scale[:, None],
    each output channel's largest magnitude mapped to the format's largest (448)."""
    q, scale = quantize_rows_fp8(w.T)  # a row of w.T is an output channel
    return q, scale[:, 0]


@jax.jit
def quantize_experts_fp8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Experts [E, in, out] -> (float8 e4m3 [E, in, out], float32 scale [E, out]), each expert's
    output channels scaled as quantize_fp8 scales a linear's."""
    q, scale = quantize_rows_fp8(jnp.swapaxes(w, 1, 2))
    return jnp.swapaxes(q, 1, 2), scale[..., 0]


def dequantize_experts(w: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """FP8 experts [E, in, out] with their scales [E, out] as `dtype`."""
    return (w.astype(jnp.float32) * scale[:, None, :]).astype(dtype)


def fp8_linear(x: jax.Array, w: jax.Array, scale: jax.Array, kernel: bool = False,
               row_parallel: bool = False) -> jax.Array:
    """x [..., in] (any float dtype) times an FP8 weight [out, in] with its per-output-channel
    scale; each row of x quantized to FP8 with its own scale first, except up to
    TRITON_GEMM_MAX_TOKENS rows, the decode buckets the engine compiles with Triton GEMMs: there x
    stays in its dtype and the Triton GEMM converts the weight in registers (quantizing so few rows
    cost more kernels than the GEMM at batch 1). A user's XLA_FLAGS turning Triton GEMMs off makes
    cuBLAS write a bf16 copy of the weight for those buckets instead. `kernel` (the engine sets it
    on GPUs, ModelConfig.pallas_gemms): one row runs on the Pallas GEMM (pallas_kernels/fp8_gemm.py),
    which read the weight 10-40% faster than XLA's GEMM at one row and slower from 16 (H200, 8B
    shapes; bench/RESULTS.md, "FP8"); under tensor parallelism per device on the weight's shard
    (grouped.per_device; `row_parallel`: split over its inputs, else its outputs). Returns x's
    dtype."""
    rows = math.prod(x.shape[:-1])
    if kernel and rows == 1:
        n, k, tp = *w.shape, tp_size()
        tiles = one_row_tiles(n, k // tp) if row_parallel else one_row_tiles(n // tp, k)
        if tiles is not None:
            mm = functools.partial(fp8_matmul, tiles=tiles,
                                   interpret=jax.default_backend() != "gpu")
            # The scale [out]: a column-parallel weight's split with its outputs, a row-parallel
            # one's whole (it scales the summed outputs).
            y = per_device(mm, x.reshape(1, -1), w, (scale,), row_parallel, (P(TP_AXIS), P()))
            return y.reshape(*x.shape[:-1], n)
    if rows <= TRITON_GEMM_MAX_TOKENS:
        return fp8_matmul_reference(x, w, scale)
    xq, x_scale = quantize_rows_fp8(x)
    return _fp8_product(xq, x_scale, w, scale, x.dtype)


def fp8_one_row_partials(x: jax.Array, w: jax.Array) -> Optional[jax.Array]:
    """fp8_linear's one-row Pallas GEMM on one device left as the float32 partial sums of its
    slices [S, 1, N], before the scale (for pallas_kernels/decode_epilogue.py); None where that
    GEMM does not run: more rows, tensor parallelism, a weight its tiles do not fit."""
    tiles = one_row_tiles(*w.shape)
    if math.prod(x.shape[:-1]) != 1 or tp_size() > 1 or tiles is None:
        return None
    return fp8_partials(x.reshape(1, -1), w, tiles=tiles,
                        interpret=jax.default_backend() != "gpu")


def _fp8_dot(xq: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """FP8 rows [..., in] times an FP8 weight [out, in], no scales, in `dtype`: cuBLASLt's FP8
    GEMM. It writes the model's dtype, not float32: cuBLASLt takes only scalar scales, so the
    token's and the channel's are applied in a pass of their own, and that pass reading float32
    outputs was ~11% of a 16k-token FP8 step (bench/RESULTS.md, "FP8 GEMM outputs in bf16")."""
    return jax.lax.dot_general(xq, w, (((xq.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=dtype)


def _fp8_product(xq: jax.Array, x_scale: jax.Array, w: jax.Array, scale: jax.Array,
                 dtype: Any) -> jax.Array:
    """FP8 rows with their scales [..., 1] times an FP8 weight with its scales [out], in `dtype`."""
    return (_fp8_dot(xq, w, dtype).astype(jnp.float32) * x_scale * scale).astype(dtype)


def fp8_gated_fits(x: jax.Array, lp: dict, names: tuple[str, str, str]) -> bool:
    """Whether fp8_gated_mlp runs the MLP names = (gate, up, down) of layer lp on rows x: all three
    weights FP8 (gate and up apart or fused at load, models/fused.py) and nothing added to their
    products (biases, LoRA), more rows than the decode buckets (which run weight-only), and the
    gate's outputs on each device in whole chunks of the kernel."""
    gate_up = "+".join(names[:2])
    weights = (gate_up, names[2]) if gate_up in lp else names
    if (math.prod(x.shape[:-1]) <= TRITON_GEMM_MAX_TOKENS
            or not all(n in lp and lp[n].dtype == FP8 for n in weights)
            or any(n + suffix in lp for n in names for suffix in ("_bias", "_lora_a"))):
        return False
    width = lp[gate_up].shape[0] // 2 if gate_up in lp else lp[names[0]].shape[0]
    tp = tp_size()
    return width % tp == 0 and chunk_size(width // tp) is not None


def fp8_gated_mlp(x: jax.Array, lp: dict, names: tuple[str, str, str],
                  activation: str) -> jax.Array:
    """down(act(gate(x)) * up(x)) for FP8 weights names = (gate, up, down) (see fp8_gated_fits),
    act(gate) * up quantized for down by one Pallas pass over the gate and up GEMMs' outputs
    (pallas_kernels/gated_fp8.py; interpreted off the GPU) instead of XLA's two. Under tensor
    parallelism per device on its shards of the weights, each device scaling its own slice of
    act(gate) * up (XLA's path scales the whole row: a finer scale, not the same numbers), the
    down products' partial sums added by one all-reduce. gate and up fused at load (never under
    tensor parallelism) run as one GEMM whose output the kernel reads by halves."""
    xq, x_scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    gated = functools.partial(gated_fp8, activation=activation,
                              interpret=jax.default_backend() != "gpu")
    gate_up, down = "+".join(names[:2]), names[2]
    if gate_up in lp:
        hq, h_scale = gated(_fp8_dot(xq, lp[gate_up], x.dtype), None, x_scale,
                            lp[gate_up + "_scale"], None)
        y = _fp8_product(hq, h_scale, lp[down], lp[down + "_scale"], x.dtype)
        return y.reshape(*x.shape[:-1], -1)
    weights = [a for n in names for a in (lp[n], lp[n + "_scale"])]

    def mlp(xq, x_scale, gate, gate_scale, up, up_scale, down, down_scale):
        hq, h_scale = gated(_fp8_dot(xq, gate, x.dtype), _fp8_dot(xq, up, x.dtype), x_scale,
                            gate_scale, up_scale)
        return _fp8_product(hq, h_scale, down, down_scale, x.dtype)

    run = mlp
    if tp_size() > 1:
        split_out, split_in = P(TP_AXIS, None), P(None, TP_AXIS)  # of a weight [out, in]
        run = jax.shard_map(
            lambda *a: jax.lax.psum(mlp(*a), TP_AXIS), mesh=jax.sharding.get_abstract_mesh(),
            in_specs=(P(), P(), split_out, P(TP_AXIS), split_out, P(TP_AXIS), split_in, P()),
            out_specs=P(), check_vma=False)
    return run(xq, x_scale, *weights).reshape(*x.shape[:-1], -1)


def quantize_params(params: dict[str, Any], method: str, consume: bool = False
                    ) -> dict[str, Any]:
    """A new params tree with every weight in QUANTIZED and EXPERTS replaced by its FP8 form plus
    `<name>_scale`; one already in FP8 (weights quantized before) stays as it is, with its scale.
    `consume`: as map_linears's. (New weights for a running model: models/requant.py.)"""
    if method != "fp8":  # integer checkpoints arrive quantized (converters/integer.py)
        raise ValueError(f"quantization {method!r} does not quantize weights on load: only 'fp8' "
                         f"does (one of {QUANTIZATIONS})")
    return map_linears(params, lambda w: {"": w} if w.dtype == FP8 else
                       dict(zip(("", "_scale"), fp8_weight(w))), consume, QUANTIZED + EXPERTS)


def fp8_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A linear [in, out] or experts [E, in, out] weight in its FP8 layout, with its scales."""
    return quantize_experts_fp8(w) if w.ndim == 3 else quantize_fp8(w)


def map_linears(params: dict[str, Any], quantize: Callable[[jax.Array], dict[str, Any]],
                consume: bool = False, names: tuple[str, ...] = QUANTIZED) -> dict[str, Any]:
    """A new params tree with each weight `name` in `names` replaced by the entries
    `quantize(weight)` returns, keyed by suffix ("" for the weight itself, "_scale", ...).
    Without `consume`, `params` is left as it is and loading peaks at the model in its dtype plus
    its quantized copy. With it, each weight replaced is freed as soon as its replacement exists
    (see free_replaced); `params` must not be used afterwards."""
    layers = []
    for lp in params["layers"]:
        lp = dict(lp)
        for name in names:
            if name in lp:
                w = lp.pop(name)
                new = quantize(w)
                lp.update({name + suffix: a for suffix, a in new.items()})
                if consume:
                    free_replaced([w], new.values())
        layers.append(lp)
    return {**params, "layers": layers}


def free_replaced(old: list[jax.Array], new: Any) -> None:
    """Frees the arrays of `old` not in `new` once `new` is computed. A model transformed on its
    device leaf by leaf this way peaks at its size plus one leaf's copy, and new leaves take the
    place of those freed before them: an 8B model quantized to FP8 on an H100 left 6.2 GiB of
    device memory in holes between its weights, 13 GiB when the old tree was dropped whole
    (bench/RESULTS.md; the KV cache's sizing copes with holes, ModelRunner._fit_free_pieces)."""
    new = list(new)
    jax.block_until_ready(new)
    for a in old:
        if not any(a is b for b in new):
            a.delete()
