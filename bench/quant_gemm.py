"""One decoder layer's linears (q, k, v, o, gate, up, down) on one device, at a model's shapes, in
each weight format the engine runs on one GPU: bf16, FP8 (models/quant.py: the Pallas GEMM at one
row, weight-only up to 16 rows, W8A8 on cuBLASLt beyond), int4 as the engine runs it
(models/int4.py: the Pallas GEMM up to 64 rows on the GPU), a GGUF Q8_0 weight as
`quantization="gguf"` keeps it (converters/gguf_quant.py, models/int8.py: int8 with a scale per 32
inputs, the Pallas int8 GEMM up to 64 rows on the GPU), and int4 and Q8_0 dequantized by XLA
before the GEMM (`int4_matmul_reference`, `int8_matmul_reference`), beside each format's roofline
(its weight bytes at the measured copy bandwidth). Each linear is its own GEMM here; the engine
runs an int4 or int8 model's q/k/v and gate/up as one GEMM each (models/fused.py).

    PYTHONPATH=. python3 bench/quant_gemm.py --model bench/configs/llama-3-8b [--tokens 1 8 16 64 256]

With `--mlp` it times the FP8 gated MLP instead, with and without its Pallas activation pass (see
`mlp`). With `--sweep` it times the int8 GEMM's tilings instead (pallas_kernels/int8_gemm.Tiles)
over the layer's seven Q8_0 linears at each token count, fastest first, beside the engine's default_tiles
and XLA's dequantize-then-GEMM (what the engine runs past int8_gemm.MAX_ROWS), so the sweep also
says where the kernel stops paying and which way of making the weights is fastest (interpret mode
off the GPU: a check that it runs, not a time).

Random weights and inputs; each bucket compiled as the engine compiles it (Triton GEMMs up to
TRITON_GEMM_MAX_TOKENS (jaxvllm/config.py) tokens, cuBLAS beyond); each time the median per call of the
jitted layer called back to back. Each format's outputs are compared with bf16's (quantization
error, a few percent, is expected; a wrong kernel is far off).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import common
import jax
import jax.numpy as jnp
import numpy as np
from attention_kernels import bench

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def q8_0(w: jax.Array) -> dict[str, jax.Array]:
    """A bf16 weight [in, out] quantized to GGUF's Q8_0 and laid out as the GGUF loader lays it
    with quantization="gguf"."""
    import types

    import gguf
    from converters.gguf_quant import int8_weight
    wt = np.asarray(w, np.float32).T
    q8 = gguf.GGMLQuantizationType.Q8_0
    t = types.SimpleNamespace(name="", shape=list(reversed(wt.shape)), tensor_type=q8,
                              data=gguf.quants.quantize(wt, q8))
    iw = int8_weight(t)
    return {"": jnp.asarray(iw.q), "_scale": jnp.asarray(iw.scale.T)}


def _sweep_grid(tokens: int) -> list:
    """The int8 GEMM's tilings tried at `tokens` rows: one row tile up to 32 rows (columns, groups
    a step, warps), 64- and 128-row tiles beyond; each with every way of making the weights."""
    import itertools

    from pallas_kernels.int8_gemm import DEQUANT, Tiles
    if tokens <= 32:
        return [Tiles(block_n=bn, groups_per_step=g, num_warps=w, dequant=d)
                for bn, g, w, d in itertools.product((32, 64, 128), (2, 4), (2, 4), DEQUANT)]
    return [Tiles(block_m=bm, block_n=bn, num_warps=w, dequant=d)
            for bm, bn, w, d in itertools.product((64, 128), (64, 128), (4, 8), DEQUANT)]


def sweep(args: argparse.Namespace, shapes: dict, q8: dict) -> int:
    """Time the int8 GEMM's tilings over the layer's Q8_0 linears (see the module docstring)."""
    from jaxvllm.config import TRITON_GEMM_MAX_TOKENS
    from pallas_kernels import int8_gemm, int8_matmul, int8_matmul_reference
    on_gpu = jax.default_backend() == "gpu"
    result, rows = {}, []
    for t in args.tokens:
        xs = {k: jax.random.normal(jax.random.key(t), (t, s[0]), jnp.bfloat16)
              for k, s in shapes.items()}

        def layer(tiles):
            return jax.jit(lambda lp, xs: [int8_matmul(
                xs[k], lp[k], lp[k + "_scale"], tiles=tiles, interpret=not on_gpu)
                for k in LINEARS])
        opts = {"xla_gpu_enable_triton_gemm": t <= TRITON_GEMM_MAX_TOKENS} if on_gpu else None
        xla = bench(jax.jit(lambda lp, xs: [int8_matmul_reference(xs[k], lp[k], lp[k + "_scale"])
                                            for k in LINEARS], compiler_options=opts),
                    [(q8, xs)]) * 1e6
        grid = _sweep_grid(t)
        times = {tiles: bench(layer(tiles), [(q8, xs)]) * 1e6
                 for tiles in [int8_gemm.default_tiles(t)] + (grid if on_gpu else grid[:2])}
        default = times[int8_gemm.default_tiles(t)]
        best = sorted(times.items(), key=lambda kv: kv[1])[:args.top]
        result[t] = {"default_us": default, "xla_dequant_us": xla,
                     "best": [{**dataclasses.asdict(k), "us": v} for k, v in best]}
        rows += [[t, f"{v:.1f}", f"{default:.1f}", f"{xla:.1f}", k.block_m, k.block_n,
                  k.groups_per_step, k.num_warps, k.dequant] for k, v in best]
    common.emit(result, args, "int8 GEMM tilings, a layer's seven Q8_0 linears, us per layer "
                f"({jax.devices()[0].device_kind})\n" + common.table(
                    rows, ["tokens", "us", "default us", "XLA dequant us", "block_m", "block_n",
                           "groups/step", "warps", "dequant"]))
    return 0


def run(args: argparse.Namespace) -> int:
    from jaxvllm.config import TRITON_GEMM_MAX_TOKENS
    from jaxvllm.models import int4, quant
    from jaxvllm.models.config import ModelConfig
    from jaxvllm.models.layers import linear
    from jaxvllm.models.params import layer_shapes
    from pallas_kernels import int4_matmul_reference, int8_matmul_reference
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    shapes = {k: v for k, v in layer_shapes(cfg, 0).items() if k in LINEARS}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    bf16 = {k: jax.random.normal(key, s, jnp.bfloat16) * s[0] ** -0.5
            for key, (k, s) in zip(keys, shapes.items())}
    formats = {"bf16": bf16, "fp8": quant.quantize_params({"layers": [bf16]}, "fp8")["layers"][0],
               "int4": int4.quantize_params({"layers": [bf16]}, args.group_size)["layers"][0],
               "q8_0": {k + suffix: a for k in LINEARS for suffix, a in q8_0(bf16[k]).items()}}
    if args.sweep:
        return sweep(args, shapes, formats["q8_0"])
    if args.mlp:
        return mlp(args, cfg, formats["fp8"])
    on_gpu = jax.default_backend() == "gpu"
    copy_bw = common.measure_bandwidth(1 << (31 if on_gpu else 23))

    def layer_fn(tokens: int, by_xla: str = ""):
        def f(lp, xs):
            if by_xla == "int4":
                return [int4_matmul_reference(xs[k], lp[k], lp[k + "_scale"], int4.offset(lp, k))
                        for k in LINEARS]
            if by_xla == "q8_0":
                return [int8_matmul_reference(xs[k], lp[k], lp[k + "_scale"]) for k in LINEARS]
            return [linear(xs[k], lp, k, pallas=on_gpu) for k in LINEARS]
        opts = {"xla_gpu_enable_triton_gemm": tokens <= TRITON_GEMM_MAX_TOKENS} if on_gpu else None
        return jax.jit(f, compiler_options=opts)

    rows, result = [], {"copy_tbs": copy_bw / 1e12, "tokens": {}}
    for t in args.tokens:
        xk = jax.random.split(jax.random.fold_in(jax.random.key(1), t), len(shapes))
        xs = {k: jax.random.normal(key, (t, s[0]), jnp.bfloat16) for key, (k, s) in
              zip(xk, shapes.items())}
        ref = [np.asarray(o, np.float32) for o in layer_fn(t)(bf16, xs)]
        res = result["tokens"][t] = {}
        ways = {"bf16": (layer_fn(t), bf16), "fp8": (layer_fn(t), formats["fp8"]),
                "int4": (layer_fn(t), formats["int4"]), "q8_0": (layer_fn(t), formats["q8_0"]),
                "int4_xla_dequant": (layer_fn(t, by_xla="int4"), formats["int4"]),
                "q8_0_xla_dequant": (layer_fn(t, by_xla="q8_0"), formats["q8_0"])}
        for name, (fn, lp) in ways.items():
            outs = [np.asarray(o, np.float32) for o in fn(lp, xs)]
            res[name + "_max_rel_diff"] = max(float(np.abs(o - r).max() / np.abs(r).max())
                                              for o, r in zip(outs, ref))
            res[name + "_us"] = bench(fn, [(lp, xs)]) * 1e6
            weight_bytes = sum(a.nbytes for a in jax.tree.leaves(lp))
            res[name + "_roofline_us"] = weight_bytes / copy_bw * 1e6
        rows.append([t] + [f"{res[w + '_us']:.1f} ({res[w + '_roofline_us'] / res[w + '_us']:.0%})"
                           for w in ways] + [f"{res[w + '_max_rel_diff']:.1e}" for w in list(ways)[1:]])
    common.emit(result, args, f"{cfg.architecture} layer linears, hidden {cfg.hidden_size}, "
                f"intermediate {cfg.intermediate_size}; {jax.devices()[0].device_kind}, copy "
                f"{copy_bw / 1e12:.2f} TB/s; us per layer (share of the format's roofline)\n"
                + common.table(rows, ["tokens", "bf16", "fp8", "int4 (engine)", "GGUF Q8_0 (engine)",
                                      "int4 (XLA dequant)", "Q8_0 (XLA dequant)",
                                      "fp8 rel diff", "int4 rel diff", "Q8_0 rel diff",
                                      "int4 XLA rel diff", "Q8_0 XLA rel diff"]))
    return 0


def mlp(args: argparse.Namespace, cfg, lp: dict) -> int:
    """The FP8 gated MLP (gate, up, down) at each token count as the engine runs it on a GPU
    (layers.gated_mlp with the Pallas kernels: act(gate) * up quantized for down by
    pallas_kernels/gated_fp8.py past the decode buckets) against XLA's path (without), and that
    activation pass alone: the kernel against its jnp reference as XLA compiles it (interpret mode
    off the GPU: a check that it runs, not a time)."""
    from jaxvllm.models.layers import gated_mlp
    from pallas_kernels.gated_fp8 import gated_fp8
    from pallas_kernels.reference import gated_fp8_reference
    n = cfg.intermediate_size
    rows, result = [], {}
    for t in args.tokens:
        x = jax.random.normal(jax.random.key(t), (t, cfg.hidden_size), jnp.bfloat16)
        res = result[t] = {}
        outs = {}
        for name, pallas in (("engine", True), ("xla", False)):
            fn = jax.jit(lambda lp, x, pallas=pallas: gated_mlp(x, lp, pallas=pallas))
            outs[name] = np.asarray(fn(lp, x), np.float32)
            res[name + "_us"] = bench(fn, [(lp, x)]) * 1e6
        res["max_rel_diff"] = float(np.abs(outs["engine"] - outs["xla"]).max()
                                    / np.abs(outs["xla"]).max())
        k = jax.random.split(jax.random.key(t), 5)
        ops = (jax.random.normal(k[0], (t, n), jnp.bfloat16),
               jax.random.normal(k[1], (t, n), jnp.bfloat16), jax.random.uniform(k[2], (t, 1)),
               jax.random.uniform(k[3], (n,)), jax.random.uniform(k[4], (n,)))
        kernel = functools.partial(gated_fp8, interpret=jax.default_backend() != "gpu")
        for name, f in (("kernel", kernel), ("reference", gated_fp8_reference)):
            res["activation_" + name + "_us"] = bench(jax.jit(f), [ops]) * 1e6
        rows.append([t, f"{res['engine_us']:.1f}", f"{res['xla_us']:.1f}",
                     f"{res['max_rel_diff']:.1e}", f"{res['activation_kernel_us']:.1f}",
                     f"{res['activation_reference_us']:.1f}"])
    common.emit(result, args, f"FP8 gated MLP, hidden {cfg.hidden_size}, intermediate {n}; "
                f"{jax.devices()[0].device_kind}; us\n" + common.table(
                    rows, ["tokens", "MLP, engine (Pallas activation)", "MLP, XLA",
                           "rel diff", "activation: kernel", "activation: XLA (reference)"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench/configs/llama-3-8b",
                        help="A directory with a dense model's config.json.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 256])
    parser.add_argument("--group-size", type=int, default=128, help="int4 inputs per scale.")
    parser.add_argument("--sweep", action="store_true",
                        help="Time the int8 GEMM's tilings instead of the formats.")
    parser.add_argument("--top", type=int, default=5, help="Tilings listed per token count.")
    parser.add_argument("--mlp", action="store_true",
                        help="Time the FP8 gated MLP and its activation pass instead (see mlp).")
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("quant_gemm", __doc__, add_args, run))
