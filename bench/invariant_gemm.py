"""Batch-invariant mode's GEMMs (models/layers.matmul with `invariant`) against the plain GEMM, per
linear of the Llama-3-8B shape and number of rows: XLA's GEMM, the per-tile form (`lax.map` over
16-row tiles, layers.tiled_matmul: what the mode runs off the GPU kernel's shapes) and pallas_kernels/invariant_gemm.py
over a sweep of its tilings, each checked bitwise: a row's result at 1, 7 and 100 rows against the
same row among 128.

    PYTHONPATH=.:bench python3 bench/invariant_gemm.py [--rows 1 128] [--layers 8]

Each linear runs as a model step runs it: one program over `--layers` weights (more bytes than the
L2 holds), µs a layer, compiled with the mode's compiler options.
"""
from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
from decode_gemm import layers_program
from attention_kernels import bench

from jaxvllm.models import layers
from pallas_kernels import invariant_gemm

SHAPES = {"q+k+v": (6144, 4096), "o": (4096, 4096), "gate+up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}  # (N, K)
INVARIANT = dict(layers.INVARIANT_COMPILER_OPTIONS)
T = invariant_gemm.Tiles
TILINGS = [T(), T(rows=16), T(rows=16, block_n=128), T(rows=32), T(rows=32, block_n=128),
           T(rows=64, block_n=128), T(rows=128, block_n=128, num_warps=8)]


def _bitwise(tiles: invariant_gemm.Tiles, x: jax.Array, w: jax.Array) -> bool:
    mm = jax.jit(lambda x, w: invariant_gemm.invariant_matmul(x, w, tiles=tiles))
    full = np.asarray(mm(x, w))
    return all(np.array_equal(np.asarray(mm(x[:m], w)), full[:m]) for m in (1, 7, 100))


def run(args: argparse.Namespace) -> int:
    rows_out, result, not_bitwise = [], {}, []
    for name, (n, k) in SHAPES.items():
        count = 2 if name == "lm_head" else args.layers  # 1 GiB a weight
        ws = [(jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * k ** -0.5,)
              for i in range(count)]
        xs = jax.random.normal(jax.random.key(n + k), (128, k), jnp.bfloat16)
        not_bitwise += [f"{name} {t}" for t in TILINGS if not _bitwise(t, xs, ws[0][0])]
        for m in args.rows:
            x = jnp.resize(xs, (m, k))
            per = lambda fn: bench(fn, [(ws, x)], reps=5, min_time=0.1) / count * 1e6  # noqa: E731
            program = lambda mm: layers_program(mm, INVARIANT)  # noqa: E731
            times = [per(program(lambda x, w: x @ w)), per(program(layers.tiled_matmul))]
            times += [per(program(lambda x, w, t=t: invariant_gemm.invariant_matmul(x, w, tiles=t)))
                      for t in TILINGS]
            result.setdefault(name, {})[m] = times
            rows_out.append([name, m] + [f"{t:.1f}" for t in times])
            print(" | ".join(map(str, rows_out[-1])), flush=True)
    heads = ["linear", "rows", "XLA (plain)", "per 16-row tile"] + [
        f"kernel r{t.rows} n{t.block_n} k{t.block_k} w{t.num_warps}" for t in TILINGS]
    common.emit({"us": result, "not_bitwise": not_bitwise}, args,
                f"Batch-invariant GEMMs per layer, µs; {jax.devices()[0].device_kind}; not bitwise: "
                f"{not_bitwise or 'none'}\n" + common.table(rows_out, heads))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--layers", type=int, default=8)
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("invariant_gemm", __doc__, add_args, run))
