"""The engine thread's own time per decode step at high batch, by phase: schedule, dispatch (the
batch build), collect less its wait for the device, update_from_output and output processing,
in ms per step and microseconds per request. The model is a one-layer toy of the real tokenizer's
vocabulary (the default model's, or --tokenizer), so the device's part of a step stays short, on
a CPU too: what is measured is the Python a step costs whatever model it runs.

    PYTHONPATH=. python3 bench/host_step.py [--rows 256 512 1024] [--steps 30]
        [--temperature 0] [--output-kind final|delta] [--stop STR] [--async-scheduling]

Every request has a 64-token prompt and decodes (ignore_eos) through the timed steps. Steps are
synchronous unless --async-scheduling: on a CPU the device's work runs on the same cores, and
overlapping it with the measured Python would measure their contention too.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import common  # puts the repository root on sys.path

PHASES = ("schedule", "dispatch", "collect_own", "update", "outputs")


def run_one(args: argparse.Namespace, rows: int) -> dict:
    import numpy as np

    from jaxvllm import LLM, SamplingParams
    from jaxvllm.default_model import default_model_path
    from jaxvllm.sampling_params import RequestOutputKind
    tokenizer = args.tokenizer or default_model_path()
    from converters import load_model_tokenizer
    vocab = len(load_model_tokenizer(tokenizer))
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
               hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
               num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        steps = args.warmup_steps + args.steps
        llm = LLM(d, load_format="dummy", tokenizer=tokenizer, dtype="float32",
                  max_model_len=64 + steps + 8, max_num_seqs=rows,
                  max_num_batched_tokens=max(2048, rows), disable_log_stats=True,
                  num_gpu_blocks_override=rows * (-(-(64 + steps + 8) // 16)) + 8,
                  weights_cache_dir="none", async_scheduling=args.async_scheduling)
    engine = llm.llm_engine
    kind = {"final": RequestOutputKind.FINAL_ONLY, "delta": RequestOutputKind.DELTA}[args.output_kind]
    sp = SamplingParams(temperature=args.temperature, max_tokens=steps + 4, ignore_eos=True,
                        output_kind=kind, stop=args.stop or None)
    rng = np.random.default_rng(0)
    for i in range(rows):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(100, vocab - 1, 64).tolist()},
                           sp)
    for _ in range(args.warmup_steps):  # prefill, then decoding with every bucket compiled
        engine.step()
    phases = common.time_engine_phases(engine)
    gc_before = [g["collections"] for g in gc.get_stats()]
    for _ in range(args.steps):
        engine.step()
    ms = {name: 1e3 * t / args.steps for name, (t, _) in phases.items()}
    ms["collect_own"] = ms["collect"] - ms["fetch"]
    ms["own"] = ms["step"] - ms["fetch"]
    # Python's cyclic garbage collector runs inside whichever phase allocates when a threshold is
    # crossed; a full collection walks every live object (a KV-cache block is one).
    t = time.perf_counter()
    gc.collect()
    full_ms = 1e3 * (time.perf_counter() - t)
    collections = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before)]
    return {"rows": rows, "ms": ms, "us_per_row": 1e3 * ms["own"] / rows,
            "gc_collections_per_step": [c / args.steps for c in collections],
            "gc_full_ms": full_ms, "gc_objects": len(gc.get_objects())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--output-kind", choices=("final", "delta"), default="final",
                   help="final: LLM.generate's (text decoded when a request finishes); delta: a "
                        "streaming server's (decoded every step)")
    p.add_argument("--stop", nargs="*", default=None, help="Stop strings (searched every step).")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-json", default=None, metavar="PATH", help="Also write the results here.")
    args = p.parse_args()
    if args.one is not None:
        with open(args.out, "w") as f:
            json.dump(run_one(args, args.one), f)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:  # each in a process of its own
            out = os.path.join(tmp, f"{rows}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(rows), "--out", out,
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--temperature", str(args.temperature), "--output-kind", args.output_kind]
            cmd += ["--tokenizer", args.tokenizer] * bool(args.tokenizer)
            cmd += ["--stop", *args.stop] if args.stop else []
            cmd += ["--async-scheduling"] * args.async_scheduling
            subprocess.run(cmd, check=True)
            with open(out) as f:
                results.append(json.load(f))
    print(f"engine thread's own time per decode step, {args.steps} steps, temperature "
          f"{args.temperature}, output {args.output_kind}, stop strings {args.stop or 'none'}, "
          f"{'async' if args.async_scheduling else 'synchronous'} steps")
    print("| rows | " + " | ".join(f"{n} ms" for n in PHASES) + " | own ms | us per row | "
          "GC gen0/1/2 per step | full GC ms | objects |")
    print("| --- " * (len(PHASES) + 6) + "|")
    for r in results:
        print(f"| {r['rows']} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in PHASES)
              + f" | {r['ms']['own']:.2f} | {r['us_per_row']:.1f} | "
              + "/".join(f"{c:.2f}" for c in r["gc_collections_per_step"])
              + f" | {r['gc_full_ms']:.1f} | {r['gc_objects']:,} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
