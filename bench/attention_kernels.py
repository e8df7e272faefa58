"""Ragged paged attention on one GPU: validate against the reference, then time.

    PYTHONPATH=. python3 bench/attention_kernels.py [--sweep] [--out DIR] [--kv-dtype fp8]

Prints a table: decode (KV bandwidth vs a measured copy and vs JAX's Triton
paged_attention op), prefill (TFLOP/s vs cuDNN flash attention on the same,
unpaged data, and with the Mosaic GPU prefill path off) and a mixed batch (vs the sum of its two parts).
Timing: jitted calls dispatched back to back, median over repetitions of the
per-call time, after warm-up; inputs rotate among several copies when one copy
would fit in L2. `--kv-dtype fp8` runs the decode section on float8 e4m3 caches
(`kv_cache_dtype="fp8"`: the read rate counts their bytes; JAX's op is not run on them).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import ragged_paged_attention  # noqa: E402
from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    TileConfig, Tiles, get_tiles, ragged_paged_attention_kernel)
from pallas_kernels.reference import make_attention_batch  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
DT = jnp.bfloat16
SCALE = 1.0 / math.sqrt(D)
L2_BYTES = 50 << 20
DECODE_BATCHES, DECODE_CONTEXTS = (1, 16, 64, 256), (512, 2048, 8192)
INTERPRET = jax.default_backend() != "gpu"  # CPU smoke runs only


# Block tables exactly as wide as the longest context: prefill_section gathers them into dense K/V.
make_batch = functools.partial(make_attention_batch, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                               block_size=BS, dtype=DT)


def bench(fn, arg_sets, iters=None, reps=7, min_time=0.2):
    """Median per-call seconds; fn(*args) for args cycling over arg_sets."""
    out = fn(*arg_sets[0])
    jax.block_until_ready(out)
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    if iters is None:
        t0 = time.perf_counter()
        for i in range(5):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per = (time.perf_counter() - t0) / 5
        iters = int(max(10, min(2000, min_time / max(per, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def rel_err(out, ref, n):
    o = np.asarray(out[:n], np.float32)
    r = np.asarray(ref[:n], np.float32)
    if not np.all(np.isfinite(o)):
        return float("inf")
    return float(np.linalg.norm(o - r) / np.linalg.norm(r))


def kernel_fn(tiles=None, num_splits=None, **kw):
    return jax.jit(lambda q, k, v, *ints: ragged_paged_attention_kernel(
        q, k, v, *ints, sm_scale=SCALE, tiles=tiles, num_splits=num_splits,
        interpret=INTERPRET, **kw))


REF = jax.jit(lambda q, k, v, *ints: ragged_paged_attention(
    q, k, v, *ints, sm_scale=SCALE, impl="reference"))


def copy_bandwidth():
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a * 1.5 + 1.0)
    t = bench(f, [(x,)], iters=20)
    return 2 * x.size * 2 / t


def validate(log):
    cases = {
        "decode": ([1, 1, 1, 1, 1], [1, 16, 17, 40, 777], {}),
        "prefill": ([37, 300], [37, 300], {}),
        "chunked_prefill": ([200], [1053], {}),
        "mixed": ([1, 230, 1, 5, 1], [33, 230, 640, 50, 9], {}),
        "block_edges": ([15, 17, 33], [31, 17, 48], {}),
        "padding": ([3, 1, 9], [40, 5, 9], dict(T=24, R=6)),
        "long_decode_split": ([1, 1], [8000, 3000], dict(T=8, R=4)),
    }
    worst = 0.0
    for name, (ql, kl, kw) in cases.items():
        for extra in ({}, dict(sliding_window=100), dict(logits_soft_cap=30.0)):
            b = make_batch(ql, kl, seed=len(name), **kw)
            f = jax.jit(lambda q, k, v, *i: ragged_paged_attention_kernel(
                q, k, v, *i, sm_scale=SCALE, interpret=INTERPRET, **extra))
            r = jax.jit(lambda q, k, v, *i: ragged_paged_attention(
                q, k, v, *i, sm_scale=SCALE, impl="reference", **extra))
            e = rel_err(f(*b.args), r(*b.args), b.num_tokens)
            worst = max(worst, e)
            log(f"validate {name:18s} {str(extra):28s} rel_err={e:.2e}")
    # f32 inputs too
    b = make_batch([1, 70, 1], [100, 70, 33], dtype=jnp.float32, T=80, R=4)
    e = rel_err(kernel_fn()(*b.args), REF(*b.args), b.num_tokens)
    log(f"validate f32 mixed rel_err={e:.2e}")
    return worst, e


def jax_paged_op():
    from jax.experimental.pallas.ops.gpu import paged_attention as pa
    return jax.jit(lambda q, kp, vp, bt, lens: pa.paged_attention(q, kp, vp, bt, lens))


def decode_section(log, copy_bw, rows, sweep=False, kv_dtype=DT):
    pa = None
    try:
        pa = jax_paged_op() if kv_dtype == DT else None
    except Exception as e:  # pragma: no cover
        log(f"jax paged_attention unavailable: {e}")
    for B in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            kv_bytes = B * ctx * HKV * D * 2 * jnp.dtype(kv_dtype).itemsize
            copies = max(1, min(8, -(-4 * L2_BYTES // kv_bytes)))
            # no spare block: 256 x 8192 keys in FP8 fill a cache of 2**31 elements, the most allowed
            b = make_batch([1] * B, [ctx] * B, seed=B + ctx, copies=copies, spare_blocks=0)
            q, caches, ints, n = b.q, b.caches, b.metadata, b.num_tokens
            caches = [(k.astype(kv_dtype), v.astype(kv_dtype)) for k, v in caches]
            kvl, bt, qsl, ns = ints
            del b  # `del caches` below frees the copies
            f = kernel_fn()
            o = f(q, *caches[0], *ints)
            err = rel_err(o, REF(q, *caches[0], *ints), n)
            t = bench(f, [(q, k, v, *ints) for k, v in caches])
            row = dict(kind="decode", kv=jnp.dtype(kv_dtype).name, B=B, ctx=ctx, us=t * 1e6,
                       tbps=kv_bytes / t / 1e12,
                       frac=kv_bytes / t / copy_bw, err=err)
            if pa is not None:
                try:
                    pcs = [(k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)) for k, v in caches]
                    op = pa(q * SCALE, *pcs[0], bt, kvl)   # the op takes no sm_scale
                    row["jax_err"] = rel_err(op, o, n)
                    qs_ = q * SCALE
                    tj = bench(pa, [(qs_, kp, vp, bt, kvl) for kp, vp in pcs])
                    row["jax_us"] = tj * 1e6
                    row["jax_tbps"] = kv_bytes / tj / 1e12
                    del pcs
                except Exception as e:
                    log(f"jax op failed B={B} ctx={ctx}: {type(e).__name__}: {str(e)[:200]}")
            log(json.dumps(row))
            rows.append(row)
            if sweep and (B, ctx) in ((64, 2048), (1, 8192), (16, 2048)):
                for bk, warps, stages in ((32, 4, 3), (64, 4, 3), (64, 2, 3), (128, 8, 3),
                                          (32, 2, 4)):
                    for ns in (1, 2, 4, 8, 16):
                        if (B >= 64 and ns > 4) or (B == 1 and ns < 8):
                            continue
                        tiles = Tiles(TileConfig(bk, warps, stages), 128, TileConfig(64, 8, 3))
                        try:
                            g = kernel_fn(tiles=tiles, num_splits=ns)
                            e2 = rel_err(g(q, *caches[0], *ints), o, n)
                            t2 = bench(g, [(q, k, v, *ints) for k, v in caches], reps=5)
                            log(f"sweep decode B={B} ctx={ctx} bk={bk} w={warps} st={stages} "
                                f"splits={ns}: {t2*1e6:.1f} us {kv_bytes/t2/1e12:.2f} TB/s err={e2:.1e}")
                        except Exception as e:
                            log(f"sweep fail {bk},{warps},{stages},{ns}: {str(e)[:150]}")
            del caches


def prefill_section(log, rows, sweep=False, kv_dtype=DT):
    for B, L in ((1, 4096), (4, 2048)):
        flops = 4 * B * (L * L / 2) * HQ * D
        b = make_batch([L] * B, [L] * B, seed=L)
        q, (k, v), ints, n = b.q, b.caches[0], b.metadata, b.num_tokens
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
        kvl, bt, qsl, ns = ints
        # same data (an FP8 cache's values in bf16), unpaged, for cuDNN: gather each
        # sequence's blocks
        kd = k[bt].reshape(B, L, HKV, D).astype(DT)
        vd = v[bt].reshape(B, L, HKV, D).astype(DT)
        qd = q.reshape(B, L, HQ, D)
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=SCALE, implementation="cudnn"))
        f = kernel_fn()
        o = f(q, k, v, *ints)
        row = dict(kind="prefill", kv=jnp.dtype(kv_dtype).name, B=B, L=L)
        try:
            oc = cud(qd, kd, vd)
            row["err_vs_cudnn"] = rel_err(o, oc.reshape(B * L, HQ, D), n)
            tc = bench(cud, [(qd, kd, vd)])
            row["cudnn_us"] = tc * 1e6
            row["cudnn_tflops"] = flops / tc / 1e12
        except Exception as e:
            log(f"cudnn failed: {type(e).__name__}: {str(e)[:300]}")
        t = bench(f, [(q, k, v, *ints)])
        row.update(us=t * 1e6, tflops=flops / t / 1e12)
        # the same call with the Mosaic GPU prefill path off (Triton tiles only)
        tt = bench(kernel_fn(prefill_backend="triton"), [(q, k, v, *ints)])
        row.update(triton_us=tt * 1e6, triton_tflops=flops / tt / 1e12)
        log(json.dumps(row))
        rows.append(row)
        if sweep:
            for long_rows, bk, warps, stages, sm in (
                    (128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
                    (128, 64, 4, 3, True), (64, 64, 4, 3, True), (128, 32, 4, 4, True),
                    (128, 64, 8, 4, True), (256, 64, 8, 3, True)):
                tiles = Tiles(get_tiles(D, HQ // HKV, BS).short, long_rows,
                              TileConfig(bk, warps, stages, sm))
                try:
                    g = kernel_fn(tiles=tiles, prefill_backend="triton")
                    e2 = rel_err(g(q, k, v, *ints), o, n)
                    t2 = bench(g, [(q, k, v, *ints)], reps=5)
                    log(f"sweep prefill {B}x{L} rows={long_rows} bk={bk} w={warps} "
                        f"st={stages} split_mask={sm}: {t2*1e6:.0f} us {flops/t2/1e12:.0f} TFLOP/s err={e2:.1e}")
                except Exception as e:
                    log(f"sweep fail {long_rows},{bk},{warps},{stages}: {str(e)[:150]}")


def mixed_section(log, rows):
    ctx = 2048
    f = kernel_fn()
    mixed = make_batch([512] + [1] * 63, [ctx] * 64, T=576, R=64, seed=1)
    om = f(*mixed.args)
    err = rel_err(om, REF(*mixed.args), mixed.num_tokens)
    tm = bench(f, [mixed.args])
    tp = bench(f, [make_batch([512], [ctx], T=512, R=1, seed=2).args])
    td = bench(f, [make_batch([1] * 63, [ctx] * 63, T=64, R=64, seed=3).args])
    row = dict(kind="mixed", us=tm * 1e6, prefill_us=tp * 1e6, decode_us=td * 1e6,
               sum_us=(tp + td) * 1e6, err=err)
    log(json.dumps(row))
    rows.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="validate,decode,prefill,mixed")
    ap.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                    help="The decode and prefill sections' cache dtype.")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "kernels_log.txt"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    dev = jax.devices()[0]
    log(f"device={dev.device_kind} jax={jax.__version__} backend={jax.default_backend()}")
    secs = args.sections.split(",")
    rows = []
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth (read+write) {copy_bw/1e12:.2f} TB/s")
    val = None
    kv_dtype = jnp.float8_e4m3fn if args.kv_dtype == "fp8" else DT
    for name, fn in (("validate", lambda: validate(log)),
                     ("prefill", lambda: prefill_section(log, rows, args.sweep, kv_dtype)),
                     ("decode", lambda: decode_section(log, copy_bw, rows, args.sweep, kv_dtype)),
                     ("mixed", lambda: mixed_section(log, rows))):
        if name not in secs:
            continue
        t0 = time.time()
        try:
            r = fn()
            if name == "validate":
                val = r
        except Exception:
            log(f"SECTION {name} FAILED:\n{traceback.format_exc()[-3000:]}")
        log(f"[{name} took {time.time()-t0:.0f} s]")

    print_table(log, rows, copy_bw, val, dev)


def print_table(log, rows, copy_bw, val, dev):
    log("")
    log(f"## {dev.device_kind}, jax {jax.__version__}; copy bandwidth {copy_bw/1e12:.2f} TB/s")
    if val:
        log(f"validation: worst bf16 rel err {val[0]:.2e}, f32 {val[1]:.2e}")
    log("| decode B | ctx | KV | kernel us | KV TB/s | % of copy | JAX op us | JAX op TB/s "
        "| speedup | rel err |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["kind"] == "decode":
            ju = r.get("jax_us")
            jcols = ("- | - | -" if ju is None else
                     "%.1f | %.2f | %.2fx" % (ju, r["jax_tbps"], ju / r["us"]))
            log("| %d | %d | %s | %.1f | %.2f | %.0f%% | %s | %.1e |" % (
                r["B"], r["ctx"], r["kv"], r["us"], r["tbps"], 100 * r["frac"], jcols, r["err"]))
    log("")
    log("| prefill | KV | kernel us | TFLOP/s | cuDNN us | cuDNN TFLOP/s | % of cuDNN | rel err vs cuDNN "
        "| Triton-only us | Triton-only % of cuDNN |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["kind"] == "prefill":
            cu = r.get("cudnn_tflops")
            pct = (lambda tf: "-" if not cu else "%.0f%%" % (100 * tf / cu))
            log("| %d x %d | %s | %.0f | %.0f | %.0f | %.0f | %s | %.1e | %.0f | %s |" % (
                r["B"], r["L"], r["kv"], r["us"], r["tflops"], r.get("cudnn_us", float("nan")),
                cu or float("nan"), pct(r["tflops"]), r.get("err_vs_cudnn", float("nan")),
                r["triton_us"], pct(r["triton_tflops"])))
    log("")
    for r in rows:
        if r["kind"] == "mixed":
            log("| mixed (512-token chunk + 63 decodes, ctx 2048) | us |")
            log("| --- | --- |")
            log(f"| one call | {r['us']:.0f} |")
            log(f"| prefill chunk alone + decodes alone | {r['prefill_us']:.0f} + {r['decode_us']:.0f} "
                f"= {r['sum_us']:.0f} |")
            log(f"| rel err | {r['err']:.1e} |")


if __name__ == "__main__":
    main()
