"""One mixture-of-experts layer on one device, at a model's shapes: the engine's choice for the
shape (models/moe.py), and each way it chooses from: the routed-experts Pallas kernel (reads only
the experts picked; GPU), grouped GEMMs over the tokens sorted by expert with JAX's Mosaic GPU
kernel (Hopper) and XLA's `jax.lax.ragged_dot`, beside the roofline (the bytes of the experts the
tokens pick at the measured copy bandwidth, or their FLOPs at a measured bf16 matmul rate,
whichever is larger).

    PYTHONPATH=. python3 bench/moe.py --model bench/configs/qwen3-30b-a3b [--tokens 1 8 64 256 2048]
        [--sweep] [--fp8 | --int4 [--act-order]]

Random bf16 weights and inputs (routing near uniform); `--fp8`: the experts in FP8 as
`quantization="fp8"` stores them (models/quant.py), `--int4`: at 4 bits in groups of 128 inputs
(or one group where that does not divide them) with zero points, as an AWQ or GPTQ checkpoint
loads (models/int4.py), with `--act-order` gate's and up's inputs stored in an order of each
expert's own, as a GPTQ checkpoint in activation order loads (models/moe.py: the routed kernel
gathers each row's features into its expert's order, the grouped GEMMs put the dequantized
weights' inputs back); the roofline counts the bytes they are stored in. Each time is the median per call of a jitted layer called back to back. Every way is checked against XLA's ragged_dot first (the Mosaic kernel where
`--max-xla-rows` skips it). `--sweep` also
times the routed kernel over a grid of tiles per token count (rows a tile: `--sweep-bm`).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import common
import jax
import jax.numpy as jnp
import numpy as np
from attention_kernels import bench


def run(args: argparse.Namespace) -> int:
    from jaxvllm.models import moe
    from pallas_kernels import routed_experts
    from jaxvllm.models.config import ModelConfig
    if args.act_order and not args.int4:
        raise SystemExit("bench moe: --act-order orders int4 experts' inputs: it takes --int4")
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    h, e, m, k = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    lp = {"router": jax.random.normal(ks[0], (h, e), jnp.bfloat16) * 0.05,
          "experts_gate": jax.random.normal(ks[1], (e, h, m), jnp.bfloat16) * 0.02,
          "experts_up": jax.random.normal(ks[2], (e, h, m), jnp.bfloat16) * 0.02,
          "experts_down": jax.random.normal(ks[3], (e, m, h), jnp.bfloat16) * 0.02}
    from jaxvllm.models import int4, quant as fp8
    if args.fp8:
        lp = fp8.quantize_params({"layers": [lp]}, "fp8")["layers"][0]
    elif args.int4:
        order = jax.vmap(lambda k: jax.random.permutation(k, h))(jax.random.split(ks[4], e))
        if args.act_order:  # stored in their inputs' order: the model's weights are the same
            lp.update({n: jnp.take_along_axis(lp[n], order[:, :, None], axis=1)
                       for n in ("experts_gate", "experts_up")})
        lp = int4.quantize_params({"layers": [lp]})["layers"][0]
        if args.act_order:
            lp[moe.ORDER] = order.astype(jnp.int32)
    quant = moe.expert_quant(lp)
    on_gpu = jax.default_backend() == "gpu"
    copy_bw = common.measure_bandwidth(1 << (31 if on_gpu else 23))
    n = 8192 if on_gpu else 512
    flops = common.measure_matmul_flops(n)

    def layer(experts_fn):
        return jax.jit(lambda lp, x: moe.moe(cfg, lp, x, experts_fn))

    ways = {"engine": layer(moe.experts_swiglu), "xla_ragged_dot": layer(moe.grouped_swiglu)}
    if on_gpu and routed_experts.fits(lp["experts_gate"], lp["experts_down"], quant):
        ways["routed"] = layer(routed_experts.routed_swiglu)
    if moe._mosaic_fits(jnp.zeros((1, h), jnp.bfloat16), lp["experts_gate"]) and on_gpu:
        ways["mosaic"] = layer(functools.partial(moe.grouped_swiglu, gemm=moe.mosaic_ragged_dot))
    sweep = [routed_experts.ExpertTiles(bm=bm, bk=bk, bn=bn, num_warps=w, num_stages=st)
             for bm, bk, bn, w, st in itertools.product(args.sweep_bm, (64, 128), (32, 64, 128),
                                                        (4,), (3, 4))
             if routed_experts.fits(lp["experts_gate"], lp["experts_down"], quant,
                                    *(routed_experts.ExpertTiles(bk=bk, bn=bn),) * 2)
             ] if args.sweep and "routed" in ways else []
    expert_bytes = sum(a.nbytes for q in (quant or ()) for a in q) / e + 3 * h * m * (
        1 if args.fp8 else 0.5 if args.int4 else 2)
    rows, result = [], {"copy_tbs": copy_bw / 1e12, "matmul_tflops": flops / 1e12, "tokens": {}}
    for t in args.tokens:
        x = jax.random.normal(jax.random.fold_in(ks[4], t), (t, h), jnp.bfloat16)
        ref_way = "xla_ragged_dot" if t * k <= args.max_xla_rows else "mosaic"
        ref = np.asarray(ways[ref_way](lp, x), np.float32)
        picked = jax.lax.top_k(x @ lp["router"], k)[1]
        distinct = int(np.unique(np.asarray(picked)).size)
        roof = max(distinct * expert_bytes / copy_bw, 2 * t * k * 3 * h * m / flops)
        res = result["tokens"][t] = {"roofline_us": roof * 1e6, "distinct_experts": distinct}
        for name, fn in ways.items():
            if name == "xla_ragged_dot" and t * k > args.max_xla_rows:
                res[name + "_us"] = float("nan")
                continue
            out = np.asarray(fn(lp, x), np.float32)
            res[name + "_max_rel_diff"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            res[name + "_us"] = bench(fn, [(lp, x)]) * 1e6
        for tiles in sweep:
            fn = layer(functools.partial(routed_experts.routed_swiglu, gate_up_tiles=tiles,
                                         down_tiles=tiles))
            res.setdefault("routed_sweep_us", {})[str(tiles)] = bench(fn, [(lp, x)]) * 1e6
        if sweep:
            best = min(res["routed_sweep_us"], key=res["routed_sweep_us"].get)
            common.log(f"{t} tokens: best routed tiles {best}: {res['routed_sweep_us'][best]:.1f} us")
        rows.append([t, distinct, f"{roof * 1e6:.1f}", f"{res['engine_us']:.1f}",
                     f"{roof * 1e6 / res['engine_us']:.0%}", f"{res['engine_max_rel_diff']:.1e}"]
                    + [f"{res.get(w + '_us', float('nan')):.1f}"
                       for w in ("routed", "mosaic", "xla_ragged_dot")])
    common.emit(result, args, f"{cfg.architecture} MoE layer: {e} experts, top {k}, hidden {h}, "
                f"expert intermediate {m}, "
                f"{'FP8 experts' if args.fp8 else 'int4 experts' if args.int4 else 'bf16'}"
                f"{' in activation order' if args.act_order else ''}; "
                f"{jax.devices()[0].device_kind}, copy "
                f"{copy_bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s\n" + common.table(
                    rows, ["tokens", "experts picked", "roofline us", "engine us", "of roofline",
                           "its max rel diff", "routed kernel us", "Mosaic GPU us",
                           "XLA ragged_dot us"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench/configs/qwen3-30b-a3b",
                        help="A directory with a mixture-of-experts config.json.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 2048])
    parser.add_argument("--max-xla-rows", type=int, default=1 << 30,
                        help="Skip XLA's ragged_dot above this many rows (tokens x k): at Mixtral's "
                        "shapes it allocates far more than the weights.")
    parser.add_argument("--sweep", action="store_true",
                        help="Also time the routed kernel over a grid of tiles.")
    parser.add_argument("--sweep-bm", type=int, nargs="+", default=[16],
                        help="The sweep's rows per tile (an expert's rows are walked so many at a "
                        "time).")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--fp8", action="store_true",
                         help="The experts in FP8, a scale per expert and output channel.")
    weights.add_argument("--int4", action="store_true",
                         help="The experts at 4 bits, a scale and zero point per group of 128 "
                         "inputs (int4.quantize_params) and output channel.")
    parser.add_argument("--act-order", action="store_true",
                        help="With --int4: gate's and up's inputs stored in a random order of each "
                        "expert's own (GPTQ's activation order).")
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("moe", __doc__, add_args, run))
