"""Offline throughput: N requests with random token-id prompts (ignore_eos), lengths fixed or drawn
from seeded uniform ranges; requests/s, output tok/s, total tok/s and peak KV-cache usage. `--backend
hf` runs HF transformers `generate` on the same requests (static left-padded batches, greedy, lengths
forced with min_new_tokens); `--backend both` runs HF in a child process first, then jaxvllm.

    jaxvllm bench throughput --model bench/configs/llama-3-8b --load-format dummy --dtype bfloat16 \\
        --num-prompts 1000 --input-len 128:1024 --output-len 32:512
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any, Optional

from jaxvllm.benchmarks import common as C

BACKENDS = ("jaxvllm", "hf", "both")


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from jaxvllm.config import EngineArgs
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=1000, help="Requests (default %(default)s).")
    C.add_len_args(g, "128:1024", "32:512")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="Sampling temperature for jaxvllm (default 0: greedy, as the HF side).")
    g.add_argument("--backend", choices=BACKENDS, default="jaxvllm",
                   help="jaxvllm, hf (transformers generate) or both (default %(default)s).")
    g.add_argument("--hf-batch-size", type=int, default=64, help="HF static batch size.")
    g.add_argument("--hf-num-prompts", type=int, default=None,
                   help="Requests for the HF side (the first N of the same list; default: all).")
    g.add_argument("--hf-device", default=None, help="torch device for HF (default: cuda if "
                   "available, else cpu).")
    C.add_output_args(parser)
    e = parser.add_argument_group("engine (EngineArgs)")
    EngineArgs.add_cli_args(e)
    return parser


def _requests(args: argparse.Namespace, vocab_size: int) -> list[C.BenchRequest]:
    return C.make_requests(args.num_prompts, args.input_len, args.output_len, vocab_size,
                           args.data_seed)


def _check(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be >= 1")
    if args.hf_batch_size < 1:
        raise SystemExit("--hf-batch-size must be >= 1")


# ---------------------------------------------------------------------------------------------
# jaxvllm
# ---------------------------------------------------------------------------------------------
def run_jaxvllm(args: argparse.Namespace) -> dict:
    from jaxvllm.sampling_params import RequestOutputKind, SamplingParams
    t0 = time.perf_counter()
    llm = C.build_llm(args)
    init_s = time.perf_counter() - t0
    engine = llm.llm_engine
    reqs = _requests(args, engine.model_config.vocab_size)
    limit = engine.max_model_len
    too_long = [r for r in reqs if r.prompt_len + r.output_len > limit]
    if too_long:
        raise SystemExit(f"{len(too_long)} requests exceed max_model_len={limit} (longest "
                         f"{max(r.prompt_len + r.output_len for r in too_long)}); raise "
                         f"--max-model-len or lower the lengths")
    C.log(f"jaxvllm: engine ready in {init_s:.1f}s; {len(reqs)} requests")
    # One output per request, when it finishes: what LLM.generate asks of the engine.
    for i, r in enumerate(reqs):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True,
                                          temperature=args.temperature, top_p=1.0,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    steps, done, out_tokens = 0, 0, 0
    kv_samples: list[float] = []
    stats0 = engine.get_stats()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done += 1
                out_tokens += len(out.outputs[0].token_ids)
        steps += 1
        kv_samples.append(engine.get_stats().kv_cache_usage)
    elapsed = time.perf_counter() - start
    stats = engine.get_stats()
    prompt_tokens = sum(r.prompt_len for r in reqs)
    expected = sum(r.output_len for r in reqs)
    result = {
        "backend": "jaxvllm", "num_requests": done, "elapsed_s": elapsed,
        "requests_per_s": done / elapsed, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + out_tokens) / elapsed,
        "prompt_tokens": prompt_tokens, "expected_output_tokens": expected,
        "kv_cache_usage_peak": max(kv_samples, default=0.0),
        "kv_cache_usage_mean": C.mean(kv_samples),
        "num_preemptions": stats.num_preemptions - stats0.num_preemptions,
        "steps": steps, "engine_init_s": init_s,
        "compile_s": getattr(engine, "compile_seconds", None),
        "num_kv_blocks": engine.startup_info()["num_blocks"],  # all data-parallel replicas' together
        "device": C.device_description(engine),
    }
    if out_tokens != expected:
        C.log(f"warning: {out_tokens} output tokens, expected {expected}")
    del llm, engine
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------
_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _hf_model(args: argparse.Namespace, device: str) -> Any:
    import os
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if not args.model or not os.path.isdir(args.model):
        raise SystemExit("--backend hf needs --model to be an HF directory (config.json, with "
                         "safetensors unless --load-format dummy)")
    cfg = AutoConfig.from_pretrained(args.model)
    name = args.dtype if args.dtype != "auto" else str(getattr(cfg, "torch_dtype", None) or
                                                      getattr(cfg, "dtype", None) or "float32")
    dtype = getattr(torch, _TORCH_DTYPES.get(name.replace("torch.", ""), "float32"))
    if args.load_format == "dummy":
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = _hf_call(AutoModelForCausalLM.from_config, cfg, dtype)
    else:
        model = _hf_call(AutoModelForCausalLM.from_pretrained, args.model, dtype).to(device)
    return model.eval(), cfg


def _hf_call(fn: Any, what: Any, dtype: Any) -> Any:
    try:
        return fn(what, dtype=dtype)          # transformers >= 4.56
    except TypeError:
        return fn(what, torch_dtype=dtype)


def run_hf(args: argparse.Namespace) -> dict:
    import torch
    device = args.hf_device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, cfg = _hf_model(args, device)
    init_s = time.perf_counter() - t0
    vocab = cfg.vocab_size if hasattr(cfg, "vocab_size") else cfg.get_text_config().vocab_size
    reqs = _requests(args, vocab)[:args.hf_num_prompts or args.num_prompts]
    pad = 0
    C.log(f"hf: model ready on {device} in {init_s:.1f}s; {len(reqs)} requests in batches of "
          f"{args.hf_batch_size}")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    useful, generated, prompt_tokens = 0, 0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in C.iter_chunks(reqs, args.hf_batch_size):
            width = max(r.prompt_len for r in batch)
            new = max(r.output_len for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):  # left padding
                ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
                mask[i, width - r.prompt_len:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=pad, num_beams=1, use_cache=True)
            sync()
            generated += (out.shape[1] - width) * len(batch)
            useful += sum(r.output_len for r in batch)
            prompt_tokens += sum(r.prompt_len for r in batch)
    elapsed = time.perf_counter() - start
    return {
        "backend": "hf", "num_requests": len(reqs), "elapsed_s": elapsed,
        "requests_per_s": len(reqs) / elapsed, "output_tokens": useful,
        "output_tokens_per_s": useful / elapsed,
        "total_tokens_per_s": (prompt_tokens + useful) / elapsed,
        "prompt_tokens": prompt_tokens, "generated_tokens_incl_padding": generated,
        "hf_batch_size": args.hf_batch_size, "engine_init_s": init_s,
        "device": f"torch:{device}" + (f":{torch.cuda.get_device_name()}"
                                       if device.startswith("cuda") else ""),
    }


def _run_hf_child(args: argparse.Namespace, argv: list[str]) -> dict:
    """HF in its own process: torch and JAX never share the device memory pool."""
    cmd = [sys.executable, "-m", "jaxvllm.benchmarks.throughput", *argv, "--backend", "hf",
           "--json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=C.child_env(), text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the HF run failed (exit {proc.returncode})")
    return json.loads(proc.stdout)["runs"][0]


# ---------------------------------------------------------------------------------------------
def _child_argv(args: argparse.Namespace) -> list[str]:
    """The same workload and engine flags, as a command line for the HF child process."""
    argv = ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--data-seed", str(args.data_seed),
            "--hf-batch-size", str(args.hf_batch_size)]
    if args.hf_num_prompts:
        argv += ["--hf-num-prompts", str(args.hf_num_prompts)]
    if args.hf_device:
        argv += ["--hf-device", args.hf_device]
    return argv + C.engine_flags(args)


def run(args: argparse.Namespace) -> int:
    _check(args)
    runs = []
    if args.backend in ("hf", "both"):
        if args.backend == "both":
            runs.append(_run_hf_child(args, _child_argv(args)))
        else:
            runs.append(run_hf(args))
    if args.backend in ("jaxvllm", "both"):
        runs.insert(0, run_jaxvllm(args))
    result = {
        "benchmark": "throughput", "model": args.model, "dtype": args.dtype,
        "load_format": args.load_format, "num_prompts": args.num_prompts,
        "input_len": str(args.input_len), "output_len": str(args.output_len),
        "data_seed": args.data_seed, "runs": runs,
    }
    if len(runs) == 2:
        result["speedup_output_tok_s"] = runs[0]["output_tokens_per_s"] / runs[1]["output_tokens_per_s"]
    keys = [("requests", "num_requests"), ("req/s", "requests_per_s"),
            ("output tok/s", "output_tokens_per_s"), ("total tok/s", "total_tokens_per_s"),
            ("elapsed s", "elapsed_s"), ("output tokens", "output_tokens"),
            ("prompt tokens", "prompt_tokens"), ("KV usage peak", "kv_cache_usage_peak"),
            ("preemptions", "num_preemptions"), ("init s", "engine_init_s"), ("device", "device")]
    rows = [[label, *[r.get(k, "-") for r in runs]] for label, k in keys]
    if "speedup_output_tok_s" in result:
        rows.append(["jaxvllm / hf output tok/s", f"{result['speedup_output_tok_s']:.2f}x", ""])
    title = (f"throughput: {args.model or 'default model'} ({args.load_format}, {args.dtype}), "
             f"{args.num_prompts} requests, input {args.input_len}, output {args.output_len}")
    C.emit(result, args, title + "\n" + C.table(rows, ["metric", *[r["backend"] for r in runs]]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return C.script_main("throughput", __doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
