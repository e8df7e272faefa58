"""What a decode step costs to launch, apart from the engine: the jitted model step called in a loop.

    PYTHONPATH=. python3 bench/step_launch.py --model bench/configs/llama-3-8b --tp 2 [--tokens 8 64]

Builds the runner as the engine does (dummy weights), makes a decode batch (every row at context
`--context`), and prints ms per step for: new host inputs each call (as the engine passes them),
two device-resident input sets alternating (new addresses, no transfers), the same inputs every
call, and one call with the device idle before it (how long the call holds its caller while the
step's programs are enqueued) or with the step before still running (whether the call waits for
it). Then, for the first bucket, the step call with `--python-ms` of
GIL-holding Python between calls, made on the same thread or on a second one, at Python's default
GIL switch interval and at the runner's (worker/model_runner.py): whether the launch overlaps the
engine's own host work. bench/RESULTS.md, "Steps launched off the engine's thread", has a run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np


def _decode_batch(runner, t: int, context: int):
    from jaxvllm.worker.input_batch import StepBatch
    r = runner.input_batch.request_bucket(t)
    bs = runner.config.block_size
    nb = -(-context // bs)
    bt = np.zeros((r, runner.max_blocks_per_seq), np.int32)
    for i in range(r):
        bt[i, :nb] = 1 + i * nb + np.arange(nb)
    pos = context - 1
    slots = (bt[:, pos // bs] * bs + pos % bs).astype(np.int32)[:t]
    return StepBatch([], t, np.ones(t, np.int32), np.full(t, pos, np.int32), slots,
                     np.arange(r + 1, dtype=np.int32), np.full(r, context, np.int32), bt,
                     np.array([r], np.int32), np.arange(r, dtype=np.int32), np.ones(r, bool),
                     np.full(t, -1, np.int32))


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench/configs/llama-3-8b")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 64], help="token buckets to time")
    p.add_argument("--context", type=int, default=256, help="tokens of context per row")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--python-ms", type=float, default=2.5,
                   help="GIL-holding Python per step in the overlap rows")
    p.add_argument("--num-blocks", type=int, default=4096)
    args = p.parse_args()

    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    from jaxvllm.worker.model_runner import LAUNCH_SWITCH_INTERVAL_S
    eargs = EngineArgs(model=args.model, load_format="dummy", dtype="bfloat16",
                       tensor_parallel_size=args.tp, num_gpu_blocks_override=args.num_blocks,
                       max_model_len=max(4096, args.context + 1))
    runner, _, _ = setup.build_runner(eargs, setup.load(eargs))
    import jax
    where = runner._prev_sampled.sharding
    rows, overlap = [], None
    for t in args.tokens:
        packed, prev = runner._device_inputs(_decode_batch(runner, t, args.context))
        step = runner._step_for(t)

        def call(pk, pv):
            runner.kv_cache, _, _ = step(runner.params, runner.kv_cache, pk, pv)

        call(packed, prev)  # compile
        jax.block_until_ready(runner.kv_cache)
        resident = [(jax.device_put(packed, where), jax.device_put(np.asarray(prev), where))
                    for _ in range(2)]
        inputs = {
            "new host inputs each call": lambda i: (packed, jax.device_put(np.asarray(prev), where)),
            "two device-resident sets, alternating": lambda i: resident[i % 2],
            "the same device-resident inputs": lambda i: resident[0],
        }
        row = {"tokens": t}
        for name, make in inputs.items():
            for _ in range(2):  # the second pass is the one kept (warm allocator)
                jax.block_until_ready(runner.kv_cache)
                t0 = time.perf_counter()
                for i in range(args.iters):
                    call(*make(i))
                jax.block_until_ready(runner.kv_cache)
                row[name] = (time.perf_counter() - t0) / args.iters * 1e3
        idle = []
        for _ in range(20):
            jax.block_until_ready(runner.kv_cache)
            t0 = time.perf_counter()
            call(*resident[0])
            idle.append(time.perf_counter() - t0)
        row["one call, device idle before it"] = statistics.median(idle) * 1e3
        busy = []
        for _ in range(20):
            jax.block_until_ready(runner.kv_cache)
            call(*resident[0])
            t0 = time.perf_counter()
            call(*resident[1])
            busy.append(time.perf_counter() - t0)
        row["one call, the step before still running"] = statistics.median(busy) * 1e3
        rows.append(row)
        if overlap is None:
            overlap = _overlap(runner, lambda: call(*resident[0]), args, LAUNCH_SWITCH_INTERVAL_S)

    names = [k for k in rows[0] if k != "tokens"]
    print(f"\nms per step, TP {args.tp}, context {args.context}, {args.iters} calls")
    print("| | " + " | ".join(f"bucket {r['tokens']}" for r in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r[n]:.3f}" for r in rows) + " |")
    print(f"\nms per step, bucket {args.tokens[0]}, with {args.python_ms:g} ms of Python per step")
    print("| | " + " | ".join(f"switch interval {s * 1e3:g} ms" for s in overlap) + " |")
    print("| --- |" + " --- |" * len(overlap))
    for n in next(iter(overlap.values())):
        print(f"| {n} | " + " | ".join(f"{v[n]:.3f}" for v in overlap.values()) + " |")
    return 0


def _overlap(runner, call, args, runner_interval: float) -> dict:
    import jax
    pool = ThreadPoolExecutor(1)
    out = {}
    default = sys.getswitchinterval()
    for interval in (0.005, runner_interval):
        sys.setswitchinterval(interval)
        res = {}
        for name, threaded in (("step call and Python on one thread", False),
                               ("step call on a second thread", True)):
            jax.block_until_ready(runner.kv_cache)
            t0 = time.perf_counter()
            pending = None
            for _ in range(args.iters):
                if threaded:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(call)
                else:
                    call()
                _busy(args.python_ms)
            if pending is not None:
                pending.result()
            jax.block_until_ready(runner.kv_cache)
            res[name] = (time.perf_counter() - t0) / args.iters * 1e3
        out[interval] = res
    sys.setswitchinterval(default)
    pool.shutdown()
    return out


if __name__ == "__main__":
    sys.exit(main())
