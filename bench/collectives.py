"""All-reduce latency at tensor-parallel decode sizes, under several sets of XLA flags.

    PYTHONPATH=. python3 bench/collectives.py [--tp 2] [--tokens 1 8 64 512] [--flag-sets default,oneshot]

A tensor-parallel decoder layer ends its attention block and its MLP in one all-reduce of the
hidden states ([tokens, hidden] bf16: 8 KiB per token at hidden 4096), so a batch-1 decode step of
a 32-layer model waits on 65 of them in a row. This times a chain of `--chain` dependent all-reduces
(`psum` under `shard_map`, a scale between them so that none can be merged or dropped) and
subtracts the same chain without the all-reduces: what is left is the cost of one all-reduce on the
step's critical path. Each flag set runs in its own process (XLA reads its flags once); a set that
XLA rejects or that fails is reported as such, not skipped silently.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Name -> XLA flags added to the environment's XLA_FLAGS for that process.
FLAG_SETS = {
    "default": "",
    # XLA's own one-shot kernel: each device reads its peers' buffers directly (no NCCL call).
    "oneshot": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true",
    # Collectives recorded into the CUDA graphs with the kernels around them.
    "cmdbuf": "--xla_gpu_enable_command_buffer=+COLLECTIVES",
    "oneshot+cmdbuf": ("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true "
                       "--xla_gpu_enable_command_buffer=+COLLECTIVES"),
    # On the compute stream: no cross-stream event per collective (nothing to overlap at decode).
    "sync": "--xla_gpu_disable_async_collectives=ALLREDUCE",
    "nvshmem": "--xla_gpu_experimental_enable_nvshmem=true",
}


def _time_chain(tp: int, tokens: int, hidden: int, chain: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxvllm.worker.sharding import _shard_map
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))

    def body(x, reduce: bool):
        for _ in range(chain):
            x = (jax.lax.psum(x, "tp") if reduce else x * jnp.asarray(tp, x.dtype)) * jnp.asarray(1.0 / tp, x.dtype)
        return x

    x = jax.device_put(jnp.ones((tp * tokens, hidden), jnp.bfloat16),
                       NamedSharding(mesh, P("tp", None)))
    out = {}
    for reduce in (True, False):
        f = jax.jit(_shard_map(lambda a, r=reduce: body(a, r), mesh, P("tp", None), P("tp", None)))
        y = f(x)
        y.block_until_ready()
        assert float(y[0, 0]) == 1.0, "the chain changed its input: the all-reduce is wrong"
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(10):
                y = f(y)
            y.block_until_ready()
            times.append((time.perf_counter() - t0) / 10)
        out["with" if reduce else "without"] = statistics.median(times)
    return {"tokens": tokens, "bytes": tokens * hidden * 2,
            "chain_us": out["with"] * 1e6, "base_us": out["without"] * 1e6,
            "per_allreduce_us": (out["with"] - out["without"]) / chain * 1e6}


def _child(args: argparse.Namespace) -> None:
    rows = [_time_chain(args.tp, t, args.hidden, args.chain, args.reps) for t in args.tokens]
    print("RESULT " + json.dumps(rows), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--chain", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--flag-sets", default=",".join(FLAG_SETS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="Print one JSON document instead of a table.")
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    results = {}
    for name in args.flag_sets.split(","):
        if name not in FLAG_SETS:
            results[name] = {"error": f"unknown flag set (known: {', '.join(FLAG_SETS)})",
                             "seconds": 0.0}
            continue
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tp", str(args.tp),
               "--hidden", str(args.hidden), "--chain", str(args.chain), "--reps", str(args.reps),
               "--tokens", *map(str, args.tokens)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[name] = {"error": " | ".join(tail)}
        else:
            results[name] = {"rows": json.loads(line[0][7:])}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print("| flag set | " + " | ".join(f"{t} tok ({t * args.hidden * 2 // 1024} KiB) us"
                                         for t in args.tokens) + " |")
    print("| --- |" + " --- |" * len(args.tokens))
    for name, r in results.items():
        cells = ([f"{row['per_allreduce_us']:.1f}" for row in r["rows"]] if "rows" in r
                 else [f"failed: {r['error'][:80]}"] + [""] * (len(args.tokens) - 1))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
