"""Start-up time: seconds from process start to the first generated token, cold (a fresh, empty
compilation cache and converted-weights cache) and warm (the same caches again), each in a fresh
subprocess. Without --enforce-eager the engine compiles every bucket at start-up, which is what a
server pays before its first request.

    jaxvllm bench startup --model bench/configs/llama-3-8b --load-format dummy --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from jaxvllm.benchmarks import common as C

_MARK = "JAXVLLM_STARTUP_RESULT "
_T_PROCESS = time.time()  # module import time in the child: close to process start


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from jaxvllm.config import EngineArgs
    g = parser.add_argument_group("start-up")
    g.add_argument("--input-len", type=int, default=16, help="Prompt tokens of the first request.")
    g.add_argument("--cache-dir", default=None,
                   help="Directory for the cold/warm caches (default: a fresh temporary one, "
                        "removed afterwards). Must be empty or absent for a true cold start.")
    g.add_argument("--warm-runs", type=int, default=1, help="Warm starts to time (median; "
                   "default 1).")
    g.add_argument("--timeout", type=float, default=1800.0, help="Seconds allowed per start.")
    g.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    C.add_output_args(parser)
    e = parser.add_argument_group("engine (EngineArgs; --compilation-cache-dir and "
                                  "--weights-cache-dir are set by this benchmark)")
    EngineArgs.add_cli_args(e)
    return parser


# JAX's own compile-path events, summed over the process (threads overlap, so the sums can exceed
# the wall time): where a warm start's seconds go, and whether the persistent cache really hit.
_JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
               "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
               "/jax/core/compile/backend_compile_duration": "backend_compile_s",
               "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s",
               "/jax/compilation_cache/cache_hits": "cache_hits",
               "/jax/compilation_cache/cache_misses": "cache_misses"}


def _record_jax_events() -> dict:
    import threading
    import jax.monitoring as mon
    totals = {k: 0 for k in _JAX_EVENTS.values()}
    lock = threading.Lock()  # the engine compiles on several threads

    def on_duration(event: str, secs: float, **_: Any) -> None:
        if event in _JAX_EVENTS:
            with lock:
                totals[_JAX_EVENTS[event]] += secs

    def on_event(event: str, **_: Any) -> None:
        if event in _JAX_EVENTS:
            with lock:
                totals[_JAX_EVENTS[event]] += 1
    mon.register_event_duration_secs_listener(on_duration)
    mon.register_event_listener(on_event)
    return totals


def _child(args: argparse.Namespace) -> int:
    t_import = time.time()
    jax_events = _record_jax_events()
    from jaxvllm.entrypoints.llm import LLM
    from jaxvllm.config import EngineArgs
    from jaxvllm.sampling_params import SamplingParams
    t_imported = time.time()
    kw = {k: v for k, v in vars(args).items() if k in EngineArgs.field_names() and k != "model"}
    llm = LLM(args.model, **kw)
    t_engine = time.time()
    vocab = llm.llm_engine.model_config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(args.input_len)]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0),
                       use_tqdm=False)
    t_first = time.time()
    assert len(out[0].outputs[0].token_ids) == 1
    info = llm.llm_engine.startup_info()  # all data-parallel replicas' together
    res = {"imports_s": t_imported - t_import, "engine_init_s": t_engine - t_imported,
           "load_s": info["load_s"], **{f"{k}_s": v for k, v in info["seconds"].items()},
           "compile_s": info["compile_s"], "kv_sizing_s": info["kv_sizing_s"],
           "first_token_s": t_first - t_engine, "in_process_total_s": t_first - _T_PROCESS,
           "programs": info.get("programs", {}), "from_cache": info["from_cache"],
           "tokenizer_origin": llm.llm_engine.tokenizer_origin,
           "num_gpu_blocks": info["num_blocks"], **jax_events}
    print(_MARK + json.dumps(res), flush=True)
    return 0


def _start_once(args: argparse.Namespace, cache_dir: str, label: str) -> dict:
    flags = C.engine_flags(args)
    cmd = [sys.executable, "-m", "jaxvllm.benchmarks.startup", "--child",
           "--input-len", str(args.input_len), *flags,
           "--compilation-cache-dir", os.path.join(cache_dir, "jax"),
           "--weights-cache-dir", os.path.join(cache_dir, "weights")]
    C.log(f"{label} start ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=C.child_env(), text=True)
    result: Optional[dict] = None
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(_MARK):
                wall = time.perf_counter() - t0
                result = json.loads(line[len(_MARK):])
                result["wall_s"] = wall
                break
            if time.perf_counter() - t0 > args.timeout:
                break
        returncode = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SystemExit(f"{label} start timed out after {args.timeout:.0f}s")
    if result is None or returncode != 0:
        raise SystemExit(f"{label} start failed (exit {returncode}); its stderr is above")
    C.log(f"{label} start: {result['wall_s']:.2f}s to the first token")
    return result


def run(args: argparse.Namespace) -> int:
    if args.child:
        return _child(args)
    C.ensure_tokenizer(args)
    tmp = None
    if args.cache_dir:
        cache_dir = args.cache_dir
        if os.path.isdir(cache_dir) and os.listdir(cache_dir):
            raise SystemExit(f"--cache-dir {cache_dir} is not empty: a cold start needs an empty one")
    else:
        cache_dir = tmp = tempfile.mkdtemp(prefix="jaxvllm-startup-")
    try:
        cold = _start_once(args, cache_dir, "cold")
        warms = [_start_once(args, cache_dir, f"warm {i + 1}") for i in range(args.warm_runs)]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    warm = sorted(warms, key=lambda r: r["wall_s"])[len(warms) // 2]
    result = {"benchmark": "startup", "model": args.model, "dtype": args.dtype,
              "load_format": args.load_format, "enforce_eager": args.enforce_eager,
              "cold_s": cold["wall_s"], "warm_s": warm["wall_s"], "cold": cold, "warm": warm,
              "warm_runs": [w["wall_s"] for w in warms]}
    keys = [("process start -> first token s", "wall_s"), ("imports s", "imports_s"),
            ("engine init s (load + compile)", "engine_init_s"),
            ("of which weights + config load s", "load_s"), ("  config s", "config_s"),
            ("  weights s", "params_s"), ("of which compile s", "compile_s"),
            ("of which KV-cache sizing s", "kv_sizing_s"),
            ("tokenizer s (from engine init)", "tokenizer_s"),
            ("tokenizer wait after compiling s", "tokenizer_wait_s"),
            ("first request s", "first_token_s"), ("weights from cache", "from_cache"),
            ("tokenizer from", "tokenizer_origin"),
            ("KV-cache blocks", "num_gpu_blocks"),
            ("persistent cache hits / misses", "cache_hits_misses"),
            ("JAX trace s (summed over threads)", "trace_s"), ("JAX lower s", "lower_s"),
            ("XLA compile or cache load s", "backend_compile_s"),
            ("of which cache read s", "cache_read_s")]
    for r in (cold, warm):
        r["cache_hits_misses"] = f"{r.get('cache_hits')} / {r.get('cache_misses')}"
    rows = [[label, cold.get(k), warm.get(k)] for label, k in keys]
    title = (f"startup: {args.model or 'default model'} ({args.load_format}, {args.dtype})"
             + (", enforce-eager" if args.enforce_eager else ""))
    kinds = sorted(cold["programs"].items(), key=lambda kv: -kv[1][2])
    compiled = C.table([[k, *v] for k, v in kinds],
                       ["cold start: programs compiled", "count", "lower s", "compile s (summed)",
                        "slowest compile s", "store s (summed)"])
    C.emit(result, args, title + "\n" + C.table(rows, ["", "cold", "warm"]) + "\n" + compiled)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return C.script_main("startup", __doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
