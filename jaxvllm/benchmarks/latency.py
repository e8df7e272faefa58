"""Latency of one batch (fixed batch size and lengths, random token-id prompts, ignore_eos): time to
first token, time per output token and tok/s (medians over --iters after --warmup-iters), beside the
weight-read roofline: roofline tok/s = batch / (bytes a step reads / (memory bandwidth x TP size)), the
bandwidth measured with a large device copy in the same run (or given with --bandwidth-tbs). A step
reads every parameter, but a mixture-of-experts layer only the experts its tokens pick. A second
roofline uses the best read rate of 8-row bf16 matmuls over weights of the 8B layer shapes (a copy
also writes, so it understates what a decode step, which only reads, can reach).

    jaxvllm bench latency --model bench/configs/llama-3-8b --load-format dummy --dtype bfloat16 \\
        --batch-size 1 --input-len 128 --output-len 256
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from jaxvllm.benchmarks import common as C


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from jaxvllm.config import EngineArgs
    g = parser.add_argument_group("workload")
    g.add_argument("--batch-size", type=int, default=8, help="Requests in the batch (default 8).")
    g.add_argument("--input-len", type=int, default=128, help="Prompt tokens (default 128).")
    g.add_argument("--output-len", type=int, default=256, help="Output tokens (default 256).")
    g.add_argument("--iters", type=int, default=10, help="Timed iterations (default 10).")
    g.add_argument("--warmup-iters", type=int, default=2, help="Untimed iterations first (default 2).")
    g.add_argument("--data-seed", type=int, default=0, help="Seed for the prompt token ids.")
    g.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="Memory bandwidth in TB/s for the roofline (default: measured).")
    g.add_argument("--bandwidth-bytes", type=int, default=None,
                   help="Array size of the bandwidth measurement (default 2 GiB on GPU, 64 MiB on "
                        "CPU).")
    C.add_output_args(parser)
    e = parser.add_argument_group("engine (EngineArgs)")
    EngineArgs.add_cli_args(e)
    return parser


def step_read_bytes(engine, batch: int, param_bytes: int) -> int:
    """The weight bytes one decode step of `batch` tokens reads: every parameter, except that a
    mixture-of-experts layer reads only the experts its tokens are routed to (the expected number
    of distinct experts among batch x k picks, routing uniform)."""
    cfg = engine.model_config
    if not cfg.num_experts:
        return param_bytes
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    unread = e * (1 - k / e) ** batch  # experts no token of the step picks, expected
    layers = engine.runner.params["layers"]
    per_expert = sum(layers[i][key].nbytes // e for i in range(cfg.num_layers)
                     if cfg.is_moe_layer(i)
                     for key in ("experts_gate", "experts_up", "experts_down"))
    return int(param_bytes - unread * per_expert)


def _one_batch(engine, args, rng_seed: int, tag: str) -> dict:
    from jaxvllm.sampling_params import SamplingParams
    reqs = C.make_requests(args.batch_size, C.LenSpec(args.input_len, args.input_len),
                           C.LenSpec(args.output_len, args.output_len),
                           engine.model_config.vocab_size, rng_seed)
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    first: dict[str, float] = {}
    start = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": r.prompt_token_ids}, sp)
    out_tokens = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = now
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    end = time.perf_counter()
    ttft_all = max(first.values()) - start       # the whole batch has its first token
    decode = end - (start + ttft_all)
    steps = args.output_len - 1
    return {"latency_s": end - start, "ttft_s": ttft_all,
            "ttft_mean_s": C.mean([t - start for t in first.values()]),
            "tpot_s": decode / steps if steps else float("nan"), "output_tokens": out_tokens}


def run(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.input_len, args.output_len, args.iters) < 1 or args.warmup_iters < 0:
        raise SystemExit("--batch-size, --input-len, --output-len and --iters must be >= 1")
    if args.data_parallel_size > 1:
        raise SystemExit("bench latency times one batch on one engine: leave --data-parallel-size "
                         "at 1 (bench throughput and bench serve measure replicas)")
    C.ensure_tokenizer(args)
    from jaxvllm.engine.setup import configure_jax
    configure_jax(C.engine_args_from(args))  # before any device use: the memory pool settings
    import jax
    on_gpu = jax.default_backend() == "gpu"
    if args.bandwidth_tbs:
        bw, bw_source = args.bandwidth_tbs * 1e12, "given"
    else:
        # Measured before the engine takes its KV cache, so the big buffer fits; freed afterwards.
        nbytes = args.bandwidth_bytes or ((2 << 30) if on_gpu else (64 << 20))
        bw, bw_source = C.measure_bandwidth(nbytes), f"measured ({nbytes / 2**30:.2f} GiB copy)"
    # The copy's reads and writes contend; a decode step reads: small matmuls are its ceiling.
    gemv = {} if args.bandwidth_tbs else C.measure_gemv_bandwidth(nbytes)
    C.log(f"memory bandwidth {bw / 1e12:.3f} TB/s ({bw_source})"
          + "".join(f"; GEMV {k}x{n} {v / 1e12:.3f} TB/s" for (k, n), v in gemv.items()))
    t0 = time.perf_counter()
    llm = C.build_llm(args)
    init_s = time.perf_counter() - t0
    engine = llm.llm_engine
    if args.input_len + args.output_len > engine.max_model_len:
        raise SystemExit(f"input+output ({args.input_len + args.output_len}) exceeds "
                         f"max_model_len ({engine.max_model_len})")
    param_bytes = engine.startup_info()["param_bytes"]
    nbytes = step_read_bytes(engine, args.batch_size, param_bytes)
    C.log(f"engine ready in {init_s:.1f}s; params {param_bytes / 1e9:.3f} GB, a decode step reads "
          f"{nbytes / 1e9:.3f} GB")
    for i in range(args.warmup_iters):
        _one_batch(engine, args, args.data_seed + 1000 + i, f"warm{i}")
    iters = []
    for i in range(args.iters):
        # Fresh prompts each iteration: no prefix-cache hits across iterations.
        iters.append(_one_batch(engine, args, args.data_seed + i, f"it{i}"))
        C.log(f"iter {i}: latency {iters[-1]['latency_s'] * 1e3:.1f} ms")
    lat = C.median([x["latency_s"] for x in iters])
    ttft = C.median([x["ttft_s"] for x in iters])
    tpot = C.median([x["tpot_s"] for x in iters])
    # Under tensor parallelism each card reads its 1/N of the weights, all cards at once.
    step_bound = nbytes / (bw * args.tensor_parallel_size)
    result = {
        "benchmark": "latency", "model": args.model, "dtype": args.dtype,
        "load_format": args.load_format, "batch_size": args.batch_size,
        "input_len": args.input_len, "output_len": args.output_len, "iters": args.iters,
        "latency_s": lat, "latency_p90_s": C.percentile([x["latency_s"] for x in iters], 90),
        "ttft_ms": ttft * 1e3, "ttft_mean_ms": C.median([x["ttft_mean_s"] for x in iters]) * 1e3,
        "tpot_ms": tpot * 1e3,
        "output_tokens_per_s": args.batch_size * args.output_len / lat,
        "decode_tokens_per_s": args.batch_size / tpot if tpot == tpot and tpot > 0 else float("nan"),
        "param_bytes": param_bytes, "step_read_bytes": nbytes, "bandwidth_tbs": bw / 1e12,
        "bandwidth_source": bw_source,
        "roofline_step_ms": step_bound * 1e3,
        "roofline_tokens_per_s": args.batch_size / step_bound,
        "engine_init_s": init_s, "device": C.device_description(engine),
        "per_iter": iters,
    }
    result["decode_fraction_of_roofline"] = (result["decode_tokens_per_s"] /
                                             result["roofline_tokens_per_s"])
    if gemv:
        best = max(gemv.values())
        result["gemv_bandwidth_tbs"] = {f"{k}x{n}": v / 1e12 for (k, n), v in gemv.items()}
        result["roofline_gemv_tokens_per_s"] = args.batch_size * best * args.tensor_parallel_size / nbytes
        result["decode_fraction_of_gemv_roofline"] = (result["decode_tokens_per_s"] /
                                                      result["roofline_gemv_tokens_per_s"])
    rows = [["TTFT (whole batch) ms", result["ttft_ms"]], ["TPOT ms", result["tpot_ms"]],
            ["end-to-end latency s", lat],
            ["output tok/s (end to end)", result["output_tokens_per_s"]],
            ["decode tok/s (batch / TPOT)", result["decode_tokens_per_s"]],
            ["roofline step ms (bytes read / (bandwidth x TP))", result["roofline_step_ms"]],
            ["roofline decode tok/s", result["roofline_tokens_per_s"]],
            ["decode / roofline", f"{result['decode_fraction_of_roofline']:.1%}"],
            ["param GB", param_bytes / 1e9], ["GB a decode step reads", nbytes / 1e9],
            ["bandwidth TB/s", f"{bw / 1e12:.3f} ({bw_source})"],
            *([["GEMV read TB/s by K x N (bf16, 8 rows)", ", ".join(
                f"{s} {v:.3f}" for s, v in result["gemv_bandwidth_tbs"].items())],
               ["roofline decode tok/s at the best GEMV rate", result["roofline_gemv_tokens_per_s"]],
               ["decode / GEMV roofline", f"{result['decode_fraction_of_gemv_roofline']:.1%}"]]
              if gemv else []),
            ["device", result["device"]]]
    title = (f"latency: {args.model or 'default model'} ({args.load_format}, {args.dtype}), batch "
             f"{args.batch_size}, {args.input_len} in / {args.output_len} out, median of "
             f"{args.iters}")
    C.emit(result, args, title + "\n" + C.table(rows, ["metric", "value"]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return C.script_main("latency", __doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
