"""Ragged paged attention: one entry point for decode, prefill chunks and mixed batches.

Backends: Pallas **Triton** for everything, plus a Pallas **Mosaic GPU** path for long
prefills on Hopper (``prefill_mgpu.py``: TMA + wgmma with warp specialisation, 93-94% of
cuDNN where the Triton launch reaches ~62%; used for sequences of >= 128 new tokens in
buckets of >= 512 tokens, bf16/f16, no sliding window or soft cap). Triton: it lowers
data-dependent gathers (rows of K/V through the block table, computed per tile) to
plain pointer arithmetic, which is exactly what a paged cache needs; it runs in
``interpret=True`` mode on CPU for tests; it compiles with jax 0.10 and 0.11 alike;
and Triton's software pipeliner overlaps the block-table-indirected K/V loads with
the matmuls (``num_stages``). Decode is bandwidth-bound, so Triton already reaches
~90% of copy bandwidth there; long prefills are compute-bound, where Triton cannot
overlap loads, tensor-core work and softmax the way warp-specialised Mosaic GPU does.

Algorithm (flash attention with online softmax, f32 accumulation):

* The batch is cut into *q tiles*. A tile is ``BQ`` consecutive new tokens of one
  sequence times the ``G = Hq // Hkv`` query heads that share one KV head, so a
  program's matrix has ``M = BQ * G`` rows (G padded to a power of two) and every
  K/V tile it loads is used by all heads of the group (GQA sharing).
* Grid = (q tiles, KV heads, KV splits). Each program walks its KV range
  (causal, and sliding window when set) in tiles of ``BK`` keys; each key row is
  fetched through the block table (``page * block_size + offset``), so BK need not
  equal the page size.
* Two launches with static shapes, dispatch by static sizes only:
  - *short* tiles (``BQs = 16 // G`` tokens, M = 16): one tile per sequence whose
    new-token count is <= BQs (decodes, short spec chunks). Optional split-K over
    the context (``num_splits`` > 1) when R * Hkv programs would not fill the GPU;
    the partial results are merged with their log-sum-exp in jnp.
  - *long* tiles (``BQl`` tokens, M = 64..128): every other sequence, tiled
    flash-style. It writes into the short launch's output buffer (aliased), so
    mixed batches need no extra pass.
  Which sequences are short or long is decided from the traced lengths when the
  tile lists are built (tiny jnp ops); the grid sizes are static upper bounds and
  programs without work exit at once.
* Tile sizes live in ``TILE_TABLE``, per GPU architecture (CUDA compute capability) and keyed
  by (head_dim, GQA ratio, page size); the split-K heuristic reads the device's SM count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax.experimental.pallas import triton as plgpu

from pallas_kernels import prefill_mgpu
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.kv_operands import compute_dtype, to_compute_dtype
from pallas_kernels.tile_lists import expand_tiles
from pallas_kernels.triton_rows import full_spec, load_rows, store_rows

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
# Token buckets below this keep prefill on Triton: their chunks are short, and each
# Mosaic kernel shape costs a compile in every process plus an empty launch per layer
# on decode-only steps.
MGPU_MIN_TOKENS = 512
# Pallas's Triton lowering offsets an operand's elements in signed 32 bits unless it exceeds 2**32
# bytes: a 1-byte (FP8) cache layer of more than 2**31 elements is read at wrapped offsets (on an
# H200, wrong outputs for the sequence holding the block past 2**31; bench/RESULTS.md).
BYTE_CACHE_MAX_ELEMENTS = 2 ** 31


@dataclasses.dataclass(frozen=True)
class TileConfig:
    bk: int          # keys per inner-loop step
    num_warps: int
    num_stages: int
    split_mask: bool = True  # run fully visible key tiles without the causal mask


@dataclasses.dataclass(frozen=True)
class Tiles:
    short: TileConfig        # decode-like tiles (M = 16 rows)
    long_rows: int           # M rows of a long tile (BQl = long_rows // G tokens)
    long: TileConfig
    # keys per K/V tile of the Mosaic GPU prefill path (128: 94% of cuDNN at 1x4096 on H100
    # vs 86% with 64, measured on the contiguous FA3 schedule it follows)
    prefill_block_kv: int = 128
    # decode-like tiles over an FP8 cache (None: `short`)
    short_fp8: TileConfig | None = None


# Tuned tiles per GPU architecture (compute capability), then by (head_dim, GQA ratio, page
# size); missing architectures and keys fall back to _default_tiles().
TILE_TABLE: dict[str, dict[tuple[int, int, int], Tiles]] = {
    "9.0": {  # Hopper (H100, H200); measured on H100, see bench/RESULTS.md
        # decode: bk 64 / 4 warps was best or within noise of best at B=1..64;
        # prefill: 128 rows, bk 64, 4 warps, 3 stages (281 TFLOP/s vs 222 with 8 warps);
        # FP8 cache decode: bk 128 (a bf16 step's bytes), 2.78 TB/s vs 2.54 with 64 at 256 x 1536
        # on H200, 8 warps or 256 keys slower; 5 stages +6-10% at 64-512 rows over 3 (-8% at 16)
        (128, 4, 16): Tiles(TileConfig(64, 4, 3), 128, TileConfig(64, 4, 3),
                            short_fp8=TileConfig(128, 4, 5)),
    },
}
# Batch-invariant mode's one launch: every sequence in tiles of 16 rows (as a decode's), this
# tiling whatever the shape, no split over the context and no Mosaic GPU path. A row's arithmetic
# is then its own: its tensor-core products do not depend on the other rows of its tile, its keys
# come in the same steps of `bk` from key 0 in order, and a step wholly masked for the row (a
# decode sees none; a prefill tile's first tokens see the tile's later keys masked) leaves its
# running max, sum and output bitwise unchanged. So a token's result is the same decoded or in a
# prefill chunk, alone or beside any batch (tests/test_ragged_paged_attention.py).
INVARIANT_TILE = TileConfig(64, 4, 3)
_DEFAULT_NUM_SMS = 132  # H100 SXM: the split-K heuristic's SM count where the device has none


@functools.cache
def _gpu_arch() -> str:
    """The default device's CUDA compute capability ("9.0"), or "" off CUDA (interpret mode)."""
    return str(getattr(jax.devices()[0], "compute_capability", "") or "")


@functools.cache
def _num_sms() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or _DEFAULT_NUM_SMS)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def max_cache_elements(dtype: Any) -> int | None:
    """The most elements one cache layer (per device) of `dtype` may hold for the kernels to
    index it correctly; None: no bound below memory."""
    return BYTE_CACHE_MAX_ELEMENTS if jnp.dtype(dtype).itemsize == 1 else None


def _default_tiles(head_dim: int, group: int, block_size: int) -> Tiles:
    del group, block_size
    long_bk = 64 if head_dim <= 128 else 32
    return Tiles(TileConfig(64, 4, 3), 128, TileConfig(long_bk, 4, 3))


def get_tiles(head_dim: int, group: int, block_size: int, arch: str | None = None) -> Tiles:
    """Tiles for this shape on `arch` (default: the current device's architecture)."""
    table = TILE_TABLE.get(_gpu_arch() if arch is None else arch, {})
    return table.get((head_dim, group, block_size)) or _default_tiles(head_dim, group, block_size)


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------
def _rpa_kernel(tile_seq_ref, tile_q0_ref, tile_q1_ref, kv_lens_ref, qsl_ref, bt_ref,
                q_ref, k_ref, v_ref, *rest, bq, gp, group, num_q_heads, block_size,
                max_blocks, bk, num_splits, sm_scale, sliding_window, soft_cap,
                aliased, split_out, interpret, split_mask):
    if aliased:
        rest = rest[1:]  # the aliased input buffer is never read
    if split_out:
        o_ref, lse_ref = rest
    else:
        (o_ref,) = rest
    i = pl.program_id(0)
    h = pl.program_id(1)
    s_id = pl.program_id(2)
    r = tile_seq_ref[i]

    @pl.when(r >= 0)
    def _():
        M = bq * gp
        q0 = tile_q0_ref[i]
        q1 = tile_q1_ref[i]
        kv_len = kv_lens_ref[r]
        qs = qsl_ref[r]
        qe = qsl_ref[r + 1]
        ctx0 = kv_len - (qe - qs)            # absolute position of token qs

        m_idx = lax.broadcasted_iota(jnp.int32, (M,), 0)
        t_off = lax.div(m_idx, jnp.int32(gp))
        g = lax.rem(m_idx, jnp.int32(gp))
        tok = q0 + t_off
        row_valid = (tok < q1) & (g < group)
        tok_c = jnp.minimum(tok, q1 - 1)
        g_c = jnp.minimum(g, group - 1)
        qrow = tok_c * num_q_heads + h * group + g_c
        qpos = ctx0 + (tok - qs)              # [M]

        q = q_ref[qrow, :]                    # [M, D]
        cdt = compute_dtype(q.dtype, k_ref.dtype)
        q = to_compute_dtype(q, cdt)

        # KV range of this tile (causal upper bound, window lower bound).
        hi = jnp.minimum(kv_len, ctx0 + (q1 - qs))
        if sliding_window is not None:
            lo = jnp.maximum(0, ctx0 + (q0 - qs) - (sliding_window - 1))
        else:
            lo = jnp.int32(0)
        t_lo = lax.div(lo, jnp.int32(bk))
        t_hi = lax.div(hi + (bk - 1), jnp.int32(bk))
        if num_splits > 1:
            per = lax.div(t_hi - t_lo + (num_splits - 1), jnp.int32(num_splits))
            t_start = t_lo + s_id * per
            t_end = jnp.minimum(t_start + per, t_hi)
        else:
            t_start, t_end = t_lo, t_hi

        scale = sm_scale * _LOG2E if soft_cap is None else sm_scale / soft_cap
        bt_base = r * max_blocks
        k_iota = lax.broadcasted_iota(jnp.int32, (bk,), 0)

        def body(t, carry, masked=True):
            acc, m_i, l_i = carry
            kpos = t * bk + k_iota                                    # [BK]
            kvalid = kpos < hi
            page_idx = jnp.minimum(lax.div(kpos, jnp.int32(block_size)), max_blocks - 1)
            page = bt_ref[bt_base + page_idx]
            krow = page * block_size + lax.rem(kpos, jnp.int32(block_size))
            if masked:
                krow = jnp.where(kvalid, krow, 0)
            k = k_ref[krow, :].astype(cdt)                            # [BK, D] (FP8 cache: up)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)    # [M, BK]
            s = s * scale
            if soft_cap is not None:
                s = jnp.tanh(s) * (soft_cap * _LOG2E)
            if masked:
                mask = (kpos[None, :] <= qpos[:, None]) & kvalid[None, :]
                if sliding_window is not None:
                    mask = mask & ((qpos[:, None] - kpos[None, :]) < sliding_window)
                s = jnp.where(mask, s, _MASK_VALUE)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
            p = jnp.exp2(s - m_new[:, None])
            corr = jnp.exp2(m_i - m_new)
            l_new = l_i * corr + jnp.sum(p, axis=1)
            if masked:
                # p is 0 there, but 0 * (NaN/Inf garbage in an unused cache row) is not.
                v = load_rows(v_ref, krow, kvalid, interpret).astype(cdt)
            else:
                v = v_ref[krow, :].astype(cdt)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            return acc * corr[:, None] + pv, m_new, l_new

        D = q.shape[-1]
        acc0 = jnp.zeros((M, D), jnp.float32)
        m0 = jnp.full((M,), _MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((M,), jnp.float32)
        carry = (acc0, m0, l0)
        if split_mask and sliding_window is None:
            # Key tiles wholly at or before the tile's first query position need
            # no causal mask (every row sees every key): run them unmasked.
            first_pos = ctx0 + (q0 - qs)
            t_mid = jnp.maximum(t_start, jnp.minimum(
                t_end, lax.div(first_pos + 1, jnp.int32(bk))))
            carry = lax.fori_loop(t_start, t_mid,
                                  functools.partial(body, masked=False), carry)
            t_start = t_mid
        acc, m_i, l_i = lax.fori_loop(t_start, t_end, body, carry)
        l_safe = jnp.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if split_out:
            lse = jnp.where(l_i > 0, m_i + jnp.log2(l_safe), _MASK_VALUE)
            store_rows(o_ref, qrow, out.astype(o_ref.dtype), row_valid, interpret)
            store_rows(lse_ref, qrow, lse, row_valid, interpret)
        else:
            store_rows(o_ref, qrow, out.astype(o_ref.dtype), row_valid, interpret)


def _launch(tile_seq, tile_q0, tile_q1, kv_lens, qsl, bt_flat, q2, k3, v3, out_in, *,
            bq, gp, group, num_q_heads, block_size, max_blocks, cfg, num_splits,
            sm_scale, sliding_window, soft_cap, interpret, out_dtype):
    n_tiles = tile_seq.shape[0]
    TH, D = q2.shape
    NR, Hkv, _ = k3.shape
    split_out = num_splits > 1
    aliased = out_in is not None
    TH_out = TH + 1 if interpret else TH   # interpret mode: one spare row
    assert not (split_out and aliased)
    kernel = functools.partial(
        _rpa_kernel, bq=bq, gp=gp, group=group, num_q_heads=num_q_heads,
        block_size=block_size, max_blocks=max_blocks, bk=cfg.bk,
        num_splits=num_splits, sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        aliased=aliased, split_out=split_out, interpret=interpret,
        split_mask=cfg.split_mask)
    in_specs = [
        full_spec(tile_seq.shape), full_spec(tile_q0.shape), full_spec(tile_q1.shape),
        full_spec(kv_lens.shape), full_spec(qsl.shape), full_spec(bt_flat.shape),
        full_spec(q2.shape),
        full_spec(k3.shape, squeeze_axis=1, grid_axis=1),
        full_spec(v3.shape, squeeze_axis=1, grid_axis=1),
    ]
    args = [tile_seq, tile_q0, tile_q1, kv_lens, qsl, bt_flat, q2, k3, v3]
    aliases = {}
    if aliased:
        in_specs.append(full_spec(out_in.shape))
        args.append(out_in)
        aliases = {len(args) - 1: 0}
    if split_out:
        out_shape = [jax.ShapeDtypeStruct((num_splits, TH_out, D), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, TH_out), jnp.float32)]
        out_specs = [full_spec(out_shape[0].shape, squeeze_axis=0, grid_axis=2),
                     full_spec(out_shape[1].shape, squeeze_axis=0, grid_axis=2)]
    else:
        out_shape = jax.ShapeDtypeStruct((TH_out, D), out_dtype)
        out_specs = full_spec((TH_out, D))
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages)
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, Hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"ragged_paged_attention_bq{bq}_bk{cfg.bk}_s{num_splits}",
    )(*args)


def choose_num_splits(T, R, Hkv, max_blocks, block_size, bk, Hq, D):
    """Static split-K factor for the short (decode) launch."""
    # Measured on H100 (hd 128, 8 KV heads): B=64 best unsplit, B=16 best at 4,
    # B=1 (ctx 8192) at 8-16 splits.
    programs = max(1, R * Hkv)
    want = _next_pow2(-(-2 * _num_sms() // programs))
    max_ctx = max_blocks * block_size
    s = max(1, min(want, 16, max_ctx // (4 * bk)))
    # keep the f32 partial buffer modest
    while s > 1 and s * T * Hq * D * 4 > (256 << 20):
        s //= 2
    return s


def _seq_tiles(qsl, q_lens, tiled, bq, n_tiles):
    """Tiles of `bq` tokens over the sequences where `tiled` (traced, tiny): (sequence, first
    token, end) per tile, sequence -1 past the last."""
    n_r = jnp.where(tiled, (q_lens + bq - 1) // bq, 0)
    seq_c, j, valid = expand_tiles(n_r, n_tiles)
    q0 = qsl[seq_c] + j * bq
    q1 = jnp.minimum(q0 + bq, qsl[seq_c + 1])
    return jnp.where(valid, seq_c, -1), q0, q1


def _build_tiles(qsl, q_lens, T, R, bq_s, bq_l):
    """Tile lists for the short and long launches (all traced, tiny)."""
    r_ids = jnp.arange(R, dtype=jnp.int32)
    is_short = (q_lens > 0) & (q_lens <= bq_s)
    short = (jnp.where(is_short, r_ids, -1), qsl[:-1], qsl[1:])
    n_long = T // (bq_s + 1)
    if n_long == 0:
        return short, None
    return short, _seq_tiles(qsl, q_lens, q_lens > bq_s, bq_l, -(-T // bq_l) + min(R, n_long))


def ragged_paged_attention_kernel(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs, *,
    sm_scale, sliding_window=None, logits_soft_cap=None, interpret=False,
    num_splits=None, tiles: Tiles | None = None, prefill_backend: str = "mosaic",
    invariant: bool = False):
    """The Pallas implementation (same semantics as the reference). `invariant`: batch-invariant
    mode (see INVARIANT_TILE)."""
    T, Hq, D = q.shape
    NB, BS, Hkv, Dk = k_cache.shape
    R, MB = block_tables.shape
    assert Dk == D and v_cache.shape == k_cache.shape
    assert Hq % Hkv == 0, (Hq, Hkv)
    assert D & (D - 1) == 0 and D >= 16, "head_dim must be a power of two >= 16"
    limit = max_cache_elements(k_cache.dtype)
    if limit is not None and k_cache.size > limit:
        raise ValueError(f"a {k_cache.dtype} cache layer of {k_cache.size} elements exceeds the "
                         f"{limit} the attention kernel can index: use fewer KV-cache blocks")
    G = Hq // Hkv
    gp = _next_pow2(G)
    bq_s = max(1, 16 // gp)

    qsl = query_start_loc.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    n_seqs = jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32)
    q_lens = jnp.where(jnp.arange(R, dtype=jnp.int32) < n_seqs, qsl[1:] - qsl[:-1], 0)
    q2 = q.reshape(T * Hq, D)
    k3 = k_cache.reshape(NB * BS, Hkv, D)
    v3 = v_cache.reshape(NB * BS, Hkv, D)
    bt_flat = block_tables.astype(jnp.int32).reshape(R * MB)
    common = dict(gp=gp, group=G, num_q_heads=Hq, block_size=BS, max_blocks=MB,
                  sm_scale=sm_scale, sliding_window=sliding_window,
                  soft_cap=logits_soft_cap, interpret=interpret, out_dtype=q.dtype)
    if invariant:
        tile_list = _seq_tiles(qsl, q_lens, q_lens > 0, bq_s, -(-T // bq_s) + R)
        out = _launch(*tile_list, kv_lens, qsl, bt_flat, q2, k3, v3, None, bq=bq_s,
                      cfg=INVARIANT_TILE, num_splits=1, **common)
        return (out[:T * Hq] if interpret else out).reshape(T, Hq, D)
    if tiles is None:
        tiles = get_tiles(D, G, BS)
    bq_l = max(1, tiles.long_rows // gp)
    use_mgpu = (prefill_backend == "mosaic" and not interpret and T >= MGPU_MIN_TOKENS
                and prefill_mgpu.supported(q.dtype, k_cache.dtype, D, BS, tiles.prefill_block_kv,
                                           sliding_window, logits_soft_cap))
    out0 = None
    if use_mgpu:
        # long prefills go to the Mosaic GPU kernel; the Triton launches below see
        # them as empty and fill the other rows of its output in place
        m_seq, m_q0, is_mgpu = prefill_mgpu.build_tiles(qsl, q_lens, T, R)
        out0 = prefill_mgpu.prefill_attention(
            q, k_cache, v_cache, kv_lens, block_tables.astype(jnp.int32), qsl,
            m_seq, m_q0, sm_scale=sm_scale, block_kv=tiles.prefill_block_kv)
        q_lens = jnp.where(is_mgpu, 0, q_lens)
        num_splits = 1   # split partials cannot be merged into an aliased buffer
    short_t, long_t = _build_tiles(qsl, q_lens, T, R, bq_s, bq_l)
    short_cfg = tiles.short
    if jnp.dtype(k_cache.dtype).itemsize == 1 and tiles.short_fp8 is not None:
        short_cfg = tiles.short_fp8
    if num_splits is None:
        num_splits = choose_num_splits(T, R, Hkv, MB, BS, short_cfg.bk, Hq, D)

    if out0 is not None:
        out0 = out0.reshape(T * Hq, D)
    res = _launch(*short_t, kv_lens, qsl, bt_flat, q2, k3, v3, out0, bq=bq_s,
                  cfg=short_cfg, num_splits=num_splits, **common)
    if num_splits > 1:
        o_part, lse = res                                  # [S, TH, D], [S, TH]
        m = jnp.max(lse, axis=0)
        w = jnp.exp2(lse - m[None])
        out = (jnp.sum(o_part * w[..., None], axis=0)
               / jnp.sum(w, axis=0)[:, None]).astype(q.dtype)
    else:
        out = res
    if long_t is not None:
        out = _launch(*long_t, kv_lens, qsl, bt_flat, q2, k3, v3, out, bq=bq_l,
                      cfg=tiles.long, num_splits=1, **common)
    if interpret:
        out = out[:T * Hq]
    return out.reshape(T, Hq, D)


def uses_kernel(head_dim: int) -> bool:
    """Whether ragged_paged_attention's "auto" runs the kernel (on a GPU, for power-of-two head
    sizes) or the reference."""
    return jax.default_backend() == "gpu" and head_dim & (head_dim - 1) == 0 and head_dim >= 16


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "logits_soft_cap", "impl", "interpret", "invariant"))
def ragged_paged_attention(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs, *,
    sm_scale, sliding_window=None, logits_soft_cap=None, impl="auto", interpret=None,
    invariant=False):
    """Attention of packed new tokens against a paged KV cache.

    q: [T, Hq, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D] (one layer);
    kv_lens: int32[R] (context incl. new tokens); block_tables: int32[R, max_blocks];
    query_start_loc: int32[R+1]; num_seqs: int32[1]. Returns [T, Hq, D]
    (rows of padding tokens unspecified).

    impl: "auto" (kernel on GPU, reference elsewhere), "kernel" or "reference".
    interpret: run the kernel in Pallas interpret mode (default: when not on GPU).
    invariant: batch-invariant mode: each token's result depends on its own sequence alone, not
    on the batch beside it nor on how its tokens were split into steps (the kernel's one launch of
    INVARIANT_TILE, or the reference's fixed chunks).
    """
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        impl = "kernel" if uses_kernel(q.shape[-1]) else "reference"
    if impl == "reference":
        return ragged_paged_attention_reference(
            q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, invariant=invariant)
    if impl != "kernel":
        raise ValueError(f"impl must be 'auto', 'kernel' or 'reference', got {impl!r}")
    if interpret is None:
        interpret = not on_gpu
    return ragged_paged_attention_kernel(
        q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, interpret=interpret, invariant=invariant)
