"""Ragged paged attention: Pallas kernel (interpret mode on CPU) vs the jnp reference,
and the jnp reference vs a dense float64 numpy implementation.

Tolerances (max |out - ref| over non-padding rows, inputs ~N(0, 1)):
  float32: 2e-5 kernel vs reference, 1e-4 reference vs float64 numpy;
  bfloat16: relative Frobenius error <= 1e-2 (the kernel rounds the softmax
  probabilities to bf16 before the PV matmul; the reference keeps f32).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import (
    TILE_TABLE,
    get_tiles,
    prefill_mgpu,
    ragged_paged_attention,
    ragged_paged_attention_kernel,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention import TileConfig, Tiles
from pallas_kernels.reference import make_attention_batch

F32_ATOL_KERNEL = 2e-5
F32_ATOL_DENSE = 1e-4
BF16_REL = 1e-2

# Small tiles so that multi-tile prefills, ragged edges and the long launch are
# exercised at CPU-friendly sizes.
SMALL_TILES = Tiles(TileConfig(16, 4, 2), 16, TileConfig(16, 4, 2))

# CPU-sized batches with float64 values for dense_numpy, and block tables and a cache with entries
# that no sequence uses.
make_batch = functools.partial(make_attention_batch, num_q_heads=4, num_kv_heads=2, head_dim=32,
                               block_size=16, spare_columns=1, spare_blocks=3, host_values=True)


def dense_numpy(a, sm_scale, sliding_window=None, soft_cap=None):
    """Float64, one sequence at a time, straight from the definition."""
    q, k, v = (np.asarray(a[x], np.float64) for x in ("q", "k", "v"))
    T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    BS = k.shape[1]
    out = np.zeros_like(q)
    n = int(a["num_seqs"][0])
    for r in range(n):
        s0, s1 = a["qsl"][r], a["qsl"][r + 1]
        ql, kl = s1 - s0, a["kv_lens"][r]
        blocks = a["block_tables"][r, : -(-kl // BS)]
        kk = k[blocks].reshape(-1, Hkv, D)[:kl]
        vv = v[blocks].reshape(-1, Hkv, D)[:kl]
        for i in range(ql):
            p = kl - ql + i
            for h in range(Hq):
                s = kk[:, h // G] @ q[s0 + i, h] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                kpos = np.arange(kl)
                mask = kpos <= p
                if sliding_window is not None:
                    mask &= (p - kpos) < sliding_window
                s = np.where(mask, s, -np.inf)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[s0 + i, h] = w @ vv[:, h // G]
    return out


def check(out, ref, n_valid, dtype, atol=F32_ATOL_KERNEL):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)[:n_valid]
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)[:n_valid]
    assert np.all(np.isfinite(out)), "non-finite output in a real token row"
    if dtype == jnp.bfloat16:
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert rel <= BF16_REL, rel
    else:
        err = np.abs(out - ref).max()
        assert err <= atol, err


def run_both(args, sm_scale=0.125, tiles=SMALL_TILES, num_splits=None, **kw):
    ref = ragged_paged_attention_reference(*args, sm_scale=sm_scale, **kw)
    out = jax.jit(lambda *a: ragged_paged_attention_kernel(
        *a, sm_scale=sm_scale, interpret=True, tiles=tiles, num_splits=num_splits,
        **kw))(*args)
    return out, ref


CASES = {
    # name: (q_lens, kv_lens, extra make_batch kwargs)
    "decode": ([1, 1, 1, 1, 1], [1, 16, 17, 40, 77], {}),
    "prefill": ([37, 16], [37, 16], {}),
    "chunked_prefill": ([20], [53], {}),
    "mixed": ([1, 23, 1, 5, 1], [33, 23, 64, 50, 9], {}),
    "block_edges": ([15, 17, 33], [31, 17, 48], {}),
    "padding": ([3, 1, 9], [40, 5, 9], dict(T=24, R=6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_vs_reference_f32(name):
    q_lens, kv_lens, kw = CASES[name]
    batch = make_batch(q_lens, kv_lens, seed=hash(name) % 1000, **kw)
    out, ref = run_both(batch.args)
    check(out, ref, batch.num_tokens, jnp.float32)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1), (6, 2)])
def test_gqa(hq, hkv):
    batch = make_batch([1, 9, 18], [25, 30, 18], num_q_heads=hq, num_kv_heads=hkv,
                       T=32, R=4, seed=hq * 10 + hkv)
    out, ref = run_both(batch.args)
    check(out, ref, batch.num_tokens, jnp.float32)


@pytest.mark.parametrize("window,cap", [(8, None), (None, 5.0), (20, 2.0)])
def test_window_and_softcap(window, cap):
    batch = make_batch([1, 19, 1], [50, 40, 7], T=24, R=4, seed=7)
    out, ref = run_both(batch.args, sliding_window=window, logits_soft_cap=cap)
    check(out, ref, batch.num_tokens, jnp.float32)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_k(num_splits):
    # short multi-token tiles (q_len 3 <= BQs) too, and a window so some splits are empty
    batch = make_batch([1, 3, 1, 12], [70, 45, 3, 40], T=20, R=5, seed=num_splits)
    out, ref = run_both(batch.args, num_splits=num_splits)
    check(out, ref, batch.num_tokens, jnp.float32)
    out, ref = run_both(batch.args, num_splits=num_splits, sliding_window=9)
    check(out, ref, batch.num_tokens, jnp.float32)


def test_block_size_32_head_dim_64_default_tiles():
    batch = make_batch([1, 21, 1], [90, 21, 33], head_dim=64, block_size=32,
                       T=24, R=4, seed=3)
    out, ref = run_both(batch.args, tiles=None)
    check(out, ref, batch.num_tokens, jnp.float32)


def test_bf16():
    batch = make_batch([1, 14, 1, 6], [44, 30, 16, 6], head_dim=64,
                       dtype=jnp.bfloat16, T=24, R=5, seed=11)
    out, ref = run_both(batch.args)
    assert out.dtype == jnp.bfloat16
    check(out, ref, batch.num_tokens, jnp.bfloat16)


def _fp8_caches(batch):
    return [c.astype(jnp.float8_e4m3fn) for c in batch.args[1:3]]


@pytest.mark.parametrize("name, dtype", [("decode", jnp.float32), ("mixed", jnp.bfloat16),
                                         ("padding", jnp.bfloat16)])
def test_fp8_kv_cache(name, dtype):
    """kv_cache_dtype="fp8": the kernel reads float8 K/V (upcast to q's dtype) as the reference
    does; and the FP8 cache's rounding stays small against the unrounded cache."""
    q_lens, kv_lens, kw = CASES[name]
    batch = make_batch(q_lens, kv_lens, dtype=dtype, seed=21, **kw)
    k8, v8 = _fp8_caches(batch)
    args = (batch.args[0], k8, v8, *batch.args[3:])
    out, ref = run_both(args)
    assert out.dtype == dtype
    check(out, ref, batch.num_tokens, dtype)
    exact = ragged_paged_attention_reference(*batch.args, sm_scale=0.125)
    o, e = (np.asarray(jnp.asarray(x, jnp.float32))[:batch.num_tokens] for x in (ref, exact))
    assert np.linalg.norm(o - e) / np.linalg.norm(e) < 0.05


def test_fp8_kv_cache_with_a_query_past_f16s_range():
    """A bf16 query meets an FP8 cache in f16 inside the kernel: a query value past f16's range
    is clipped to it, not made inf (whose products with the keys would be NaN); the other tokens'
    outputs stay the reference's."""
    q_lens, kv_lens, kw = CASES["mixed"]
    batch = make_batch(q_lens, kv_lens, dtype=jnp.bfloat16, seed=22, **kw)
    q = batch.args[0].at[0, 0, 0].set(1e6)
    args = (q, *_fp8_caches(batch), *batch.args[3:])
    out, ref = run_both(args)
    assert np.isfinite(np.asarray(jnp.asarray(out[0], jnp.float32))).all()
    check(out[1:], ref[1:], batch.num_tokens - 1, jnp.bfloat16)


def test_a_byte_cache_past_32_bit_offsets_is_refused():
    """An FP8 cache layer of more than 2**31 elements (the kernel's offsets are 32-bit below 2**32
    bytes; on the GPU they wrapped) is a clear error, traced without allocating; 2**31 elements, or
    a bf16 cache past them, are not."""
    sd = jax.ShapeDtypeStruct
    ints = (sd((1,), jnp.int32), sd((1, 4), jnp.int32), sd((2,), jnp.int32), sd((1,), jnp.int32))
    q = sd((1, 8, 128), jnp.bfloat16)
    per_block = 16 * 8 * 128
    fits = 2 ** 31 // per_block

    def trace(num_blocks, dtype):
        cache = sd((num_blocks, 16, 8, 128), dtype)
        return jax.eval_shape(functools.partial(ragged_paged_attention_kernel, sm_scale=0.1,
                                                interpret=True), q, cache, cache, *ints)

    assert trace(fits, jnp.float8_e4m3fn).shape == q.shape
    assert trace(fits + 1, jnp.bfloat16).shape == q.shape
    with pytest.raises(ValueError, match=r"float8_e4m3fn cache layer of 2147500032 elements "
                                         r"exceeds the 2147483648 the attention kernel can index"):
        trace(fits + 1, jnp.float8_e4m3fn)


def test_public_entry_point_and_jit_with_traced_ints():
    batch = make_batch([1, 10], [30, 12], T=16, R=3, seed=5)
    ref = ragged_paged_attention(*batch.args, sm_scale=0.3, impl="reference")
    out = ragged_paged_attention(*batch.args, sm_scale=0.3, impl="kernel", interpret=True)
    check(out, ref, batch.num_tokens, jnp.float32)
    if jax.default_backend() != "gpu":
        auto = ragged_paged_attention(*batch.args, sm_scale=0.3)
        np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    # same executable, different lengths: nothing about the values is static
    batch2 = make_batch([5, 2], [5, 40], T=16, R=3, seed=6)
    out2 = ragged_paged_attention(*batch2.args, sm_scale=0.3, impl="kernel", interpret=True)
    ref2 = ragged_paged_attention(*batch2.args, sm_scale=0.3, impl="reference")
    check(out2, ref2, batch2.num_tokens, jnp.float32)
    with pytest.raises(ValueError):
        ragged_paged_attention(*batch.args, sm_scale=0.3, impl="nope")


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_kernel_vs_reference_vs_dense(seed):
    """Random batch compositions (decodes, prefills and chunks of random lengths), GQA ratios, head
    dims, block sizes, padding and attention options: the kernel against the reference, and the
    reference against the float64 definition."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(1, 6))
    q_lens = [1 if rng.random() < 0.4 else int(rng.integers(2, 41)) for _ in range(n)]
    kv_lens = [q + int(rng.integers(0, 61)) for q in q_lens]
    hq, hkv = [(4, 4), (4, 2), (8, 2), (8, 1)][int(rng.integers(4))]
    head_dim = int(rng.choice([32, 64]))
    block_size = int(rng.choice([16, 32]))
    kw = [{}, dict(sliding_window=int(rng.integers(1, 40))), dict(logits_soft_cap=3.0)][seed % 3]
    batch = make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                       head_dim=head_dim, block_size=block_size, seed=seed,
                       T=sum(q_lens) + int(rng.integers(0, 9)), R=n + int(rng.integers(0, 3)))
    sm_scale = head_dim ** -0.5
    out, ref = run_both(batch.args, sm_scale=sm_scale, **kw)
    check(out, ref, batch.num_tokens, jnp.float32)
    dense = dense_numpy(batch.host, sm_scale, kw.get("sliding_window"), kw.get("logits_soft_cap"))
    check(ref, dense, batch.num_tokens, jnp.float32, atol=F32_ATOL_DENSE)


@pytest.mark.parametrize("kw", [{}, dict(sliding_window=6), dict(logits_soft_cap=3.0)])
def test_reference_vs_dense_numpy(kw):
    batch = make_batch([1, 30, 4, 1], [70, 30, 20, 1], num_q_heads=6,
                       num_kv_heads=2, T=40, R=6, seed=13)
    ref = ragged_paged_attention_reference(*batch.args, sm_scale=0.2, **kw)
    dense = dense_numpy(batch.host, 0.2, kw.get("sliding_window"), kw.get("logits_soft_cap"))
    check(ref, dense, batch.num_tokens, jnp.float32, atol=F32_ATOL_DENSE)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_vs_reference_bf16(name):
    q_lens, kv_lens, kw = CASES[name]
    batch = make_batch(q_lens, kv_lens, num_q_heads=32, num_kv_heads=8,
                       head_dim=128, dtype=jnp.bfloat16, seed=1, **kw)
    ref = ragged_paged_attention(*batch.args, sm_scale=0.088, impl="reference")
    out = ragged_paged_attention(*batch.args, sm_scale=0.088, impl="kernel")
    check(out, ref, batch.num_tokens, jnp.bfloat16)


LONG_CASES = {
    # sequences of >= 128 new tokens in batches of >= 512 tokens take the Mosaic GPU
    # prefill path on a GPU
    "long_prefill": ([300], [300], dict(T=512)),
    "long_exact_tile": ([128, 256], [128, 256], dict(T=512)),
    "long_chunk_with_context": ([200], [1053], dict(T=512)),
    "long_mixed": ([1, 230, 1, 5, 1, 500], [33, 230, 640, 50, 9, 2000], dict(T=768)),
    "long_padding": ([129, 257], [129, 900], dict(T=512, R=4)),
}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name", list(CASES) + list(LONG_CASES))
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_fp8_kv_cache_vs_reference(name, block_size):
    """Float8 K/V on the GPU against the reference on the same cache: the Triton launches and,
    for the long cases, the Mosaic GPU prefill (checked in the lowered program), both converting
    K and V to f16; a query value past f16's range stays finite."""
    q_lens, kv_lens, kw = {**CASES, **LONG_CASES}[name]
    batch = make_batch(q_lens, kv_lens, num_q_heads=32, num_kv_heads=8, head_dim=128,
                       block_size=block_size, dtype=jnp.bfloat16, seed=1, **kw)
    q = batch.args[0].at[0, 0, 0].set(1e6)
    args = (q, *_fp8_caches(batch), *batch.args[3:])
    ref = ragged_paged_attention(*args, sm_scale=0.088, impl="reference")
    kernel = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.088, impl="kernel"))
    out = kernel(*args)
    assert ("mosaic_gpu" in kernel.lower(*args).as_text()) == (name in LONG_CASES)
    assert np.isfinite(np.asarray(jnp.asarray(out[0], jnp.float32))).all()
    check(out[1:], ref[1:], batch.num_tokens - 1, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name", list(LONG_CASES))
@pytest.mark.parametrize("heads,head_dim,block_size", [
    ((32, 8), 128, 16), ((8, 8), 64, 16), ((32, 4), 128, 32), ((16, 2), 128, 64)])
def test_gpu_long_prefill_vs_reference_bf16(name, heads, head_dim, block_size):
    q_lens, kv_lens, kw = LONG_CASES[name]
    batch = make_batch(q_lens, kv_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                       head_dim=head_dim, block_size=block_size, dtype=jnp.bfloat16,
                       seed=2, **kw)
    ref = ragged_paged_attention(*batch.args, sm_scale=0.088, impl="reference")
    out = ragged_paged_attention(*batch.args, sm_scale=0.088, impl="kernel")
    check(out, ref, batch.num_tokens, jnp.bfloat16)


@pytest.mark.parametrize("q_lens,T,R", [
    ([300], 300, 1), ([1, 230, 1, 5, 1, 500], 800, 8), ([128, 127, 129], 384, 3),
    ([0, 256, 0], 256, 3), ([5, 3], 128, 4)])
def test_mosaic_prefill_tiles_cover_long_sequences(q_lens, T, R):
    """Every row of a sequence with >= 128 new tokens lies in exactly the tiles of its
    sequence, each tile is 128 rows inside that sequence, and no other row is covered."""
    from pallas_kernels import prefill_mgpu
    n = len(q_lens)
    qsl = np.zeros(R + 1, np.int32)
    qsl[1:n + 1] = np.cumsum(q_lens)
    qsl[n + 1:] = qsl[n]
    ql = np.diff(qsl)
    seq, q0, is_long = (np.asarray(x) for x in prefill_mgpu.build_tiles(
        jnp.asarray(qsl), jnp.asarray(ql), T, R))
    assert is_long.tolist() == (ql >= prefill_mgpu.TILE_Q).tolist()
    covered = np.zeros(T, bool)
    for s, start in zip(seq, q0):
        if s < 0:
            continue
        assert qsl[s] <= start and start + prefill_mgpu.TILE_Q <= qsl[s + 1]
        covered[start:start + prefill_mgpu.TILE_Q] = True
    want = np.zeros(T, bool)
    for r in range(R):
        if ql[r] >= prefill_mgpu.TILE_Q:
            want[qsl[r]:qsl[r + 1]] = True
    assert (covered == want).all()
    assert len(seq) >= int(np.sum(np.where(is_long, -(-ql // prefill_mgpu.TILE_Q), 0)))


@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.float8_e4m3fn])
def test_garbage_in_unused_cache_rows_does_not_leak(kv_dtype):
    """NaN in every cache row that is not live context must not reach the output (the kernel
    loads V's masked-off rows as zeros; FP8 has a NaN too)."""
    batch = make_batch([1, 7], [20, 23], T=8, R=2, seed=21)
    q, k, v, kvl, bt, qsl, ns = batch.args
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    # keep block 0 (where masked-off key lanes point) out of the live set
    bt_np = batch.host["block_tables"]
    bt_np[bt_np == 0] = min(set(range(k.shape[0])) - set(bt_np.ravel().tolist()))
    bt = jnp.asarray(bt_np)
    ref = ragged_paged_attention_reference(q, k, v, kvl, bt, qsl, ns, sm_scale=0.125)
    live = np.zeros(k.shape[:2], bool)
    for r in range(2):
        for p in range(batch.host["kv_lens"][r]):
            live[batch.host["block_tables"][r, p // 16], p % 16] = True
    k = jnp.where(live[:, :, None, None], k, jnp.nan).astype(kv_dtype)
    v = jnp.where(live[:, :, None, None], v, jnp.nan).astype(kv_dtype)
    assert np.isnan(np.asarray(v, np.float32)).any()
    out = ragged_paged_attention_kernel(q, k, v, kvl, bt, qsl, ns,
                                        sm_scale=0.125, interpret=True, tiles=SMALL_TILES)
    check(out, ref, batch.num_tokens, jnp.float32)


def _invariant_batches(dtype):
    """One token (position 99 of sequence S, one query vector) in five batches: decoded alone,
    decoded beside others, last of a prefill chunk, in the middle of a longer chunk (the chunk's
    later keys masked for it), and beside padding. -> [(args, row of the token in q)]."""
    rng = np.random.default_rng(5)
    hq, hkv, d, bs, nb = 4, 2, 32, 16, 40
    k = jnp.asarray(rng.standard_normal((nb, bs, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((nb, bs, hkv, d)), dtype)
    blocks = rng.permutation(nb)
    tables = {"S": blocks[:8], "A": blocks[8:16], "B": blocks[16:24]}
    token = rng.standard_normal((hq, d))
    layouts = [([("S", 1, 100)], 0), ([("A", 1, 30), ("S", 1, 100), ("B", 20, 50)], 1),
               ([("B", 5, 60), ("S", 30, 100)], 34), ([("S", 40, 110)], 29),
               ([("A", 3, 9), ("S", 1, 100)], 3)]
    out = []
    for seqs, row in layouts:
        t = sum(ql for _, ql, _ in seqs) + 5                       # padding tokens after them
        q = rng.standard_normal((t, hq, d))
        q[row] = token
        qsl = np.concatenate([[0], np.cumsum([ql for _, ql, _ in seqs]), [t - 5]])
        args = (jnp.asarray(q, dtype), k, v,
                jnp.asarray([kl for *_, kl in seqs] + [0], jnp.int32),
                jnp.asarray(np.stack([tables[n] for n, *_ in seqs] + [blocks[24:32]]), jnp.int32),
                jnp.asarray(qsl, jnp.int32), jnp.asarray([len(seqs)], jnp.int32))
        out.append((args, row))
    return out


def _check_invariant_mode(dtype, kw, interpret):
    results = []
    for args, row in _invariant_batches(dtype):
        out = ragged_paged_attention_kernel(*args, sm_scale=0.17, interpret=interpret,
                                            invariant=True, **kw)
        ref = ragged_paged_attention_reference(*args, sm_scale=0.17, **kw)
        # compiled, float32 dots run on the tensor cores in TF32: bf16's tolerance
        check(out, ref, int(args[5][-1]), dtype if interpret else jnp.bfloat16)
        results.append(np.asarray(out[row].astype(jnp.float32)))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


INVARIANT_CASES = [{}, dict(sliding_window=40), dict(logits_soft_cap=4.0)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kw", INVARIANT_CASES)
def test_invariant_mode_token_result_does_not_depend_on_the_batch(dtype, kw):
    """Batch-invariant mode (interpret mode here): a token's output is bitwise the same decoded or
    inside a prefill chunk, alone or batched, and matches the reference."""
    _check_invariant_mode(dtype, kw, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kw", INVARIANT_CASES)
def test_gpu_invariant_mode_token_result_does_not_depend_on_the_batch(dtype, kw):
    _check_invariant_mode(dtype, kw, interpret=False)


def _pow2(x):
    return x > 0 and x & (x - 1) == 0


# Every tuned entry of the tile table (on its architecture) and the fallback tiles for the same
# shapes on an architecture without entries ("": interpret mode), plus fallbacks for other shapes.
TILE_CHOICES = sorted({(arch, *key) for arch, table in TILE_TABLE.items() for key in table}
                      | {("", *key) for table in TILE_TABLE.values() for key in table}
                      | {("", 64, 1, 16), ("", 256, 2, 32)})


@pytest.mark.parametrize("arch,head_dim,group,block_size", TILE_CHOICES)
def test_tile_choices_are_valid_and_exact(arch, head_dim, group, block_size):
    """The tiles get_tiles picks for a shape satisfy what the Triton launches need (power-of-two
    block shapes of >= 16 rows/keys, a long tile holding a whole number of padded head groups), a
    tuned entry keeps the Mosaic prefill path usable, and the kernel with those tiles equals the
    reference on a batch with decodes, a chunk at the short/long boundary and a prefill over
    several long tiles and key tiles (interpret mode)."""
    tiles = get_tiles(head_dim, group, block_size, arch=arch)
    if arch:
        assert tiles == TILE_TABLE[arch][(head_dim, group, block_size)]
    gp = 1 << (group - 1).bit_length()
    for cfg in (tiles.short, tiles.long, tiles.short_fp8 or tiles.short):
        assert _pow2(cfg.bk) and cfg.bk >= 16, cfg
        assert _pow2(cfg.num_warps) and cfg.num_stages >= 1, cfg
    assert _pow2(tiles.long_rows) and tiles.long_rows >= max(16, gp), tiles
    if arch and head_dim % 64 == 0:
        assert prefill_mgpu.supported(jnp.bfloat16, jnp.bfloat16, head_dim, block_size,
                                      tiles.prefill_block_kv, None, None), tiles

    bq_s, bq_l = max(1, 16 // gp), tiles.long_rows // gp
    long_q = 2 * bq_l + 3                      # two full long tiles and a ragged one
    ctx = 2 * max(tiles.long.bk, (tiles.short_fp8 or tiles.short).bk) + block_size + 5
    q_lens = [1, bq_s, bq_s + 1, long_q, 1]
    kv_lens = [ctx, bq_s + 7, bq_s + 1 + ctx, long_q + ctx, 3]
    batch = make_batch(q_lens, kv_lens, num_q_heads=2 * group, num_kv_heads=2,
                       head_dim=head_dim, block_size=block_size, T=sum(q_lens) + 3, R=6,
                       seed=head_dim + group)
    for num_splits in (None, 2):
        out, ref = run_both(batch.args, sm_scale=head_dim ** -0.5, tiles=tiles, num_splits=num_splits)
        check(out, ref, batch.num_tokens, jnp.float32)
    if tiles.short_fp8 is not None:
        args = (batch.args[0], *_fp8_caches(batch), *batch.args[3:])
        out, ref = run_both(args, sm_scale=head_dim ** -0.5, tiles=tiles)
        check(out, ref, batch.num_tokens, jnp.float32)
