"""Every row of the one-GPU speed targets in one run: each row is the `bench/README.md` command
(throughput, latency, serve, startup, spec_decode) in a process of its own, one after the other,
sharing one compilation cache so only the first start of each engine configuration compiles
(startup's cold row uses an empty cache of its own). Prints one table: the figures of each row
beside its target.

    python bench/target_rows.py --model bench/configs/llama-3-8b --load-format dummy --dtype bfloat16
        [--rows mixed,long,serve-inf,serve-16,batch-1,startup,spec] [--spec-model M] [--quick]
        [--work-dir DIR]

The rows of quantized weights (issue 22's; not run unless named) take their quantization's engine
flags: fp8-long (FP8 weights and KV cache, 500 x 1000 / 1000), fp8-batch-1 and int4-batch-1 (FP8,
and int4 as AWQ's layout: dummy weights are quantized on load), the batch-1 ones judged against
the bf16 batch-1 row of the same run, which must come before them:
`--rows batch-1,fp8-batch-1,int4-batch-1,long,fp8-long`.

The spec row decodes by prompt lookup at batch 1 in batch-invariant mode (so that its greedy
output can be the same as plain decoding's): a dummy model's guesses say nothing, so
`--spec-model` names a real model that the row runs grown to --model's shape (bench/grow.py).
`--quick` swaps every workload for a seconds-long one (CPU smoke runs, tests); engine flags after
`--` go to every row's engine but the spec row's (e.g. `-- --max-num-seqs 512`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks import common as C

BENCH = os.path.dirname(os.path.abspath(__file__))
MIXED = ["--num-prompts", "1000", "--input-len", "128:1024", "--output-len", "32:512"]
QUICK_MIXED = ["--num-prompts", "8", "--input-len", "16:64", "--output-len", "8:32"]
BATCH1 = ["--batch-size", "1", "--input-len", "128", "--output-len", "256", "--iters", "3",
          "--warmup-iters", "1"]
QUICK_BATCH1 = ["--batch-size", "1", "--input-len", "16", "--output-len", "16", "--iters", "1",
                "--warmup-iters", "1"]
LONG = ["--num-prompts", "500", "--input-len", "1000", "--output-len", "1000"]
QUICK_LONG = ["--num-prompts", "4", "--input-len", "32", "--output-len", "32"]
QUICK_ENGINE = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens",
                "256", "--num-gpu-blocks-override", "64", "--token-buckets", "16", "64", "256"]


@dataclass
class Row:
    script: str
    workload: list[str]
    quick: list[str]
    target: str
    # (result) -> ..., or (result, the baseline row's result) -> ... for a row with a baseline
    figures: Callable[..., list[tuple[str, float]]]
    met: Callable[..., bool]
    takes_engine_flags: bool = True  # spec_decode sets its engines itself
    flags: tuple[str, ...] = ()  # the row's own engine flags (a quantization)
    baseline: Optional[str] = None  # the row figures and met compare with


def _speedups(r: list) -> list[tuple[float, bool]]:
    """spec_decode's runs after plain decoding's: (decode rate over plain's, same output)."""
    return [(x["decode_tok_s"] / r[0]["decode_tok_s"], x["same_output"]) for x in r[1:]]


def _run(r: dict) -> dict:
    """The first run of a throughput or serve result (ours; one request rate)."""
    return r["runs"][0]


def _quantized_batch1(flag: str, times: float) -> Row:
    """The batch-1 row with weights quantized by `flag`, `times` bf16's decode rate its target."""
    speedup = lambda r, base: r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return Row("latency", BATCH1, QUICK_BATCH1, f">= {times}x the batch-1 row's decode tok/s",
               lambda r, base: [("decode tok/s", r["decode_tokens_per_s"]),
                                ("x bf16", speedup(r, base))],
               lambda r, base: speedup(r, base) >= times,
               flags=("--quantization", flag), baseline="batch-1")


ROWS = {
    "mixed": Row("throughput", MIXED, QUICK_MIXED, ">= 12,000 output tok/s",
                 lambda r: [("output tok/s", _run(r)["output_tokens_per_s"])],
                 lambda r: _run(r)["output_tokens_per_s"] >= 12000),
    "long": Row("throughput", LONG, QUICK_LONG, ">= 13,000 output tok/s",
                lambda r: [("output tok/s", _run(r)["output_tokens_per_s"])],
                lambda r: _run(r)["output_tokens_per_s"] >= 13000),
    "serve-inf": Row("serve", ["--launch", "subprocess", "--request-rates", "inf", *MIXED],
                     ["--launch", "subprocess", "--request-rates", "inf", *QUICK_MIXED],
                     ">= 11,000 output tok/s, TPOT p50 <= 25 ms",
                     lambda r: [("output tok/s", _run(r)["output_tokens_per_s"]),
                                ("TPOT p50 ms", _run(r)["tpot_ms"]["p50"])],
                     lambda r: (_run(r)["output_tokens_per_s"] >= 11000
                                and _run(r)["tpot_ms"]["p50"] <= 25)),
    "serve-16": Row("serve", ["--launch", "subprocess", "--request-rates", "16", *MIXED],
                    ["--launch", "subprocess", "--request-rates", "16", *QUICK_MIXED],
                    "TTFT p50 <= 50 ms",
                    lambda r: [("TTFT p50 ms", _run(r)["ttft_ms"]["p50"]),
                               ("output tok/s", _run(r)["output_tokens_per_s"])],
                    lambda r: _run(r)["ttft_ms"]["p50"] <= 50),
    "batch-1": Row("latency", BATCH1, QUICK_BATCH1, ">= 250 decode tok/s",
                   lambda r: [("decode tok/s", r["decode_tokens_per_s"]),
                              ("of the weight-read roofline", r["decode_fraction_of_roofline"])],
                   lambda r: r["decode_tokens_per_s"] >= 250),
    "startup": Row("startup", ["--warm-runs", "2"], ["--warm-runs", "1"],
                   "cold <= 60 s, warm <= 10 s",
                   lambda r: [("cold s", r["cold_s"]), ("warm s", r["warm_s"])],
                   lambda r: r["cold_s"] <= 60 and r["warm_s"] <= 10),
    "spec": Row("spec_decode", ["--k", "4", "6", "--batch-invariant"],
                ["--k", "2", "--batch-invariant", "--output-len", "12", "--max-model-len", "512"],
                ">= 2x plain batch-1 decode, the same greedy output",
                lambda r: [(f"k {x['k']} speed-up", s) for x, (s, _) in zip(r[1:], _speedups(r))]
                + [("runs with plain's output", sum(same for _, same in _speedups(r)))],
                lambda r: any(s >= 2 and same for s, same in _speedups(r)),
                takes_engine_flags=False),
    # Issue 22's: quantized weights (TensorRT-LLM's FP8 figure on one H200 for fp8-long).
    "fp8-long": Row("throughput", LONG, QUICK_LONG, ">= 17,744 output tok/s",
                    lambda r: [("output tok/s", _run(r)["output_tokens_per_s"])],
                    lambda r: _run(r)["output_tokens_per_s"] >= 17744,
                    flags=("--quantization", "fp8", "--kv-cache-dtype", "fp8")),
    "fp8-batch-1": _quantized_batch1("fp8", 1.6),
    "int4-batch-1": _quantized_batch1("awq", 2.5),
}
DEFAULT_ROWS = [name for name, row in ROWS.items() if not row.flags]


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"Comma-separated rows to run, in order (default: "
                        f"{','.join(DEFAULT_ROWS)}; quantized ones: "
                        f"{','.join(n for n in ROWS if n not in DEFAULT_ROWS)}).")
    p.add_argument("--spec-model", default=None,
                   help="A real model for the spec row, run grown to --model's shape (default: "
                        "--model itself).")
    p.add_argument("--quick", action="store_true", help="Seconds-long workloads (smoke runs).")
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds allowed per row.")
    p.add_argument("--work-dir", default=None,
                   help="Where each row's JSON result and the rows' shared compilation cache are "
                        "kept (default: a temporary directory, removed at the end). A run cut "
                        "short keeps its finished rows there, and a later run with the same "
                        "directory starts from the cache.")
    C.add_output_args(p)
    return p


def run_row(name: str, args: argparse.Namespace, engine: list[str], cache_dir: str,
            out_dir: str, base: Optional[dict] = None) -> dict:
    """Row `name`'s run and its figures (with `base`, its baseline row's result)."""
    row = ROWS[name]
    out = os.path.join(out_dir, f"{name}.json")
    cmd = [sys.executable, os.path.join(BENCH, f"{row.script}.py"),
           *(row.quick if args.quick else row.workload), "--output-json", out]
    model = (("--model", args.spec_model), ("--grow-to", args.model)) if (
        name == "spec" and args.spec_model) else (("--model", args.model),
                                                  ("--load-format", args.load_format))
    cmd += [f for k, v in (*model, ("--dtype", args.dtype)) if v is not None for f in (k, v)]
    if row.takes_engine_flags:
        cmd += (QUICK_ENGINE if args.quick else []) + list(row.flags) + engine  # the user's win
    if row.takes_engine_flags and row.script != "startup":  # startup times a cold start
        cmd += ["--compilation-cache-dir", cache_dir]
    C.log(f"row {name}: {' '.join(cmd[1:])}")
    if os.path.exists(out):  # a reused --work-dir's earlier result
        os.remove(out)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=args.timeout)
    if proc.returncode or not os.path.exists(out):
        return {"error": f"exit {proc.returncode} (its stderr is above)"}
    with open(out) as f:
        result = json.load(f)
    if row.baseline is None:
        return {"result": result, "figures": row.figures(result), "met": row.met(result)}
    if base is None:
        return {"result": result, "error": f"its baseline row {row.baseline} failed"}
    return {"result": result, "figures": row.figures(result, base), "met": row.met(result, base)}


def run(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    engine: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, engine = argv[:i], argv[i + 1:]
    args = add_args(argparse.ArgumentParser(description=__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter)
                    ).parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are {list(ROWS)}")
    for i, name in enumerate(names):
        if ROWS[name].baseline is not None and ROWS[name].baseline not in names[:i]:
            raise SystemExit(f"row {name} compares with row {ROWS[name].baseline}: name that row "
                             "before it in --rows")
    results = {}
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="jaxvllm-rows-"))
        os.makedirs(work, exist_ok=True)
        for name in names:
            base = results.get(ROWS[name].baseline or "", {}).get("result")
            results[name] = run_row(name, args, engine, os.path.join(work, "jax"), work, base)
    table = []
    for name in names:
        res = results[name]
        figures = ("; ".join(f"{label} {C.fmt(v)}" for label, v in res["figures"])
                   if "figures" in res else res["error"])
        table.append([name, figures, ROWS[name].target,
                      "yes" if res.get("met") else "no" if "met" in res else "-"])
    doc = {"benchmark": "target_rows", "model": args.model, "quick": args.quick,
           "engine_flags": engine, "rows": results}
    C.emit(doc, args, C.table(table, ["row", "figures", "target", "met"]))
    return 0 if all("met" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(run())
