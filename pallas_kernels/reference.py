"""Pure-jnp reference for ragged paged attention (same signature as the kernel).

Used as the correctness reference for the Pallas kernel and by the engine on CPU.

Formulation: every token knows its sequence (segment id, from ``query_start_loc``)
and its absolute position. Keys are streamed through the block tables in chunks of
``_CHUNK_BLOCKS`` blocks with an online (flash-style) softmax in float32, so the
work is O(T * max_context) and the live memory is O(T * chunk), never
O(T * max_blocks_per_seq * block_size). The loop runs only up to the longest
actual context in the batch (a traced trip count), not to the static table width.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Keys per loop step = _CHUNK_BLOCKS * block_size.
_CHUNK_BLOCKS = 8
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


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "logits_soft_cap"))
def ragged_paged_attention_reference(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs, *,
    sm_scale, sliding_window=None, logits_soft_cap=None):
    """Ragged paged attention, pure jnp. See pallas_kernels.ragged_paged_attention.

    q: [T, Hq, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D];
    kv_lens: int32[R]; block_tables: int32[R, max_blocks]; query_start_loc: int32[R+1];
    num_seqs: int32[1]. Returns [T, Hq, D] in q.dtype (padding rows are zeros here).
    """
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    R, MB = block_tables.shape
    G = Hq // Hkv
    CB = min(_CHUNK_BLOCKS, MB)
    CK = CB * BS

    seq_ids, valid, q_lens = token_metadata(query_start_loc, num_seqs, T)
    kv_lens = kv_lens.astype(jnp.int32)
    qsl = query_start_loc.astype(jnp.int32)
    tok = jnp.arange(T, dtype=jnp.int32)
    tok_kv_len = jnp.where(valid, kv_lens[seq_ids], 0)
    # absolute position of each new token
    pos = tok_kv_len - q_lens[seq_ids] + (tok - qsl[seq_ids])
    tok_tables = block_tables.astype(jnp.int32)[seq_ids]          # [T, MB]

    qf = q.astype(jnp.float32).reshape(T, Hkv, G, D) * sm_scale
    n_chunks = (jnp.max(tok_kv_len) + CK - 1) // CK

    def body(c, carry):
        m, l, acc = carry
        blk = c * CB + jnp.arange(CB, dtype=jnp.int32)               # [CB]
        blk_c = jnp.minimum(blk, MB - 1)
        phys = jnp.take_along_axis(
            tok_tables, jnp.broadcast_to(blk_c, (T, CB)), axis=1)  # [T, CB]
        kc = k_cache[phys].astype(jnp.float32).reshape(T, CK, Hkv, D)
        vc = v_cache[phys].astype(jnp.float32).reshape(T, CK, Hkv, D)
        kpos = c * CK + jnp.arange(CK, dtype=jnp.int32)              # [CK]
        s = jnp.einsum("tkgd,tskd->tkgs", qf, kc,
                       precision=lax.Precision.HIGHEST)
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < tok_kv_len[:, None])
        if sliding_window is not None:
            mask &= (pos[:, None] - kpos[None, :]) < sliding_window
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum(
            "tkgs,tskd->tkgd", p, vc, precision=lax.Precision.HIGHEST)
        return m_new, l, acc

    m0 = jnp.full((T, Hkv, G), _MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((T, Hkv, G), jnp.float32)
    a0 = jnp.zeros((T, Hkv, G, D), jnp.float32)
    _, l, acc = lax.fori_loop(0, n_chunks, body, (m0, l0, a0))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(T, Hq, D).astype(q.dtype)
