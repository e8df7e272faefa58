"""Building blocks shared by the Llama family: RMSNorm, rotary embeddings (with HF's scaling types)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.config import TRITON_GEMM_MAX_TOKENS
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.grouped import ROW_PARALLEL, tp_size
from jaxvllm.models.int4 import INT4, int4_linear, int4_one_row_partials, offset as int4_offset
from jaxvllm.models.int8 import INT8, int8_linear
from jaxvllm.models.quant import (fp8_gated_fits, fp8_gated_mlp, fp8_linear,
                                  fp8_one_row_partials)
from pallas_kernels import decode_epilogue, invariant_gemm
from pallas_kernels.reference import FP8, GATED_ACTIVATIONS, ordered_sum, split_total


def lora_update(x: jax.Array, mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Each token's LoRA update (x @ A_slot) @ B_slot for all tokens at once: A [in, S*R] and
    B [S*R, out] stack the adapters' slots, `mask` [T, S*R] keeps each token's own slot's columns
    (worker/lora_slots.py)."""
    return ((x @ a) * mask) @ b


def mean_square(x32: jax.Array, invariant: bool = False) -> jax.Array:
    """mean(x32 ** 2) over the last axis, kept; `invariant`: summed in a fixed order."""
    sq = x32 * x32
    if invariant:
        return ordered_sum(sq) / x32.shape[-1]
    return jnp.mean(sq, axis=-1, keepdims=True)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, invariant: bool = False) -> jax.Array:
    # As HF: normalize in float32, cast back, then scale in the activation dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(mean_square(x32, invariant) + eps)
    return weight * y.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclass
class SplitSums:
    """A decode-sized GEMM's output left to the kernel that uses it (add_norm, and the q+k+v
    epilogue of models/llama.py; pallas_kernels/decode_epilogue.py) instead of XLA's kernels:
    [S, T, N] partial sums of S slices of the input (float32: a one-row Pallas GEMM's split-K
    slices) or the whole output as one slice, and the per-output-channel scale still to apply
    (None: none). See split_sums."""
    partials: jax.Array
    scale: Optional[jax.Array]


Output = Union[jax.Array, SplitSums]


def as_array(y: Output, dtype: jnp.dtype) -> jax.Array:
    """A layer's output as an array: a SplitSums' total in `dtype`, as its GEMM would have
    returned it (reference.split_total)."""
    return split_total(y.partials, y.scale, dtype) if isinstance(y, SplitSums) else y


def add_norm(x: jax.Array, delta: Output, weight: jax.Array, eps: float,
             invariant: bool = False) -> tuple[jax.Array, jax.Array]:
    """The residual stream's add and the next RMSNorm: (x + delta, rms_norm(x + delta)). A
    SplitSums delta in one Pallas kernel where its rows fit (decode_epilogue.add_rms_norm,
    interpreted off the GPU)."""
    if (isinstance(delta, SplitSums) and x.ndim == 2
            and decode_epilogue.add_norm_fits(x.shape[1])):
        return decode_epilogue.add_rms_norm(x, delta.partials, delta.scale, weight, eps,
                                            interpret=jax.default_backend() != "gpu")
    x = x + as_array(delta, x.dtype)
    return x, rms_norm(x, weight, eps, invariant)


def rope_inv_freq(cfg: ModelConfig, longrope_factors: str = "short_factor") -> np.ndarray:
    """Inverse frequencies after `linear`/`llama3`/`longrope` scaling (computed once, at trace
    time; `longrope_factors` picks LongRoPE's short or long factors)."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "longrope":
        inv_freq = inv_freq / np.asarray(scaling[longrope_factors], np.float64)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > old_len / low, inv_freq / factor,
                            np.where(wavelen < old_len / high, inv_freq, smoothed))
    return inv_freq.astype(np.float32)


def _dynamic_inv_freq(cfg: ModelConfig, positions: jax.Array) -> jax.Array:
    """Dynamic NTK scaling, per token: HF recomputes the base from the sequence length once it passes
    max_position_embeddings. A paged batch has no single length, so each token uses its own
    position + 1 (identical to HF whenever the sequence fits the original context)."""
    dim = cfg.rotary_dim
    factor = float(cfg.rope_scaling["factor"])
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(positions.astype(jnp.float32) + 1.0, float(max_pos))
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base[:, None] ** exponents[None, :])


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array,
                 token_seq_lens: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [T, rotary_dim] in float32 (HF's non-interleaved, rotate-half layout).
    `token_seq_lens`: each token's sequence length with this step's tokens (LongRoPE takes its long
    factors for a sequence past the original context, as HF does for a forward pass that long)."""
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "dynamic":
        freqs = positions.astype(jnp.float32)[:, None] * _dynamic_inv_freq(cfg, positions)
    elif kind == "longrope":
        long = token_seq_lens > cfg.rope_scaling["original_max_position_embeddings"]
        inv_freq = jnp.where(long[:, None], jnp.asarray(rope_inv_freq(cfg, "long_factor"))[None],
                             jnp.asarray(rope_inv_freq(cfg))[None])
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq
    else:
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    attention_factor = _attention_factor(cfg)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def _attention_factor(cfg: ModelConfig) -> float:
    return float((cfg.rope_scaling or {}).get("attention_factor") or 1.0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, heads, head_dim]; cos/sin: [T, rotary_dim] (the first rotary_dim of each head turn)."""
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    half = rot.shape[-1] // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


# Batch-invariant GEMMs off the GPU kernel's shapes: rows in tiles of this many, each tile its own
# GEMM of one shape, so a row's sums run in the same order whatever the number of rows (XLA picks
# GEMM algorithms, tilings and split-K by shape: on CPU a float32 row came out differently at 1,
# 2-32 and 64+ rows).
INVARIANT_ROWS = 16
# And programs of batch-invariant mode compile with these: with excess precision allowed, XLA drops
# a bf16 rounding between two ops where it fuses them (measured on CPU: the engine's step and the
# dense forward of models/flax_module.py, the same layer code, differed by a bf16 ulp).
INVARIANT_COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


def matmul(x: jax.Array, w: jax.Array, invariant: bool = False,
           out_dtype: Optional[jnp.dtype] = None, *, w_transposed: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N], or with `w_transposed` x @ w.T for w [N, K] (out_dtype: the product's
    unless given); `invariant`: each row's result depends on that row alone (see INVARIANT_ROWS;
    on the GPU one launch of pallas_kernels/invariant_gemm.py)."""
    if not invariant:
        w = w.T if w_transposed else w
        return x @ w if out_dtype is None else jnp.dot(x, w, preferred_element_type=out_dtype)
    out_dtype = out_dtype or jnp.result_type(x, w)
    if jax.default_backend() == "gpu" and invariant_gemm.fits(x.shape[1],
                                                              w.shape[0 if w_transposed else 1]):
        # One launch for every row tile (the per-tile form reads the weight once a tile: 3-8x the
        # plain GEMM at 128 rows on an H200, the kernel 1-1.4x).
        return invariant_gemm.invariant_matmul(x, w, w_transposed=w_transposed).astype(out_dtype)
    return tiled_matmul(x, w, w_transposed=w_transposed).astype(out_dtype)


def tiled_matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool = False) -> jax.Array:
    """Batch-invariant mode's portable GEMM: x's rows in tiles of INVARIANT_ROWS, each tile its
    own float32 GEMM of one shape (`lax.map`)."""
    m, k = x.shape
    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    tiles = jnp.pad(x, ((0, -m % INVARIANT_ROWS), (0, 0))).reshape(-1, INVARIANT_ROWS, k)
    # The transposed weight is contracted as it lies: given as w.T, XLA folds the transpose into
    # the GEMM when there is one tile and copies it out of the loop when there are more, and the
    # two sum a row in different orders (measured on CPU, tied embeddings).
    out = jax.lax.map(
        lambda t: jax.lax.dot_general(t, w, dims, preferred_element_type=jnp.float32), tiles)
    return out.reshape(m + -m % INVARIANT_ROWS, -1)[:m]


def lm_head(hidden: jax.Array, params: dict, cfg: ModelConfig,
            norm: Callable[..., jax.Array] = rms_norm) -> jax.Array:
    """float32 logits of hidden states [N, hidden]: the final `norm`, then the LM head (the
    embedding itself when tied). Batch-invariant: whole tiles of rows from the norm on (a lone
    row's norm sums in another order than a block's)."""
    n = hidden.shape[0]
    if cfg.batch_invariant:
        hidden = jnp.pad(hidden, ((0, -n % INVARIANT_ROWS), (0, 0)))
    h = norm(hidden, params["final_norm"], cfg.rms_norm_eps, cfg.batch_invariant)
    tied = cfg.tie_word_embeddings
    w = params["embed"] if tied else params["lm_head"]
    return matmul(h, w, cfg.batch_invariant, jnp.float32, w_transposed=tied)[:n]


def linear(x: jax.Array, lp: dict, name: str, invariant: bool = False,
           pallas: bool = False, sums: bool = False) -> Output:
    """x @ lp[name] (+ lp[name + "_bias"]); an FP8 weight (with lp[name + "_scale"], stored [out, in],
    models/quant.py) runs as an FP8 matmul, an int4 or int8 one (models/int4.py, models/int8.py)
    dequantized in the GEMM's input. `invariant`: see matmul (unquantized weights only: EngineArgs
    refuses the others); `pallas`: quantized weights may take their Pallas GEMMs
    (ModelConfig.pallas_gemms); `sums`: the output may come as SplitSums (split_sums, never
    under `invariant`: its kernel rounds as XLA's larger buckets need not), for add_norm."""
    split = split_sums(x, lp, name, pallas) if sums and not invariant else None
    if split is not None:
        return split
    return _add_lora(_add_bias(_product(x, lp, name, invariant, pallas), lp, name), x, lp, name)


def split_sums(x: jax.Array, lp: dict, name: str, pallas: bool) -> Optional[SplitSums]:
    """x times lp[name] for a consumer that adds it up in its own Pallas kernel
    (pallas_kernels/decode_epilogue.py): at the decode buckets' rows (up to
    TRITON_GEMM_MAX_TOKENS) on one device where `pallas` allows (ModelConfig.pallas_gemms) and
    nothing is added to the product (a bias, LoRA). An FP8 or int4 weight's one-row Pallas GEMM
    leaves its slices' partial sums (quant.fp8_one_row_partials, int4.int4_one_row_partials);
    other products come whole, as one slice. None elsewhere. `name` may be projections fused at
    load ("q+k+v")."""
    rows = math.prod(x.shape[:-1])
    if (not pallas or rows > TRITON_GEMM_MAX_TOKENS or tp_size() > 1
            or any(n + suffix in lp for n in name.split("+") for suffix in ("_bias", "_lora_a"))):
        return None
    w, scale = lp[name], lp.get(name + "_scale")
    partials = None
    if w.dtype == FP8:
        partials = fp8_one_row_partials(x, w)
    elif w.dtype == INT4:  # its scales are applied in the GEMM, group by group
        partials, scale = int4_one_row_partials(x, w, scale, int4_offset(lp, name),
                                                lp.get(name + "_perm")), None
    if partials is None:
        return SplitSums(_product(x, lp, name, False, pallas).reshape(1, rows, -1), None)
    return SplitSums(partials, scale)


def _product(x: jax.Array, lp: dict, name: str, invariant: bool, pallas: bool) -> jax.Array:
    """x times the weight lp[name] in whichever layout it is stored."""
    w, scale = lp[name], lp.get(name + "_scale")
    if scale is None:
        return matmul(x, w, invariant)
    row = name in ROW_PARALLEL
    if w.dtype == INT4:
        return int4_linear(x, w, scale, int4_offset(lp, name), lp.get(name + "_perm"), pallas, row)
    if w.dtype == INT8:
        return int8_linear(x, w, scale, lp.get(name + "_min"), lp.get(name + "_perm"), pallas, row)
    return fp8_linear(x, w, scale, pallas, row)


def gated_mlp(x: jax.Array, lp: dict, activation: str = "silu",
              names: tuple[str, str, str] = ("gate", "up", "down"), invariant: bool = False,
              pallas: bool = False, sums: bool = False) -> Output:
    """down(act(gate(x)) * up(x)), names = (gate, up, down), act one of GATED_ACTIVATIONS. With
    `pallas` (ModelConfig.pallas_gemms), FP8 weights past the decode buckets take
    quant.fp8_gated_mlp (act(gate) * up quantized for down in one Pallas pass). `sums`: down's
    output may come as SplitSums (see linear)."""
    if pallas and fp8_gated_fits(x, lp, names):
        return fp8_gated_mlp(x, lp, names, activation)
    gate, up = projections(x, lp, names[:2], invariant=invariant, pallas=pallas)
    return linear(GATED_ACTIVATIONS[activation](gate) * up, lp, names[2], invariant, pallas, sums)


def projections(x: jax.Array, lp: dict, names: tuple[str, ...],
                sizes: Optional[tuple[int, ...]] = None, invariant: bool = False,
                pallas: bool = False) -> list[jax.Array]:
    """[linear(x, lp, n) for n in names] for projections of one input (q/k/v, gate/up). Quantized
    ones fused at load (models/fused.py, stored under "+".join(names)) run as one GEMM whose output
    is split: `sizes` are the outputs' widths (None: equal)."""
    key = "+".join(names)
    if key not in lp:
        return [linear(x, lp, n, invariant, pallas) for n in names]
    y = _product(x, lp, key, invariant, pallas)
    cuts = len(names) if sizes is None else np.cumsum(sizes)[:-1].tolist()
    return [_add_lora(_add_bias(y, lp, n), x, lp, n)
            for y, n in zip(jnp.split(y, cuts, axis=-1), names)]


def _add_lora(y: jax.Array, x: jax.Array, lp: dict, name: str) -> jax.Array:
    lora_a = lp.get(name + "_lora_a")  # LoRA adapters' slots (worker/lora_slots.py)
    if lora_a is None:
        return y
    return y + lora_update(x, lp["lora_mask"], lora_a, lp[name + "_lora_b"])


def _add_bias(y: jax.Array, lp: dict, name: str) -> jax.Array:
    bias = lp.get(name + "_bias")
    return y if bias is None else y + bias
