"""Pure-jnp reference for ragged paged attention (same signature as the kernel).

Used as the correctness reference for the Pallas kernel and by the engine on CPU.
``make_attention_batch`` builds the random batches that the kernel tests and the kernel
benchmark feed to both.

Formulation: every token knows its sequence (segment id, from ``query_start_loc``)
and its absolute position. Keys are streamed through the block tables in chunks of
``_CHUNK_BLOCKS`` blocks with an online (flash-style) softmax in float32, so the
work is O(T * max_context) and the live memory is O(T * chunk), never
O(T * max_blocks_per_seq * block_size). The loop runs only up to the longest
actual context in the batch (a traced trip count), not to the static table width.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Keys per loop step = _CHUNK_BLOCKS * block_size.
_CHUNK_BLOCKS = 8
# Keys per loop step in batch-invariant mode, whatever the block size and table width: where the
# online softmax rescales is part of a token's result.
INVARIANT_CHUNK_KEYS = 128
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_metadata(query_start_loc, num_seqs, num_tokens):
    """Per-token sequence id, validity, and the per-sequence query lengths.

    Returns (seq_ids[T] int32 clamped to [0, R-1], valid[T] bool, q_lens[R] int32).
    Tokens at or beyond query_start_loc[num_seqs] are padding (valid=False).
    """
    R = query_start_loc.shape[0] - 1
    qsl = query_start_loc.astype(jnp.int32)
    n = jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32)
    r_ids = jnp.arange(R, dtype=jnp.int32)
    q_lens = jnp.where(r_ids < n, qsl[1:] - qsl[:-1], 0)
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # seq of token t = number of r in [1, R] with qsl[r] <= t, i.e. searchsorted right - 1.
    # (compare_all: no while loop, which would cost a host round trip per step on GPU)
    seq_ids = jnp.searchsorted(qsl[1:], tok, side="right",
                               method="compare_all").astype(jnp.int32)
    valid = (tok < qsl[n]) & (seq_ids < n)
    seq_ids = jnp.clip(seq_ids, 0, R - 1)
    return seq_ids, valid, q_lens


def ordered_sum(x):
    """x summed over its last axis (kept, of size 1) in one fixed order: a pairwise tree of
    elementwise adds. XLA picks a reduction's order by how it fuses it (on CPU a row read through
    a gather was summed otherwise than a row read whole); adds of two halves it cannot reorder.
    For batch-invariant mode."""
    width = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << (width - 1).bit_length()) - width)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


def chunked_attention(qf, key_chunk, pos, kv_len, n_chunks, chunk_keys, *,
                      sliding_window=None, logits_soft_cap=None, invariant=False):
    """Each token's attention over its own context, `chunk_keys` keys per loop step with an online
    softmax in float32: the one computation of the reference and of the dense training forward's
    batch-invariant mode (models/flax_module.py), so both sum in the same order.

    qf: float32 [T, Hkv, G, D], already scaled; key_chunk(c) -> float32 (k, v) [T, chunk_keys, Hkv,
    D], token t's keys at context positions c * chunk_keys + [0, chunk_keys); pos: int32[T], each
    token's position (it sees keys at positions <= pos); kv_len: int32[T], keys past it are not
    there; n_chunks: loop steps (traced, or a Python int: then the loop is differentiable);
    invariant: the softmax denominators summed in a fixed order (ordered_sum).
    Returns float32 [T, Hkv, G, D], zeros for a token that sees no key."""
    T, Hkv, G, D = qf.shape

    def body(c, carry):
        m, l, acc = carry
        kc, vc = key_chunk(c)
        kpos = c * chunk_keys + jnp.arange(chunk_keys, dtype=jnp.int32)     # [CK]
        s = jnp.einsum("tkgd,tskd->tkgs", qf, kc,
                       precision=lax.Precision.HIGHEST)
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            mask &= (pos[:, None] - kpos[None, :]) < sliding_window
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + (ordered_sum(p)[..., 0] if invariant else p.sum(-1))
        acc = acc * corr[..., None] + jnp.einsum(
            "tkgs,tskd->tkgd", p, vc, precision=lax.Precision.HIGHEST)
        return m_new, l, acc

    m0 = jnp.full((T, Hkv, G), _MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((T, Hkv, G), jnp.float32)
    a0 = jnp.zeros((T, Hkv, G, D), jnp.float32)
    _, l, acc = lax.fori_loop(0, n_chunks, body, (m0, l0, a0))
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "logits_soft_cap", "invariant"))
def ragged_paged_attention_reference(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs, *,
    sm_scale, sliding_window=None, logits_soft_cap=None, invariant=False):
    """Ragged paged attention, pure jnp. See pallas_kernels.ragged_paged_attention.

    q: [T, Hq, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D];
    kv_lens: int32[R]; block_tables: int32[R, max_blocks]; query_start_loc: int32[R+1];
    num_seqs: int32[1]. Returns [T, Hq, D] in q.dtype (padding rows are zeros here).
    invariant: batch-invariant mode: INVARIANT_CHUNK_KEYS keys per loop step (a multiple of
    block_size) whatever the table's width, and sums in a fixed order (see chunked_attention).
    """
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    R, MB = block_tables.shape
    G = Hq // Hkv
    if not invariant:
        CB = min(_CHUNK_BLOCKS, MB)
    elif INVARIANT_CHUNK_KEYS % BS:
        raise ValueError(f"batch-invariant attention needs a block size that divides "
                         f"{INVARIANT_CHUNK_KEYS}, got {BS}")
    else:
        CB = INVARIANT_CHUNK_KEYS // BS
    CK = CB * BS

    seq_ids, valid, q_lens = token_metadata(query_start_loc, num_seqs, T)
    kv_lens = kv_lens.astype(jnp.int32)
    qsl = query_start_loc.astype(jnp.int32)
    tok = jnp.arange(T, dtype=jnp.int32)
    tok_kv_len = jnp.where(valid, kv_lens[seq_ids], 0)
    # absolute position of each new token
    pos = tok_kv_len - q_lens[seq_ids] + (tok - qsl[seq_ids])
    tok_tables = block_tables.astype(jnp.int32)[seq_ids]          # [T, MB]

    def key_chunk(c):
        blk = jnp.minimum(c * CB + jnp.arange(CB, dtype=jnp.int32), MB - 1)   # [CB]
        phys = jnp.take_along_axis(
            tok_tables, jnp.broadcast_to(blk, (T, CB)), axis=1)  # [T, CB]
        return (k_cache[phys].astype(jnp.float32).reshape(T, CK, Hkv, D),
                v_cache[phys].astype(jnp.float32).reshape(T, CK, Hkv, D))

    qf = q.astype(jnp.float32).reshape(T, Hkv, G, D) * sm_scale
    n_chunks = (jnp.max(tok_kv_len) + CK - 1) // CK
    out = chunked_attention(qf, key_chunk, pos, tok_kv_len, n_chunks, CK,
                            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                            invariant=invariant)
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(T, Hq, D).astype(q.dtype)


@dataclass(frozen=True)
class AttentionBatch:
    """A random batch in the kernel's argument layout."""
    q: jax.Array                                   # [T, Hq, D]
    caches: list[tuple[jax.Array, jax.Array]]      # `copies` independent (k_cache, v_cache) pairs
    metadata: tuple[jax.Array, ...]                # kv_lens, block_tables, query_start_loc, num_seqs
    num_tokens: int                                # rows of q that are real tokens (the rest pad)
    host: Optional[dict[str, np.ndarray]] = None   # float64 q/k/v and the metadata (host_values)

    @property
    def args(self) -> tuple[jax.Array, ...]:
        """The positional arguments of the kernel and the reference, with the first cache."""
        return (self.q, *self.caches[0], *self.metadata)


def make_attention_batch(q_lens: Sequence[int], kv_lens: Sequence[int], *, num_q_heads: int,
                         num_kv_heads: int, head_dim: int, block_size: int,
                         dtype: jnp.dtype = jnp.float32, T: Optional[int] = None,
                         R: Optional[int] = None, spare_columns: int = 0, spare_blocks: int = 1,
                         copies: int = 1, seed: int = 0, host_values: bool = False) -> AttentionBatch:
    """Sequence r has q_lens[r] new tokens at the end of kv_lens[r] tokens of context; T query rows
    and R sequence slots (default: exactly enough), the rest padding. Each block table has
    `spare_columns` columns beyond the longest context, and the blocks are a random permutation of
    R * columns + spare_blocks cache blocks (non-contiguous, some never referenced).

    Values ~ N(0, 1): by default drawn on the device in `dtype` (cheap at benchmark sizes; `copies`
    caches let a benchmark rotate inputs larger than L2); with `host_values`, drawn in float64 with
    numpy and kept in `.host` for a float64 reference (one copy).
    """
    assert all(0 < ql <= kl for ql, kl in zip(q_lens, kv_lens))
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    R = R or n
    T = T or int(sum(q_lens))
    columns = max(-(-k // block_size) for k in kv_lens) + spare_columns
    num_blocks = R * columns + spare_blocks
    qsl = np.zeros(R + 1, np.int32)
    qsl[1:n + 1] = np.cumsum(q_lens)
    qsl[n + 1:] = qsl[n]
    kvl = np.zeros(R, np.int32)
    kvl[:n] = kv_lens
    bt = rng.permutation(num_blocks)[:R * columns].reshape(R, columns).astype(np.int32)
    num_seqs = np.array([n], np.int32)
    metadata = tuple(jnp.asarray(a) for a in (kvl, bt, qsl, num_seqs))
    q_shape, cache_shape = (T, num_q_heads, head_dim), (num_blocks, block_size, num_kv_heads, head_dim)
    if host_values:
        assert copies == 1
        q, k, v = (rng.standard_normal(s) for s in (q_shape, cache_shape, cache_shape))
        host = dict(q=q, k=k, v=v, kv_lens=kvl, block_tables=bt, qsl=qsl, num_seqs=num_seqs)
        return AttentionBatch(jnp.asarray(q, dtype), [(jnp.asarray(k, dtype), jnp.asarray(v, dtype))],
                              metadata, int(qsl[n]), host)
    kq, *kk = jax.random.split(jax.random.PRNGKey(seed), 1 + 2 * copies)
    caches = [(jax.random.normal(kk[2 * c], cache_shape, dtype),
               jax.random.normal(kk[2 * c + 1], cache_shape, dtype)) for c in range(copies)]
    return AttentionBatch(jax.random.normal(kq, q_shape, dtype), caches, metadata, int(qsl[n]))


def routed_swiglu_reference(rows, group_sizes, w_gate, w_up, w_down, quant=None):
    """Mixture-of-experts SwiGLU over rows sorted by expert, each row with its own expert's weights
    gathered (the routed-experts kernel's reference; rows past the groups come out zero).
    `quant`: quantized weights' companions as routed_swiglu takes them: FP8's scales per expert
    and output column applied to the products, integer experts dequantized (int4_dequantize,
    int8_dequantize) first."""
    n = rows.shape[0]
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(n), side="right")
    valid = expert < group_sizes.shape[0]
    expert = jnp.minimum(expert, group_sizes.shape[0] - 1)

    def product(x, w, companions):
        if w.dtype in (jnp.uint8, jnp.int8):  # int4 [E, out, in/2], int8 [E, out, in]
            deq = int4_dequantize if w.dtype == jnp.uint8 else int8_dequantize
            w, companions = jnp.swapaxes(jax.vmap(deq)(w, *companions), 1, 2), ()
        y = jnp.einsum("nk,nkc->nc", x, w[expert].astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return y * companions[0][expert] if companions else y

    gate_q, up_q, down_q = ((),) * 3 if quant is None else quant
    act = (jax.nn.silu(product(rows, w_gate, gate_q)) * product(rows, w_up, up_q)).astype(rows.dtype)
    out = product(act, w_down, down_q).astype(rows.dtype)
    return jnp.where(valid[:, None], out, 0)


def int4_dequantize(w, scale, offset):
    """The packed int4 weight [N, K/2] as float32 [N, K]: w = q * scale + min for a float offset,
    (q - zero) * scale for uint8 zero points (exact in float32)."""
    n, half_k = w.shape
    groups = scale.shape[0]
    packed = w.reshape(n, groups, half_k // groups)
    q = jnp.concatenate([packed & 15, packed >> 4], axis=-1).astype(jnp.float32)  # [N, G, group]
    f32 = lambda a: a.T.astype(jnp.float32)[..., None]
    if offset.dtype == jnp.uint8:
        deq = (q - f32(offset)) * f32(scale)
    else:
        deq = q * f32(scale) + f32(offset)
    return deq.reshape(n, 2 * half_k)


def int4_matmul_reference(x, w, scale, offset):
    """`int4_matmul` in jnp (any number of rows): the packed weight dequantized in x's dtype (one
    rounding) and multiplied, float32 accumulation."""
    return _dot_f32(x, int4_dequantize(w, scale, offset).astype(x.dtype)).astype(x.dtype)


def _dot_f32(x, w):
    """x [M, K] . w [N, K]^T accumulated in float32. On a CPU both operands go to float32 first
    (the same products: a 16-bit float's are exact in float32): XLA's CPU runtime runs a 16-bit
    dot with a float32 result only inside its fused kernels, and a gather before the dot (GPTQ's
    activation order) can leave one outside them ("Unsupported element type for DotThunk")."""
    if jax.default_backend() == "cpu":
        x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def int8_dequantize(w, scale, mn=None):
    """The int8 weight [N, K] with float32 scale and min (or None) [G, N] (one per output channel
    and group of K / G inputs) as float32 [N, K]: w * scale (+ min)."""
    n, k = w.shape
    groups = scale.shape[0]
    deq = w.reshape(n, groups, k // groups).astype(jnp.float32) * scale.T[..., None]
    if mn is not None:
        deq = deq + mn.T[..., None]
    return deq.reshape(n, k)


def int8_matmul_reference(x, w, scale, mn=None):
    """`int8_matmul` in jnp (any number of rows): the weight dequantized in x's dtype (one
    rounding) and multiplied, float32 accumulation."""
    return _dot_f32(x, int8_dequantize(w, scale, mn).astype(x.dtype)).astype(x.dtype)


def fp8_matmul_reference(x, w, scale):
    """`fp8_matmul` in jnp (any number of rows): the FP8 weight [N, K] converted to x's dtype
    (exact), multiplied with float32 accumulation, its per-output-channel scale applied."""
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale, not a division by zero
GATED_ACTIVATIONS = {"silu": jax.nn.silu,
                     "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def to_fp8(x):
    """Saturating cast to float8 e4m3 (it has no infinity: a value rounded past 448 would be NaN)."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_rows_fp8(x):
    """x [..., K] -> (float8 e4m3 [..., K], float32 scale [..., 1]) with x ~= q * scale, each row's
    largest magnitude mapped to 448: the FP8 linears' dynamic per-token activation scales."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), MIN_AMAX) / FP8_MAX
    return to_fp8(x32 / scale), scale


def gated_fp8_reference(gate, up, row_scale, gate_scale, up_scale, activation="silu"):
    """`gated_fp8` in jnp: act(gate * row_scale * gate_scale) * (up * row_scale * up_scale) in
    float32, quantized per row."""
    g = gate.astype(jnp.float32) * (row_scale * gate_scale)
    u = up.astype(jnp.float32) * (row_scale * up_scale)
    return quantize_rows_fp8(GATED_ACTIVATIONS[activation](g) * u)


def split_total(partials, scale, dtype):
    """A GEMM's output from its split-K slices [S, ..., N] and scale [N] (or None), in `dtype`."""
    y = partials.astype(jnp.float32).sum(0)
    return (y if scale is None else y * scale).astype(dtype)


def add_rms_norm_reference(x, partials, scale, weight, eps):
    """`add_rms_norm` in jnp: (x + y, the RMSNorm of x + y times weight), y the GEMM's output."""
    new = x + split_total(partials, scale, x.dtype)
    x32 = new.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return new, weight * normed.astype(x.dtype)


def rope_write_kv_reference(partials, scale, cos, sin, slot_mapping, k_cache, v_cache, *,
                            num_heads, dtype):
    """`rope_write_kv` in jnp: the q+k+v output split into heads, q and k rotated (rotate-half,
    cos and sin in `dtype`), k and v scattered into their slots (out-of-range slots dropped)."""
    t = partials.shape[1]
    kv_heads, d = k_cache.shape[2:]
    y = split_total(partials, scale, dtype).reshape(t, num_heads + 2 * kv_heads, d)
    c, s = cos[:, None, :].astype(dtype), sin[:, None, :].astype(dtype)

    def rotate(h):
        return h * c + jnp.concatenate([-h[..., d // 2:], h[..., :d // 2]], axis=-1) * s

    q, k, v = rotate(y[:, :num_heads]), rotate(y[:, num_heads:num_heads + kv_heads]), y[:, -kv_heads:]

    def write(cache, new):
        nb, bs = cache.shape[:2]
        new = to_fp8(new.astype(jnp.float32)) if cache.dtype == FP8 else new.astype(cache.dtype)
        flat = cache.reshape(nb * bs, kv_heads, d).at[slot_mapping].set(new, mode="drop")
        return flat.reshape(cache.shape)
    return q, write(k_cache, k), write(v_cache, v)
