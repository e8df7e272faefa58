"""One mixture-of-experts layer on one device, at a model's shapes: the engine's choice for the
shape (models/moe.py), and each way it chooses from: grouped GEMMs over the tokens sorted by expert
(XLA's `jax.lax.ragged_dot`, and JAX's Mosaic GPU kernel on the GPU), and per-token expert weights
gathered into a batched matmul (not used: slower inside the engine's step), beside the roofline (the bytes of the experts the tokens pick at the measured
copy bandwidth, or their FLOPs at a measured bf16 matmul rate, whichever is larger).

    PYTHONPATH=. python3 bench/moe.py --model bench/configs/qwen3-30b-a3b [--tokens 1 8 64 256 2048]

Random bf16 weights and inputs (routing near uniform); each time is the median per call of a jitted
layer called back to back. The two ways are checked against each other first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import jax
import jax.numpy as jnp
import numpy as np


def _median_seconds(fn, *args, reps: int = 7, min_time: float = 0.2) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    iters = int(max(5, min(1000, min_time / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def gathered_swiglu(rows, group_sizes, w_gate, w_up, w_down):
    """Each row's expert weights gathered, one batched matrix-vector product per projection (reads
    only the experts picked; measured here, slower than the grouped GEMM inside the engine's step)."""
    row_expert = jnp.repeat(jnp.arange(w_gate.shape[0]), group_sizes,
                            total_repeat_length=rows.shape[0])
    r = rows[:, None, :]
    gate = jnp.matmul(r, w_gate[row_expert])
    up = jnp.matmul(r, w_up[row_expert])
    return jnp.matmul(jax.nn.silu(gate) * up, w_down[row_expert])[:, 0]


def run(args: argparse.Namespace) -> int:
    from jaxvllm.models import moe
    from jaxvllm.models.config import ModelConfig
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    h, e, m, k = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    lp = {"router": jax.random.normal(ks[0], (h, e), jnp.bfloat16) * 0.05,
          "experts_gate": jax.random.normal(ks[1], (e, h, m), jnp.bfloat16) * 0.02,
          "experts_up": jax.random.normal(ks[2], (e, h, m), jnp.bfloat16) * 0.02,
          "experts_down": jax.random.normal(ks[3], (e, m, h), jnp.bfloat16) * 0.02}
    on_gpu = jax.default_backend() == "gpu"
    big = jnp.ones((1 << (30 if on_gpu else 22),), jnp.bfloat16)
    copy_bw = 2 * big.nbytes / _median_seconds(jax.jit(lambda a: a * 1.5 + 1.0), big)
    del big
    n = 8192 if on_gpu else 512
    flops = 2 * n ** 3 / _median_seconds(jax.jit(lambda p: p @ p), jnp.ones((n, n), jnp.bfloat16))

    def layer(experts_fn):
        return jax.jit(lambda lp, x: moe.moe(cfg, lp, x, experts_fn))

    ways = {"engine": layer(moe.experts_swiglu), "xla_ragged_dot": layer(moe.grouped_swiglu),
            "gathered": layer(gathered_swiglu)}
    expert_bytes = 3 * h * m * 2
    rows, result = [], {"copy_tbs": copy_bw / 1e12, "matmul_tflops": flops / 1e12, "tokens": {}}
    for t in args.tokens:
        x = jax.random.normal(jax.random.fold_in(ks[4], t), (t, h), jnp.bfloat16)
        ref = np.asarray(ways["xla_ragged_dot"](lp, x), np.float32)
        picked = jax.lax.top_k(x @ lp["router"], k)[1]
        distinct = int(np.unique(np.asarray(picked)).size)
        roof = max(distinct * expert_bytes / copy_bw, 2 * t * k * expert_bytes / 2 / flops)
        res = result["tokens"][t] = {"roofline_us": roof * 1e6, "distinct_experts": distinct}
        for name, fn in ways.items():
            if name == "gathered" and t * k * expert_bytes > args.max_gather_bytes:
                res[name + "_us"] = res[name + "_max_rel_diff"] = float("nan")
                continue
            out = np.asarray(fn(lp, x), np.float32)
            res[name + "_max_rel_diff"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            res[name + "_us"] = _median_seconds(fn, lp, x) * 1e6
        rows.append([t, distinct, f"{roof * 1e6:.1f}", f"{res['engine_us']:.1f}",
                     f"{roof * 1e6 / res['engine_us']:.0%}", f"{res['engine_max_rel_diff']:.1e}",
                     f"{res['xla_ragged_dot_us']:.1f}", f"{res['gathered_us']:.1f}"])
    gemm = "Mosaic GPU" if moe._mosaic_fits(x, lp["experts_gate"]) else "XLA ragged_dot"
    common.emit(result, args, f"{cfg.architecture} MoE layer: {e} experts, top {k}, hidden {h}, "
                f"expert intermediate {m}, bf16; {jax.devices()[0].device_kind}, copy "
                f"{copy_bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s; the engine's "
                f"grouped GEMM here: {gemm}\n" + common.table(
                    rows, ["tokens", "experts picked", "roofline us", "engine us", "of roofline",
                           "its max rel diff", "XLA ragged_dot us", "gathered bmm us"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench/configs/qwen3-30b-a3b",
                        help="A directory with a mixture-of-experts config.json.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 2048])
    parser.add_argument("--max-gather-bytes", type=float, default=8e9,
                        help="Skip the gathered way where its gathered weights exceed this.")
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("moe", __doc__, add_args, run))
