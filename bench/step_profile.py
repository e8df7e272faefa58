"""Where an offline throughput run's time goes, step by step, against a roofline per step.

Runs the `bench/throughput.py` workload and records every engine step: its token bucket, rows,
decode rows and prefill tokens, the KV context it attends over, and when its samples reached the
host. The seconds between two steps' samples are the step's time when the device is the bound
(the host then waits in `collect`: "device wait" below; near zero means the host is the bound).
Each step's roofline is max(FLOPs / peak, bytes / bandwidth): linear layers at 2 x parameters per
token, the LM head per sampled row, attention at 4 x heads x head_dim x layers per (query, key)
pair; bytes are the weights once plus the K/V read. Peak and bandwidth are measured in the run
(an 8192^3 matmul, FP8 for FP8 weights, a 2 GiB copy) unless given. `--trace-steps START:COUNT`
also records a JAX profiler trace of COUNT steps from step START and sums its GPU kernels by name.

    python bench/step_profile.py --model bench/configs/llama-3-8b --load-format dummy \\
        --dtype bfloat16 --num-prompts 1000 --input-len 128:1024 --output-len 32:512
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks import common as C


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from jaxvllm.config import EngineArgs
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=1000)
    C.add_len_args(g, "128:1024", "32:512")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="GEMM peak for the roofline (default: measured, an 8192^3 matmul in "
                        "bf16, or FP8 with --quantization fp8).")
    g.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="Memory bandwidth for the roofline (default: measured, 2 GiB copy).")
    g.add_argument("--trace-steps", default=None, metavar="START:COUNT",
                   help="Profile COUNT steps from step START and sum their GPU kernels.")
    g.add_argument("--trace-dir", default=None, help="Where the trace goes (default: a temp dir).")
    g.add_argument("--trace-top", type=int, default=25, help="How many kernels the summary lists.")
    g.add_argument("--host-profile", default=None, metavar="START:COUNT",
                   help="cProfile the engine's thread over COUNT steps from step START (not overlapping "
                        "--trace-steps: both hook the interpreter's profiler); prints "
                        "the functions with the most cumulative time.")
    C.add_output_args(p)
    e = p.add_argument_group("engine (EngineArgs)")
    EngineArgs.add_cli_args(e)
    return p


class StepCost:
    """FLOPs and bytes of one step of a dense model (MoE: the experts a token uses)."""

    def __init__(self, cfg: Any, param_bytes: int, kv_bytes_per_token: int) -> None:
        h, layers = cfg.hidden_size, cfg.num_layers
        mlp = (cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.num_experts
               else cfg.intermediate_size)
        per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * mlp
        self.linear_flops_per_token = 2 * layers * per_layer
        self.head_flops_per_row = 2 * h * cfg.vocab_size
        self.attn_flops_per_pair = 4 * cfg.num_heads * cfg.head_dim * layers
        self.param_bytes = param_bytes
        self.kv_bytes_per_token = kv_bytes_per_token

    def __call__(self, spans: list[tuple[int, int]], rows: int) -> tuple[float, float]:
        """spans: (context before, new tokens) per request -> (FLOPs, bytes)."""
        tokens = sum(n for _, n in spans)
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in spans)
        flops = (self.linear_flops_per_token * tokens + self.head_flops_per_row * rows
                 + self.attn_flops_per_pair * pairs)
        nbytes = self.param_bytes + self.kv_bytes_per_token * sum(c + n for c, n in spans)
        return flops, nbytes


class StepRecorder:
    """Wraps the runner's dispatch, launch and collect: one record per dispatched step, with host
    timestamps of each on a clock that skips the pauses in on_step (starting or stopping
    a profiler)."""

    def now(self) -> float:
        return time.perf_counter() - self.paused

    def __init__(self, engine: Any, cost: StepCost) -> None:
        self.records: list[dict] = []
        self._pending: collections.deque = collections.deque()
        self.on_step: Optional[Any] = None
        self.paused = 0.0  # seconds spent in on_step (starting, stopping profilers): not the run's
        runner, sched = engine.runner, engine.scheduler
        dispatch, collect, submit = runner.dispatch, runner.collect, runner._launcher.submit
        current: dict = {}

        def timed_submit(work: Any) -> Any:
            rec = current

            def timed_work() -> Any:
                rec["launch0"] = self.now()
                try:
                    return work()
                finally:
                    rec["launch1"] = self.now()
            return submit(timed_work)

        def timed_dispatch(so: Any) -> Any:
            nonlocal current
            current = {"dispatch0": self.now()}
            handle = dispatch(so)
            if handle is not None:
                rec = current
                rec["dispatch1"] = self.now()
                # schedule() has advanced num_computed_tokens over this step's tokens already.
                spans = [(sched.requests[rid].num_computed_tokens - n, n)
                         for rid, n in so.num_scheduled_tokens.items()]
                flops, nbytes = cost(spans, len(spans))
                rec.update(bucket=handle.num_tokens, tokens=so.total_num_scheduled_tokens,
                           rows=len(spans), decode_rows=sum(n == 1 for _, n in spans),
                           flops=flops, bytes=nbytes)
                self._pending.append(rec)
                self.records.append(rec)
            return handle

        def timed_collect(handle: Any) -> Any:
            t0 = self.now()
            out = collect(handle)
            rec = self._pending.popleft()
            rec["collected"] = self.now()
            rec["wait"] = rec["collected"] - t0
            if self.on_step is not None:
                t = time.perf_counter()
                self.on_step(len(self.records) - len(self._pending))
                self.paused += time.perf_counter() - t
            return out

        runner.dispatch, runner.collect = timed_dispatch, timed_collect
        runner._launcher.submit = timed_submit


def step_kind(r: dict) -> str:
    if r["decode_rows"] == r["rows"]:
        return "decode only"
    return "prefill only" if r["decode_rows"] == 0 else "mixed"


def timeline(records: list[dict], peak: float, bw: float) -> None:
    """Each step's seconds (from the later of the previous step's samples and its own dispatch to
    its samples) and roofline seconds."""
    prev = None
    for r in records:
        start = r["dispatch1"] if prev is None else max(prev, r["dispatch1"])
        r["seconds"] = r["collected"] - start
        r["roofline"] = max(r["flops"] / peak, r["bytes"] / bw)
        r["compute_bound"] = r["flops"] / peak >= r["bytes"] / bw
        prev = r["collected"]


def aggregate(g: list[dict]) -> dict:
    s = sum(r["seconds"] for r in g)
    ms = lambda key: 1e3 * C.mean([key(r) for r in g])  # noqa: E731
    return {
        "steps": len(g), "seconds": s, "ms_per_step": 1e3 * s / len(g),
        "tokens_per_step": C.mean([r["tokens"] for r in g]),
        "rows_per_step": C.mean([r["rows"] for r in g]),
        "tflops": sum(r["flops"] for r in g) / s / 1e12,
        "tbs": sum(r["bytes"] for r in g) / s / 1e12,
        "roofline_s": sum(r["roofline"] for r in g),
        "of_roofline": sum(r["roofline"] for r in g) / s,
        "compute_bound_share": sum(r["compute_bound"] for r in g) / len(g),
        # the engine's thread: waiting for the samples in collect(), and everything else
        "device_wait_ms": ms(lambda r: r["wait"]),
        "host_ms": ms(lambda r: r["seconds"] - r["wait"]),
        "dispatch_ms": ms(lambda r: r["dispatch1"] - r["dispatch0"]),
        # from the end of dispatch() to the launch thread starting the step's programs
        "launch_delay_ms": ms(lambda r: r["launch0"] - r["dispatch1"]),
        "launch_ms": ms(lambda r: r["launch1"] - r["launch0"])}


def step_groups(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per kind of step and all, per token bucket and kind)."""
    kinds: dict[str, list[dict]] = collections.defaultdict(list)
    buckets: dict[tuple[int, str], list[dict]] = collections.defaultdict(list)
    for r in records:
        kinds[step_kind(r)].append(r)
        kinds["all"].append(r)
        buckets[(r["bucket"], step_kind(r))].append(r)
    order = ("decode only", "mixed", "prefill only", "all")
    return ([{"group": k, **aggregate(kinds[k])} for k in order if kinds.get(k)],
            [{"group": f"{b} {k}", **aggregate(buckets[(b, k)])} for b, k in sorted(buckets)])


COLUMNS = [("steps", "steps"), ("s", "seconds"), ("ms/step", "ms_per_step"),
           ("tokens", "tokens_per_step"), ("rows", "rows_per_step"), ("TFLOP/s", "tflops"),
           ("TB/s", "tbs"), ("of roofline", "of_roofline"),
           ("compute-bound", "compute_bound_share"), ("wait ms", "device_wait_ms"),
           ("host ms", "host_ms"), ("dispatch ms", "dispatch_ms"),
           ("launch delay ms", "launch_delay_ms"), ("launch ms", "launch_ms")]


def group_table(groups: list[dict], first: str) -> str:
    return C.table([[g["group"]] + [g[k] for _, k in COLUMNS] for g in groups],
                   [first] + [h for h, _ in COLUMNS])


def kernel_summary(trace_dir: str, top: int = 25) -> dict:
    """GPU kernels of a JAX profiler trace (its perfetto JSON), summed by name."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    paths += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no trace JSON under {trace_dir}"}
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    if not spans:
        return {"error": "no GPU events in the trace"}
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in spans:
        acc = by_name[e["name"]]
        acc[0] += e["dur"]
        acc[1] += 1
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    intervals.sort()
    busy, end = 0.0, None
    for a, b in intervals:  # union of the kernels' intervals: time the GPU ran anything
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    window = intervals[-1][1] - intervals[0][0]
    total = sum(v[0] for v in by_name.values())
    kernels = [{"name": n[:90], "ms": v[0] / 1e3, "calls": v[1], "share": v[0] / total}
               for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    # Host threads: the events each spent most time in (nested events count in each).
    threads: dict[Any, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float))
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("pid") not in gpu_pids:
            threads[(e["pid"], e.get("tid"))][e["name"]] += e["dur"]
    busiest = sorted(threads.items(), key=lambda kv: -max(kv[1].values()))[:4]
    host = [{"thread": str(key), "events": [
        {"name": n[:90], "ms": d / 1e3} for n, d in sorted(names.items(), key=lambda kv: -kv[1])[:10]]}
        for key, names in busiest]
    return {"window_ms": window / 1e3, "busy_ms": busy / 1e3, "kernel_ms": total / 1e3,
            "kernels": kernels, "host_threads": host}


def _window(spec: str) -> tuple[int, int]:
    start, count = (int(x) for x in spec.split(":"))
    return start, start + count


def run(args: argparse.Namespace) -> int:
    import jax
    from jaxvllm.sampling_params import RequestOutputKind, SamplingParams
    from jaxvllm.engine.setup import configure_jax
    configure_jax(C.engine_args_from(args))  # before any device use: the memory pool settings
    # Measured before the engine starts: programs lowered after its warm-up count as compiles
    # while serving (the engine warns), and the buffers fit before the KV cache takes the memory.
    # FP8 weights: every FLOP at the FP8 GEMM's peak, the bf16 LM head's and attention's too (a
    # bound below the truth where those are a large share: long-context prefill).
    peak = 1e12 * args.peak_tflops if args.peak_tflops else C.measure_matmul_flops(
        fp8=args.quantization == "fp8")
    bw = 1e12 * args.bandwidth_tbs if args.bandwidth_tbs else C.measure_bandwidth(2 << 30)
    llm = C.build_llm(args)
    engine = llm.llm_engine
    cfg = engine.model_config
    runner = engine.runner
    param_bytes = engine.startup_info()["param_bytes"]
    kv_bytes_per_token = sum(x.nbytes for x in jax.tree.leaves(runner.kv_cache)) // (
        engine.startup_info()["num_blocks"] * engine.args.block_size)
    recorder = StepRecorder(engine, StepCost(cfg, param_bytes, kv_bytes_per_token))
    windows = []  # (start, end, begin(), end()) over step numbers
    trace = None
    if args.trace_steps:
        trace = {"dir": args.trace_dir or tempfile.mkdtemp(prefix="step-trace-")}
        windows.append((*_window(args.trace_steps), lambda: jax.profiler.start_trace(
            trace["dir"], create_perfetto_trace=True), jax.profiler.stop_trace))
    profile = None
    if args.host_profile:
        import cProfile
        profile = cProfile.Profile()
        windows.append((*_window(args.host_profile), profile.enable, profile.disable))
    active = set()

    def on_step(n: int) -> None:
        for i, (start, end, begin, stop) in enumerate(windows):
            if n == start and i not in active:
                begin()
                active.add(i)
            elif n >= end and i in active:
                stop()
                active.discard(i)
                windows[i] = (-1, -1, begin, stop)  # once
    recorder.on_step = on_step
    reqs = C.make_requests(args.num_prompts, args.input_len, args.output_len, cfg.vocab_size,
                           args.data_seed)
    for i, r in enumerate(reqs):
        engine.add_request(f"prof-{i}", {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    t0 = recorder.now()
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                out_tokens += len(out.outputs[0].token_ids)
    elapsed = recorder.now() - t0
    for i in list(active):
        windows[i][3]()
    timeline(recorder.records, peak, bw)
    kinds, buckets = step_groups(recorder.records)
    result = {"elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
              "peak_tflops": peak / 1e12, "bandwidth_tbs": bw / 1e12,
              "param_bytes": param_bytes, "kv_bytes_per_token": kv_bytes_per_token,
              "kinds": kinds, "buckets": buckets, "device": C.device_description(engine)}
    if trace is not None:
        result["trace"] = kernel_summary(trace["dir"], args.trace_top)
    if profile is not None:
        import io
        import pstats
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("cumulative").print_stats(30)
        result["host_profile"] = buf.getvalue()
    text = [f"{C.fmt(out_tokens / elapsed)} output tok/s in {elapsed:.1f} s on {result['device']}; "
            f"roofline from {peak / 1e12:.0f} TFLOP/s and {bw / 1e12:.2f} TB/s", "",
            group_table(kinds, "kind"), "", group_table(buckets, "bucket, steps")]
    if trace is not None and "kernels" in result["trace"]:
        tr = result["trace"]
        text += ["", f"trace: {tr['window_ms']:.1f} ms window, GPU busy {tr['busy_ms']:.1f} ms",
                 C.table([[k["name"], k["ms"], k["calls"], k["share"]] for k in tr["kernels"]],
                         ["kernel", "ms", "calls", "share"])]
        for t in tr["host_threads"]:
            text += ["", f"host thread {t['thread']}",
                     C.table([[e["name"], e["ms"]] for e in t["events"]], ["event", "ms"])]
    elif trace is not None:
        text += ["", f"trace: {result['trace']['error']}"]
    if profile is not None:
        text += ["", result["host_profile"]]
    C.emit(result, args, "\n".join(text))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return C.script_main("step_profile", __doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
