"""What a batch-1 decode step's weight reads can reach on this GPU: device-memory read rates of
JAX's programs beside PyTorch's (cuBLAS) for the same work, each as the batch-1 tok/s it would give
the Llama-3-8B shape (16.06 GB read a step). PyTorch is only a reference here; it is not needed by
jaxvllm.

    PYTHONPATH=.:bench python3 bench/read_ceiling.py [--gib 2] [--step-gb 16.06]

Probes, each over `--gib` GiB of distinct data (far beyond the L2), median of 10 timed calls after a
compiling/warm-up one:
  - copy: out = x * c (bytes read + written, as `bench/latency.py`'s roofline counts them);
  - read: a column sum of a [rows, 4096] array (reads only; the write is one row);
  - GEMM rows r, K x N: a chain of x[r, K] @ W[K, N] over distinct weights of one shape of the 8B
    layer, each product depending on the one before (as a step's layers do), in one JAX program, and
    the same chain launched by PyTorch (cuBLAS), timed with CUDA events.
"""
from __future__ import annotations

import argparse
from typing import Callable

import common  # noqa: F401  (puts the repository root on sys.path)
import jax
import jax.numpy as jnp
from jaxvllm.benchmarks import common as C

ROWS = (1, C.GEMV_ROWS)
TORCH_ITERS = 10


def jax_read(nbytes: int) -> float:
    x = jnp.ones((max(1, nbytes // (2 * 4096)), 4096), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32))
    return x.size * 2 / C.median_call_s(f, 10, x)


def _torch_time(fn: Callable[[], object]) -> float:
    """Median seconds of `fn` on the current CUDA stream, by CUDA events."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(TORCH_ITERS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return C.median(times)


def torch_probes(nbytes: int) -> dict[str, float]:
    import torch
    bf = torch.bfloat16

    def copy() -> float:
        x = torch.ones(nbytes // 2, dtype=bf, device="cuda")
        y = torch.empty_like(x)
        return 2 * nbytes / _torch_time(lambda: torch.mul(x, 1.0009765625, out=y))

    def read() -> float:
        x = torch.ones((nbytes // (2 * 4096), 4096), dtype=bf, device="cuda")
        return nbytes / _torch_time(lambda: torch.sum(x, dim=0, dtype=torch.float32))

    def gemm(k: int, n: int) -> dict[str, float]:
        ws = [torch.full((k, n), 1 + i, dtype=bf, device="cuda")
              for i in range(max(1, nbytes // (2 * k * n)))]
        out = {}
        for rows in ROWS:
            x = torch.ones((rows, k), dtype=bf, device="cuda")

            def chain(h=x):
                for w in ws:
                    h = h + (h @ w)[:, :1] * 1e-3
                return h
            out[f"GEMM rows {rows}, {k}x{n}"] = len(ws) * k * n * 2 / _torch_time(chain)
        return out

    out = {"copy": copy(), "read": read()}
    for k, n in C.GEMV_SHAPES:
        out.update(gemm(k, n))
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="Data per probe, GiB.")
    p.add_argument("--step-gb", type=float, default=16.06,
                   help="Bytes a batch-1 decode step reads, GB (default: the Llama-3-8B shape's).")
    C.add_output_args(p)
    args = p.parse_args()
    nbytes = int(args.gib * 2 ** 30)
    ours = {"copy": C.measure_bandwidth(nbytes), "read": jax_read(nbytes)}
    for rows in ROWS:
        for (k, n), v in C.measure_gemv_bandwidth(nbytes, rows=rows).items():
            ours[f"GEMM rows {rows}, {k}x{n}"] = v
    try:  # the reference: absent where PyTorch with CUDA is not installed
        import torch
        ref = torch_probes(nbytes) if torch.cuda.is_available() else {}
    except ImportError:
        ref = {}
    step = args.step_gb * 1e9
    nan = float("nan")
    rows = [[name, v / 1e12, v / step, ref.get(name, nan) / 1e12, ref.get(name, nan) / step]
            for name, v in ours.items()]
    doc = {"benchmark": "read_ceiling", "device": str(jax.devices()[0].device_kind), "gib": args.gib,
           "jax_tbs": {k: v / 1e12 for k, v in ours.items()}, "torch_tbs": {k: v / 1e12 for k, v in ref.items()}}
    C.emit(doc, args, C.table(rows, ["probe", "JAX TB/s", "batch-1 tok/s at it", "PyTorch TB/s",
                                     "batch-1 tok/s at it"]))


if __name__ == "__main__":
    main()
