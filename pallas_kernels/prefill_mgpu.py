"""Prefill tiles of ragged paged attention on Hopper: Mosaic GPU, TMA + wgmma.

The Triton path of ``ragged_paged_attention`` tops out at ~60% of cuDNN for long
causal prefills (see bench/RESULTS.md): Triton cannot warp-specialise, so loads,
tensor-core work and the softmax of one program serialise. This path is the
FlashAttention-3 schedule written with Pallas Mosaic GPU:

* one CTA = ``2 * BLOCK_Q`` new tokens of one sequence x one query head; three
  warpgroups: two compute warpgroups (``BLOCK_Q`` rows each, ping-ponging on the
  tensor cores through a schedule barrier so one's softmax overlaps the other's
  matmuls) and one memory warpgroup that streams K/V tiles into a ring of shared
  memory slots with TMA;
* a K/V tile of ``BLOCK_KV`` keys is ``BLOCK_KV / block_size`` pages, each page
  one TMA copy of ``[block_size, head_dim]`` rows read through the block table;
  all copies of a tile arrive on one barrier;
* a tile's rows must all belong to its sequence (TMA stores whole boxes), so
  only sequences with at least ``2 * BLOCK_Q`` new tokens come here, and the last
  tile of a sequence is shifted back to end at the sequence's last token (rows
  it shares with the previous tile are computed twice and written with equal
  values). Shorter sequences stay on the Triton path.

An FP8 cache (one byte a value) lands in shared memory as stored; each compute
warpgroup converts a K or V tile into its own 16-bit buffer (f16, kv_operands) and
multiplies from there, releasing the FP8 slot to the memory warpgroup at once.

Restrictions (checked statically by the caller): bf16/f16 queries, a cache of the
query's dtype or float8_e4m3fn, head_dim a multiple of 64 up to 128 (128 with an
FP8 cache: its rows fill a 128-byte swizzle), no sliding window, no soft cap, and
finite values in the cache
rows past a sequence's context (they are read, masked to probability 0, and
multiplied by 0). The engine zero-initialises its cache, so the last holds.
There is no CPU interpret mode for this path (the Mosaic GPU interpreter of the
supported jax versions cannot run wgmma on transposed operands); it is checked
against the jnp reference on the GPU (tests/test_gpu.py, bench/attention_kernels.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kv_operands import compute_dtype, to_compute_dtype
from pallas_kernels.tile_lists import expand_tiles

BLOCK_Q = 64          # rows per compute warpgroup (one wgmma M tile)
TILE_Q = 2 * BLOCK_Q  # new tokens per CTA
_LOG2E = math.log2(math.e)


def _transposed(ref):
    # jax 0.11 spells it ref.transpose; 0.10 only has plgpu.transpose_ref (deprecated in 0.11, so
    # it is looked up only when the ref lacks the method).
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _tiled(dtype):
    """Shared-memory tiling of a [rows, head_dim] operand: 128-byte swizzled rows."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(128))


def supported(dtype, kv_dtype, head_dim: int, block_size: int, block_kv: int,
              sliding_window, logits_soft_cap) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and jnp.dtype(kv_dtype) in (jnp.dtype(dtype), jnp.dtype(jnp.float8_e4m3fn))
            # head_dim 256 (Gemma 3) would need 395 KB of shared memory at 128 keys per stage
            # (bench/RESULTS.md, Gemma); the Triton launch takes it
            and head_dim % (128 // jnp.dtype(kv_dtype).itemsize) == 0 and head_dim <= 128
            and block_kv % block_size == 0 and block_size % 8 == 0
            and sliding_window is None and logits_soft_cap is None)


def build_tiles(qsl, q_lens, T: int, R: int):
    """(seq, first row) of each CTA tile; static length, unused tiles have seq -1.

    Sequence r (q_len >= TILE_Q) gets ceil(q_len / TILE_Q) tiles; its last tile
    ends at its last token. Heaviest (latest) tile of a sequence first.
    """
    n_max = T // TILE_Q
    n_tiles = n_max + min(R, n_max)
    is_long = q_lens >= TILE_Q
    n_r = jnp.where(is_long, (q_lens + TILE_Q - 1) // TILE_Q, 0)
    seq_c, j, valid = expand_tiles(n_r, n_tiles)
    q0 = jnp.minimum(qsl[seq_c] + j * TILE_Q, qsl[seq_c + 1] - TILE_Q)
    return jnp.where(valid, seq_c, -1), jnp.where(valid, q0, 0), is_long


def prefill_attention(q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
                      tile_seq, tile_q0, *, sm_scale: float, block_kv: int = 128,
                      stages: int = 2):
    """Attention output rows of the tiles in (tile_seq, tile_q0); other rows unset."""
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    MB = block_tables.shape[1]
    group = Hq // Hkv
    pages = block_kv // BS
    n_tiles = tile_seq.shape[0]
    dtype = q.dtype
    kv_dtype = k_cache.dtype
    cdt = compute_dtype(dtype, kv_dtype)     # the tensor cores' operands
    convert = kv_dtype != cdt
    scale = float(sm_scale) * _LOG2E

    # All int32 metadata in one freshly computed buffer: Mosaic GPU wants 256-byte aligned
    # operands, and slices of the engine's packed host batch are not.
    R = kv_lens.shape[0]
    o_q0, o_kvl, o_qsl, o_bt = n_tiles, 2 * n_tiles, 2 * n_tiles + R, 2 * n_tiles + 2 * R + 1
    meta = jnp.concatenate([tile_seq, tile_q0, kv_lens, query_start_loc,
                            block_tables.reshape(-1)]).astype(jnp.int32)

    def kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, scoped):
        (qo_smem2, stage_smem2, k_smem, v_smem, conv_smem2), (k_bars, v_bars, q_bars), \
            (k_free, v_free), sched = scoped
        h = lax.axis_index("head")
        tile = lax.axis_index("tile")
        wg = lax.axis_index("wg")
        seq = meta_ref[tile]

        @pl.when(seq >= 0)
        def _():
            q0 = meta_ref[o_q0 + tile]
            kv_len = meta_ref[o_kvl + seq]
            qe = meta_ref[o_qsl + seq + 1]
            p0 = kv_len - (qe - q0)          # position of the tile's first token
            # keys [0, p0 + TILE_Q) are visible to some row of the CTA
            kv_steps_all = lax.div(p0 + TILE_Q + block_kv - 1, jnp.int32(block_kv))

            def schedule_barrier():
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                qo_smem = qo_smem2.at[wg]
                row0 = wg * BLOCK_Q
                qpos0 = p0 + row0
                kv_steps = lax.div(qpos0 + BLOCK_Q + block_kv - 1, jnp.int32(block_kv))
                full_steps = lax.div(qpos0 + 1, jnp.int32(block_kv))
                # The tile's first row is arbitrary, so Q and O cross through an
                # untiled buffer (TMA into tiled smem needs 8-aligned rows) and
                # are retiled in registers.
                stage = stage_smem2.at[wg]
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q0 + row0, BLOCK_Q), h],
                                        stage, q_bars.at[wg])
                plgpu.barrier_wait(q_bars.at[wg])
                qo_smem[...] = to_compute_dtype(
                    plgpu.load(stage, (), layout=plgpu.Layout.WGMMA, optimized=False), cdt)
                plgpu.commit_smem()
                m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                                        plgpu.Layout.WGMMA.reduce(1))
                l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32),
                                        plgpu.Layout.WGMMA.reduce(1))
                acc = plgpu.layout_cast(jnp.full((BLOCK_Q, D), 0, jnp.float32),
                                        plgpu.Layout.WGMMA)
                plgpu.barrier_wait(k_bars.at[0])
                pl.when(wg == 1)(schedule_barrier)

                def operand(src, free):
                    """The tile in `src` as the tensor cores take it; `free` is arrived on once
                    `src` may be overwritten (after the conversion, or after the caller's product)."""
                    if not convert:
                        return src, lambda: plgpu.barrier_arrive(free)
                    conv = conv_smem2.at[wg]  # the product before this one has completed
                    conv[...] = src[...].astype(cdt)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(free)
                    return conv, lambda: None

                def kv_step(step, carry, masked=False):
                    acc, m_i, l_i = carry
                    slot = lax.rem(step, jnp.int32(stages))
                    k_op, k_done = operand(k_smem.at[slot], k_free.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, qo_smem, _transposed(k_op))
                        schedule_barrier()
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
                    k_done()
                    if masked:
                        rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 0,
                                                      layout=plgpu.Layout.WGMMA)
                        cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                                      layout=plgpu.Layout.WGMMA)
                        s = jnp.where(rows + qpos0 >= cols + step * block_kv, s, -jnp.inf)
                    # m is kept in scaled log2 units so p is one FMA + exp2
                    m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha + p.sum(axis=1)
                    p16 = p.astype(cdt)
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    plgpu.barrier_arrive(sched)          # softmax done
                    plgpu.barrier_wait(v_bars.at[slot])
                    v_op, v_done = operand(v_smem.at[slot], v_free.at[slot])
                    plgpu.barrier_wait(sched)            # tensor cores free

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_op)
                        nxt = step + 1

                        @pl.when(nxt < kv_steps)
                        def _():
                            plgpu.barrier_wait(k_bars.at[lax.rem(nxt, jnp.int32(stages))])
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    v_done()
                    return acc, m_new, l_i

                def drain(step, _):
                    # steps only the other warpgroup needs: release them and keep
                    # the schedule barrier in lockstep
                    slot = lax.rem(step, jnp.int32(stages))
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    schedule_barrier()
                    schedule_barrier()

                carry = (acc, m_i, l_i)
                carry = lax.fori_loop(0, full_steps, kv_step, carry)
                acc, m_i, l_i = lax.fori_loop(
                    full_steps, kv_steps, functools.partial(kv_step, masked=True), carry)
                lax.fori_loop(kv_steps, kv_steps_all, drain, None)
                pl.when(wg == 0)(schedule_barrier)

                acc = acc / lax.broadcast_in_dim(l_i, (BLOCK_Q, D), [0])
                stage[...] = acc.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage, out_ref.at[pl.ds(q0 + row0, BLOCK_Q), h])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                kvh = lax.div(h, jnp.int32(group))

                def issue(step, slot):
                    # all of K first: the compute warpgroups wait on K before V
                    for src, smem, bars in ((k_ref, k_smem, k_bars), (v_ref, v_smem, v_bars)):
                        for j in range(pages):
                            idx = jnp.minimum(step * pages + j, MB - 1)
                            page = meta_ref[o_bt + seq * MB + idx]
                            plgpu.copy_gmem_to_smem(src.at[page, :, kvh],
                                                    smem.at[slot, pl.ds(j * BS, BS)],
                                                    bars.at[slot])

                for i in range(stages):
                    pl.when(i < kv_steps_all)(functools.partial(issue, i, i))

                @pl.loop(stages, kv_steps_all)
                def _(step):
                    slot = lax.rem(step, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    issue(step, slot)

    def entry(meta_ref, q_ref, k_ref, v_ref, out_ref):
        # one conversion buffer a compute warpgroup serves its K and V tiles in turn: two
        # would take the shared memory past Hopper's 227 KiB at 128 keys a tile
        conv = plgpu.SMEM((2, block_kv, D), cdt, transforms=_tiled(cdt)) if convert else None
        pl.run_scoped(
            lambda *scoped: kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, scoped),
            (plgpu.SMEM((2, BLOCK_Q, D), cdt, transforms=_tiled(cdt)),
             plgpu.SMEM((2, BLOCK_Q, D), dtype),
             plgpu.SMEM((stages, block_kv, D), kv_dtype, transforms=_tiled(kv_dtype)),
             plgpu.SMEM((stages, block_kv, D), kv_dtype, transforms=_tiled(kv_dtype)),
             conv),
            (plgpu.Barrier(num_arrivals=pages, num_barriers=stages),
             plgpu.Barrier(num_arrivals=pages, num_barriers=stages),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((T, Hq, D), dtype),
        grid=(Hq, n_tiles),
        grid_names=("head", "tile"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(meta, q, k_cache, v_cache)
