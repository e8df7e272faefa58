"""The decode step's GEMM epilogues (pallas_kernels/decode_epilogue.py) against the XLA ops they
replace, at the Llama-3-8B shape: add_rms_norm (o's or down's output added to the residual stream,
then the next RMSNorm; FP8's one-row slices, or a whole bf16 output) over its warps,
rope_write_kv (a fused q+k+v output rotated, K and V written into a bf16 cache), and the
one-row FP8 GEMMs of o and down over the slices of their input feeding add_rms_norm, and (`--tails`)
those GEMMs adding to the residual stream themselves with the norm in the next GEMM. GPU time a call
from a profiler trace of `--calls` chained calls in one program (the kernels' time, launch gaps
apart), and the wall time a call.

    PYTHONPATH=.:bench python3 bench/epilogues.py [--rows 1 8] [--warps 4 8 16 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time

import common as C
import jax
import jax.numpy as jnp
from step_profile import kernel_summary

from pallas_kernels.decode_epilogue import add_rms_norm, rope_write_kv
from pallas_kernels.fp8_gemm import (ROW_BLOCK_N, fp8_partials, fp8_row_add_norm,
                                     fp8_row_norm_partials, one_row_tiles)
from pallas_kernels.reference import FP8, add_rms_norm_reference, rope_write_kv_reference

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


def _gpu_time(fn, args, calls, kernels=()):
    """(GPU µs a call from a trace, wall µs a call) of fn(*args), which runs `calls` calls, then
    the GPU µs a call of each kernel in `kernels` (by name prefix)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(5):
        out = fn(*args)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / 5 / calls * 1e6
    trace_dir = tempfile.mkdtemp(prefix="epilogue-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    summary = kernel_summary(trace_dir)
    per_kernel = [sum(k["ms"] for k in summary.get("kernels", []) if k["name"].startswith(name))
                  * 1e3 / calls for name in kernels]
    return (summary.get("busy_ms", float("nan")) * 1e3 / calls, wall, *per_kernel)


def add_norm_rows(rows, warps, calls):
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (rows, HIDDEN)).astype(jnp.bfloat16)
    weight = jnp.ones(HIDDEN, jnp.bfloat16)
    o_slices = one_row_tiles(HIDDEN, HIDDEN).splits  # FP8's one-row o (and down) GEMM
    slices = [("FP8 one-row slices", jax.random.normal(ks[1], (o_slices, rows, HIDDEN)),
               jnp.full(HIDDEN, 1e-2)),
              ("a whole bf16 output", jax.random.normal(ks[2], (1, rows, HIDDEN)).astype(jnp.bfloat16),
               None)]
    out = []
    for what, partials, scale in slices:
        if rows > 1 and partials.shape[0] > 1:
            continue  # the one-row GEMM's slices come at one row only
        variants = [("XLA", add_rms_norm_reference)] + [
            (f"kernel, {w} warps", functools.partial(add_rms_norm, warps=w)) for w in warps]
        for name, f in variants:
            @jax.jit
            def chained(x, partials, scale, weight, f=f):
                acc = jnp.zeros_like(x)
                for _ in range(calls):
                    x, h = f(x, partials, scale, weight, 1e-5)
                    acc = acc + h  # keeps each norm live
                return x, acc
            gpu, wall = _gpu_time(chained, (x, partials, scale, weight), calls)
            out.append([f"add_rms_norm, {rows} row(s), {what}", name, gpu, wall])
    return out


def rope_rows(rows, calls):
    ks = jax.random.split(jax.random.key(1), 2)
    n = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv_slices = one_row_tiles(n, HIDDEN).splits  # FP8's one-row fused q+k+v GEMM
    cases = [("FP8 one-row slices", jax.random.normal(ks[0], (qkv_slices, rows, n)),
              jnp.full(n, 1e-2)),
             ("a whole bf16 output", jax.random.normal(ks[1], (1, rows, n)).astype(jnp.bfloat16), None)]
    emb = jnp.ones((rows, HEAD_DIM)) * 0.3
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    blocks, bs = 64, 16  # small: the caches' copy into the program is ~0.1 µs a call
    slots = jnp.arange(rows, dtype=jnp.int32) * 7
    out = []
    for what, partials, scale in cases:
        if rows > 1 and partials.shape[0] > 1:
            continue
        for name, f in (("XLA", rope_write_kv_reference), ("kernel", rope_write_kv)):
            @jax.jit
            def chained(partials, scale, cos, sin, slots, k, v, f=f):
                acc = jnp.zeros((rows, HEADS, HEAD_DIM), jnp.bfloat16)
                for i in range(calls):
                    q, k, v = f(partials, scale, cos, sin, slots + i, k, v, num_heads=HEADS,
                                dtype=jnp.bfloat16)
                    acc = acc + q
                return acc, k, v

            cache = jnp.zeros((blocks, bs, KV_HEADS, HEAD_DIM), jnp.bfloat16)
            gpu, wall = _gpu_time(chained, (partials, scale, cos, sin, slots, cache, cache),
                                     calls)
            out.append([f"rope_write_kv, {rows} row(s), {what}", name, gpu, wall])
    return out


def gemm_norm_rows(calls, splits):
    """FP8's one-row GEMM of o (4096 x 4096) and of down (4096 x 14336) with its input cut into
    each number of `splits` slices, their partial sums into add_rms_norm (the engine's decode
    epilogue): the GEMM and the norm each call, chained through the norm's output."""
    out = []
    for name, k in (("o", HIDDEN), ("down", INTERMEDIATE)):
        ks = jax.random.split(jax.random.key(3), 2)
        w = (jax.random.normal(ks[0], (HIDDEN, k)) * k ** -0.5).astype(FP8)
        scale = jnp.full(HIDDEN, 1e-2)
        x = jax.random.normal(ks[1], (1, HIDDEN)).astype(jnp.bfloat16)
        weight = jnp.ones(HIDDEN, jnp.bfloat16)
        base = one_row_tiles(HIDDEN, k)
        for s in splits:
            if (k // base.block_k) % s:
                continue
            tiles = dataclasses.replace(base, splits=s)

            @jax.jit
            def chained(x, w, scale, weight, tiles=tiles, k=k):
                h = x
                for _ in range(calls):
                    inp = jnp.tile(h, (1, -(-k // HIDDEN)))[:, :k]
                    x, h = add_rms_norm(x, fp8_partials(inp, w, tiles=tiles), scale, weight, 1e-5)
                return x, h
            gpu, wall, gemm, norm = _gpu_time(chained, (x, w, scale, weight), calls,
                                              ("fp8_matmul", "add_rms_norm"))
            out.append([f"FP8 {name} one row, then add_rms_norm", f"{s} slice(s)"
                        + (" (engine)" if s == base.splits else ""), gpu, wall,
                        f"GEMM {gemm:.2f}, norm {norm:.2f}"])
    return out


def tail_rows(layers):
    """One-row FP8 o then gate+up, `layers` times with weights of their own (cold in L2, as a
    step's): the engine before its GEMM tails (o's slices into add_rms_norm, its normed output
    into gate+up) against now (o's tails add the residual stream and sum its squares by block,
    gate+up finishes the norm in its prologue: fp8_row_add_norm, fp8_row_norm_partials); chained
    through gate+up's first 4096 outputs as the next o's input."""
    ks = jax.random.split(jax.random.key(6), 2 * layers + 1)
    w_o = [(jax.random.normal(k, (HIDDEN, HIDDEN)) * HIDDEN ** -0.5).astype(FP8)
           for k in ks[1:layers + 1]]
    w_gu = [(jax.random.normal(k, (2 * INTERMEDIATE, HIDDEN)) * HIDDEN ** -0.5).astype(FP8)
            for k in ks[layers + 1:]]
    x = jax.random.normal(ks[0], (1, HIDDEN)).astype(jnp.bfloat16)
    scale, weight = jnp.full(HIDDEN, 1e-2), jnp.ones(HIDDEN, jnp.bfloat16)
    o_tiles, gu_tiles = one_row_tiles(HIDDEN, HIDDEN), one_row_tiles(2 * INTERMEDIATE, HIDDEN)

    @jax.jit
    def before(x, w_o, w_gu):
        y = x
        for wo, wg in zip(w_o, w_gu):
            x, h = add_rms_norm(x, fp8_partials(y, wo, tiles=o_tiles), scale, weight, 1e-5)
            y = fp8_partials(h, wg, tiles=gu_tiles).sum(0)[:, :HIDDEN].astype(x.dtype)
        return x, y

    @jax.jit
    def tails(x, w_o, w_gu):
        y, counts = x, jnp.zeros(HIDDEN // ROW_BLOCK_N, jnp.int32)
        for wo, wg in zip(w_o, w_gu):
            x, ssq, counts = fp8_row_add_norm(y, wo, scale, x, counts)
            y = fp8_row_norm_partials(x, ssq, weight, 1e-5, wg).sum(0)[:, :HIDDEN].astype(x.dtype)
        return x, y

    out = []
    for name, fn in (("before: GEMM, add_rms_norm, GEMM", before),
                     ("GEMM tail, GEMM with the norm's prologue", tails)):
        gpu, wall, *kernels = _gpu_time(fn, (x, w_o, w_gu), layers, (
            "fp8_matmul", "add_rms_norm", "fp8_row_add_norm", "fp8_row_norm_matmul"))
        out.append(["FP8 one row: o, the add and norm, gate+up (a layer's weights each)", name,
                    gpu, wall, ", ".join(f"{k} {t:.2f}" for k, t in zip(
                        ("GEMMs", "add_rms_norm", "o with its tail", "gate+up with the norm"),
                        kernels) if t)])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--calls", type=int, default=64)
    C.add_output_args(p)
    p.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="input slices of the one-row o and down GEMMs before add_rms_norm")
    p.add_argument("--tails", type=int, default=0, metavar="LAYERS",
                   help="also time FP8's one-row GEMM tails over this many layers' weights")
    args = p.parse_args()
    rows = []
    for r in args.rows:
        rows += add_norm_rows(r, args.warps, args.calls) + rope_rows(r, args.calls)
    rows = [row + [""] for row in rows] + gemm_norm_rows(args.calls, args.splits)
    if args.tails:
        rows += tail_rows(args.tails)
    C.emit({"rows": rows}, args, C.table(rows, ["op", "variant", "GPU µs a call",
                                                 "wall µs a call", "kernels, µs a call"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
