"""Microbenchmark: Scheduler.schedule() + update_from_output() for a batch of running decodes.

Default: 256 running requests, 512-token prompts, block size 16, ignore_eos (nobody finishes during
the measurement). Prefills are run first (not timed); then each timed step is one schedule() plus
one update_from_output() with a pre-built fake runner output (building it is not timed).

    python bench/scheduler_bench.py [--num-reqs 256] [--prompt-len 512] [--steps 2000] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxvllm.core.outputs import ModelRunnerOutput  # noqa: E402
from jaxvllm.core.request import Request  # noqa: E402
from jaxvllm.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from jaxvllm.sampling_params import SamplingParams  # noqa: E402


def run(num_reqs: int, prompt_len: int, steps: int, block_size: int, prefix_caching: bool,
        seed: int) -> dict:
    rng = random.Random(seed)
    max_tokens = steps + 64
    max_model_len = prompt_len + max_tokens
    blocks_per_req = -(-(prompt_len + max_tokens) // block_size)
    cfg = SchedulerConfig(max_num_seqs=num_reqs, max_num_batched_tokens=8192,
                          max_model_len=max_model_len, num_blocks=num_reqs * blocks_per_req + 1,
                          block_size=block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(cfg)
    for i in range(num_reqs):
        prompt = [rng.randrange(3, 32000) for _ in range(prompt_len)]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sched.add_request(Request(f"req-{i}", prompt, sp, eos_token_id=2))

    def fake_output(scheduler_output):
        sampled = {}
        for rid in scheduler_output.num_scheduled_tokens:
            req = sched.requests[rid]
            if req.num_computed_tokens == req.num_tokens:
                sampled[rid] = [rng.randrange(3, 32000)]
        return ModelRunnerOutput(sampled_token_ids=sampled)

    # Prefill (untimed) until every request is decoding.
    while True:
        scheduler_output = sched.schedule()
        sched.update_from_output(scheduler_output, fake_output(scheduler_output))
        if len(sched.running) == num_reqs and all(r.num_tokens - r.num_computed_tokens == 1
                                                   for r in sched.running):
            break

    times_sched, times_update, times_total = [], [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            scheduler_output = sched.schedule()
            t1 = time.perf_counter_ns()
            runner_output = fake_output(scheduler_output)
            t2 = time.perf_counter_ns()
            sched.update_from_output(scheduler_output, runner_output)
            t3 = time.perf_counter_ns()
            assert len(scheduler_output.num_scheduled_tokens) == num_reqs
            times_sched.append((t1 - t0) / 1e3)
            times_update.append((t3 - t2) / 1e3)
            times_total.append((t1 - t0 + t3 - t2) / 1e3)
    finally:
        gc.enable()

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "num_reqs": num_reqs, "prompt_len": prompt_len, "block_size": block_size,
        "prefix_caching": prefix_caching, "steps": steps,
        "schedule_us_median": statistics.median(times_sched), "schedule_us_p90": q(times_sched, 0.9),
        "update_us_median": statistics.median(times_update), "update_us_p90": q(times_update, 0.9),
        "step_us_median": statistics.median(times_total), "step_us_p90": q(times_total, 0.9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-reqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    res = run(args.num_reqs, args.prompt_len, args.steps, args.block_size,
              not args.no_prefix_caching, args.seed)
    if args.json:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))
        return
    print(f"scheduler bench: {res['num_reqs']} running decodes, prompt {res['prompt_len']}, "
          f"block {res['block_size']}, prefix caching {'on' if res['prefix_caching'] else 'off'}, "
          f"{res['steps']} steps")
    print(f"{'phase':<22}{'median us':>12}{'p90 us':>12}")
    for name, key in (("schedule()", "schedule"), ("update_from_output()", "update"),
                      ("step (sum)", "step")):
        print(f"{name:<22}{res[key + '_us_median']:>12.1f}{res[key + '_us_p90']:>12.1f}")


if __name__ == "__main__":
    main()
