"""The quantized weight GEMMs at decode sizes, per format: FP8 (XLA's weight-only Triton GEMM, what
models/quant.fp8_linear compiles up to 16 rows, against pallas_kernels/fp8_gemm.py) and int4 (XLA
dequantizing then multiplying, int4_matmul_reference, against pallas_kernels/int4_gemm.py), each
Pallas kernel over a sweep of its tilings, beside bf16 and each format's roofline (weight bytes,
with int4's float32 scales and offsets, at the copy bandwidth measured in the same run). "int4" has
integer zero points (AWQ's, GPTQ's and the engine's quantization: the kernel dequantizes in bf16
pairs), "int4-min" the same values with a float32 min per group (GGUF's Q4_1 and Q4_K: through
float32).

    PYTHONPATH=.:bench python3 bench/decode_gemm.py [--formats fp8 int4 int4-min] [--rows 1 8 16] [--layers 32]

Each linear of the Llama-3-8B shape runs as a model step runs it: one program over `--layers`
weights (more bytes than the L2 holds; no host dispatch between calls), time per layer the median
program time divided by the layer count. (A scan over stacked weights copied each layer's slice
first: it read bf16 at 40% of the copy bandwidth.) q/k/v and gate/up are timed apart and
fused (one weight, outputs concatenated; the engine fuses quantized ones, models/fused.py).
"""
from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from attention_kernels import bench

GROUP = 128  # int4 group size (AWQ's and GPTQ's usual)
SHAPES = {"gate+up": (28672, 4096), "down": (4096, 14336), "q+k+v": (6144, 4096),
          "o": (4096, 4096), "k": (1024, 4096), "gate": (14336, 4096)}  # (N, K); q is o's shape


def _int4_tilings(rows: int, n: int, k: int) -> list:
    """The engine's tiling (default_tiles) and neighbours of Tiles()'s defaults: column tiles,
    slices, warps, pipeline stages; and the engine's and Tiles()'s with float16 pairs. Past 32
    rows also row tiles of 64 (each weight tile dequantized once, not once per 32 rows)."""
    import dataclasses

    from pallas_kernels.int4_gemm import Tiles, default_tiles
    whole = ([Tiles(block_m=64), Tiles(block_m=64, num_warps=8), Tiles(block_m=64, block_n=128),
              Tiles(block_m=64, block_n=128, num_warps=8)] if rows > 32 else [])
    return list(dict.fromkeys([default_tiles(rows)] + whole + [
        Tiles(), Tiles(block_n=32), Tiles(block_n=128), Tiles(splits=4),
        Tiles(splits=16), Tiles(num_warps=8), Tiles(num_warps=2), Tiles(num_stages=2),
        Tiles(num_stages=4), dataclasses.replace(default_tiles(rows), f16=True),
        Tiles(f16=True)]))


def _fp8_tilings(rows: int, n: int, k: int) -> list:
    """The tilings worth timing (the fastest of a wider sweep, bench/RESULTS.md, "FP8"), and for
    one row the engine's (one_row_tiles) with other warp and pipeline-stage counts."""
    import dataclasses

    from pallas_kernels.fp8_gemm import Tiles, one_row_tiles
    if rows == 1:
        engine = one_row_tiles(n, k)
        return [Tiles(block_n=bn, block_k=bk, splits=s, mode=mode) for mode, bn, bk, s in [
            ("fma", 32, 128, 2), ("fma", 32, 128, 8), ("fma", 64, 128, 8), ("fma", 64, 128, None),
            ("fma", 32, 256, 4), ("dot", 64, 128, 8), ("dot", 32, 256, 4)]] + [
            dataclasses.replace(engine, num_warps=w, num_stages=st)
            for w, st in ((4, 2), (4, 4), (8, 2), (8, 3), (8, 4), (2, 3))]
    return [Tiles(block_n=bn, block_k=bk, splits=s) for bn, bk, s in [
        (64, 128, 2), (64, 256, 4), (32, 256, 2), (32, 128, None)]]


def layers_program(mm, compiler_options=None):
    """One program over every layer's weight (a list: no slice of a stacked array is copied),
    each GEMM's output added into one sum (fused into its epilogue, no kernel of its own)."""
    def run(ws, x):
        acc = None
        for w in ws:
            y = mm(x, *w).astype(jnp.float32)
            acc = y if acc is None else acc + y
        return acc.sum()
    return jax.jit(run, compiler_options=compiler_options)


def _format(fmt: str, w16: list, n: int, k: int) -> tuple:
    """Per layer the weight's arguments in the format's layout, XLA's linear for them, the Pallas
    kernel (tiles -> fn), its tilings, whether a tiling fits, and the weight's bytes."""
    if fmt == "fp8":
        from jaxvllm.models.quant import fp8_linear
        from pallas_kernels.reference import to_fp8
        from pallas_kernels.fp8_gemm import fits, fp8_matmul
        ws = [(to_fp8(w.T.astype(jnp.float32) * 64), jnp.full((n,), 1 / 64, jnp.float32))
              for w in w16]  # [N, K] and its scale, as models/quant.py stores them
        return (ws, fp8_linear, lambda t: lambda x, w, s: fp8_matmul(x, w, s, tiles=t),
                _fp8_tilings, lambda rows, t: fits(n, k, t) and (t.mode != "fma" or rows == 1),
                n * k)
    from jaxvllm.models.int4 import quantize_int4
    from pallas_kernels import int4_gemm, int4_matmul, int4_matmul_reference
    ws = [quantize_int4(w, GROUP) for w in w16]
    if fmt == "int4-min":  # the same values with a float32 min per group (GGUF's Q4_1 and Q4_K)
        ws = [(w, s, -z.astype(jnp.float32) * s) for w, s, z in ws]
    offset_bytes = 4 if fmt == "int4-min" else 1
    return (ws, int4_matmul_reference,
            lambda t: lambda x, w, s, o: int4_matmul(x, w, s, o, tiles=t), _int4_tilings,
            lambda rows, t: rows <= int4_gemm.MAX_ROWS and int4_gemm.fits(n, k, GROUP),
            n * k // 2 + (4 + offset_bytes) * n * (k // GROUP))


def run(args: argparse.Namespace) -> int:
    bw = common.measure_bandwidth(1 << 31)
    triton = {"xla_gpu_enable_triton_gemm": True}
    result, rows_out = {"copy_tbs": bw / 1e12, "shapes": {}}, []
    t_start = time.perf_counter()
    for name, (n, k) in SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        key = jax.random.key(n + k)
        w16 = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * k ** -0.5
               for i in range(args.layers)]
        for m in args.rows:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            per = lambda fn, ws: bench(fn, [(ws, x)], reps=5, min_time=0.1) / args.layers  # noqa: E731
            bf16_us = per(layers_program(lambda x, w: x @ w, triton), [(w,) for w in w16]) * 1e6
            for fmt in args.formats:
                ws, xla_fn, kernel, tilings, fits, nbytes = _format(fmt, w16, n, k)
                res = result["shapes"].setdefault(name, {}).setdefault(m, {})[fmt] = {
                    "bf16_us": bf16_us}
                res["xla_us"] = per(layers_program(xla_fn, triton), ws) * 1e6
                # Checked output by output against one layer's reference (a sum over the outputs
                # cancels to a few percent of their count and moved by their bf16 rounding alone).
                ref = np.asarray(jax.jit(xla_fn)(x, *ws[0]), np.float32)
                best = None
                for tiles in tilings(m, n, k):
                    if time.perf_counter() - t_start > args.budget_s:
                        break  # the sweep's time is up: the remaining shapes keep their baselines
                    if not fits(m, tiles):
                        continue
                    try:
                        fn = layers_program(kernel(tiles))
                        got = np.asarray(jax.jit(kernel(tiles))(x, *ws[0]), np.float32)
                        us = per(fn, ws) * 1e6
                    except Exception as e:  # noqa: BLE001 (a tiling Triton refuses is skipped)
                        print(f"  {fmt} {name} m={m} {tiles}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    err = np.abs(got - ref).max() / np.abs(ref).max()
                    if err > 1e-2:
                        print(f"  {fmt} {name} m={m} {tiles}: wrong output (max error {err:.2%} "
                              f"of the largest)")
                        continue
                    print(f"  {fmt} {name} m={m} {tiles}: {us:.1f} us", flush=True)
                    if best is None or us < best[0]:
                        best = (us, tiles)
                res["pallas_us"], res["pallas_tiles"] = (
                    (best[0], str(best[1])) if best else (None, None))
                res["roofline_us"] = roof = nbytes / bw * 1e6
                row = [fmt, name, m, f"{bf16_us:.1f} ({2 * n * k / bw * 1e6 / bf16_us:.0%})",
                       f"{res['xla_us']:.1f} ({roof / res['xla_us']:.0%})",
                       "-" if not best else f"{best[0]:.1f} ({roof / best[0]:.0%})",
                       "-" if not best else str(best[1]).replace("Tiles", "")]
                rows_out.append(row)
                print(" | ".join(map(str, row)), f"[{time.perf_counter() - t_start:.0f} s]",
                      flush=True)
    common.emit(result, args, f"Quantized GEMMs per layer, us (share of the format's roofline); "
                f"copy {bw / 1e12:.2f} TB/s; {jax.devices()[0].device_kind}\n" + common.table(
                    rows_out, ["format", "linear", "rows", "bf16 (XLA)", "XLA", "Pallas best",
                               "tiles"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", nargs="+", default=["fp8", "int4", "int4-min"],
                        choices=["fp8", "int4", "int4-min"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="Only these linears (default: all).")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="Stop sweeping tilings after this many seconds.")
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("decode_gemm", __doc__, add_args, run))
