"""Speculative decoding at batch 1, by prompt lookup or with a draft model (--draft-model): output
tok/s and TPOT with and without it, the guesses kept per verification step, and whether greedy
output is the same token for token.

    PYTHONPATH=. python3 bench/spec_decode.py [--model M] [--dtype bfloat16] [--k 2 4 6]
        [--draft-model D] [--grow-to CONFIG_DIR] [--batch-invariant]

Each configuration runs in a process of its own (one engine's device memory at a time); the table
compares them. The tasks ask the model to reproduce a given text with a small change (rename a
variable in code, fix words in a paragraph, convert a list), where most of the output is in the
prompt, which is what prompt lookup guesses from. With --load-format dummy (random weights, e.g.
--model bench/configs/llama-3-8b) the prompts are token ids that repeat a random phrase: what it
measures is the cost of a verification step at that shape, its acceptance says nothing (a dummy
draft guesses nothing either: e.g. --draft-model bench/configs/llama-3.2-1b measures what a step
with the 1B draft's forward and k guesses costs the 8B shape). With --grow-to (e.g.
bench/configs/llama-3-8b) a real small model runs grown to that shape (bench/grow.py): its own
outputs and acceptance, at the larger shape's cost.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common  # puts the repository root on sys.path

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result


def exponential_average(values, alpha):
    """Exponentially weighted average of the values, newest weighted by alpha."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    result = []
    current = None
    for value in values:
        current = value if current is None else alpha * value + (1 - alpha) * current
        result.append(current)
    return result
'''

TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion, the members agreed to increase spending on public libraries by ten percent, "
        "to repair the roof of the town hall before winter, and to postpone the new parking "
        "garage until the traffic study is finished. The treasurer warned that the reserve fund "
        "is lower than it was last year and asked the committee to review the figures again in "
        "March. The meeting ended at nine in the evening, and the minutes will be published on "
        "the town website next week.")

TASKS = [
    f"Rename the variable `values` to `samples` everywhere in this code. Reply with the whole "
    f"code only.\n\n```python\n{CODE}```",
    f"Rewrite this text with every number written in digits. Reply with the text only.\n\n{TEXT}",
    f"Add type hints to every function in this code. Reply with the whole code only.\n\n"
    f"```python\n{CODE}```",
    f"Repeat the following text word for word, then add one sentence that summarizes it.\n\n{TEXT}",
]


def run_one(args: argparse.Namespace, k: int, out_path: str) -> None:
    """k guesses at most per step; 0: plain decoding, -1: plain without async scheduling (what a
    step that verifies guesses costs on the host)."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.worker import compile_watch
    spec = None if k <= 0 else (
        {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": k}
        if args.draft_model else
        {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.prompt_lookup_max,
         "prompt_lookup_min": args.prompt_lookup_min})
    engine = dict(max_model_len=args.max_model_len, max_num_seqs=8, max_num_batched_tokens=1024,
                  enforce_eager=True, speculative_config=spec, disable_log_stats=True,
                  async_scheduling=k >= 0, batch_invariant=args.batch_invariant)
    if args.grow_to:
        import jax.numpy as jnp
        from converters import load_model
        from grow import grow
        small = load_model(args.model, dtype="float32", load_format=args.load_format)
        with open(os.path.join(args.grow_to, "config.json")) as f:
            params, config = grow(small.params, small.config, json.load(f),
                                  jnp.dtype("bfloat16" if args.dtype == "auto" else args.dtype))
        llm = LLM.from_params(params, config, tokenizer=small.tokenizer,
                              generation_config=small.generation_config, **engine)
    else:
        llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype, **engine)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                        ignore_eos=args.load_format == "dummy")
    if args.load_format == "dummy":
        import numpy as np
        rng = np.random.default_rng(0)
        vocab = llm.llm_engine.model_config.vocab_size
        prompts = [{"prompt_token_ids": (rng.integers(3, vocab, 40).tolist() * 10)[:300]}
                   for _ in TASKS]
        run = lambda p, sp=sp: llm.generate([p], sp, use_tqdm=False)[0]  # noqa: E731
    else:
        prompts = TASKS
        run = lambda p, sp=sp: llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)[0]  # noqa: E731
    for p in prompts * 2:  # compiles what they need, the second time from the prefix cache
        run(p)
    # Plain decoding's top two logprobs at each token (an untimed pass): where a speculative run's
    # greedy output differs, the gap between them says whether rounding decided a near tie.
    top2 = dataclasses.replace(sp, logprobs=2)
    gaps = [[lp[0] - lp[1] for lp in (sorted((x.logprob for x in pos.values()), reverse=True)
                                      for pos in run(p, top2).outputs[0].logprobs)]
            for p in prompts] if k <= 0 else None
    phases = common.time_engine_phases(llm.llm_engine) if args.phases else None
    before = llm.llm_engine.get_stats().spec_decode
    mark = compile_watch.mark()
    rows = []
    t0 = time.perf_counter()
    for p in prompts:
        o = run(p)
        m, n = o.metrics, len(o.outputs[0].token_ids)
        rows.append({"tokens": o.outputs[0].token_ids, "n": n,
                     "decode_s": m["finished_time"] - m["first_token_time"]})
    wall = time.perf_counter() - t0
    compiled = compile_watch.since(mark)
    after = llm.llm_engine.get_stats().spec_decode
    drafts = after.num_drafts - before.num_drafts
    res = {"k": k, "wall_s": wall, "out_tokens": sum(r["n"] for r in rows),
           "tpot_ms": statistics.median(r["decode_s"] / max(r["n"] - 1, 1) * 1e3 for r in rows),
           "decode_tok_s": sum(r["n"] - 1 for r in rows) / sum(r["decode_s"] for r in rows),
           "guesses": after.num_draft_tokens - before.num_draft_tokens,
           "kept": after.num_accepted_tokens - before.num_accepted_tokens, "verify_steps": drafts,
           "tokens": [r["tokens"] for r in rows], "gaps": gaps,
           "batch_invariant": llm.llm_engine.runner.cfg.batch_invariant,
           "compiled_while_timed": compiled,
           "sample": llm.get_tokenizer().decode(rows[0]["tokens"][:60])
           if args.load_format != "dummy" else None,
           "phases_ms": None if phases is None else {
               name: 1e3 * t / max(phases["step"][1], 1) for name, (t, _) in phases.items()}}
    with open(out_path, "w") as f:
        json.dump(res, f)


def _differences(plain: dict, run: dict) -> str:
    """Where each prompt's output first differs from plain decoding's, with plain decoding's gap
    between its two likeliest tokens there."""
    out = []
    for i, (a, b) in enumerate(zip(plain["tokens"], run["tokens"])):
        j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if j < max(len(a), len(b)):
            gap = plain["gaps"][i][j] if j < len(plain["gaps"][i]) else float("nan")
            out.append(f"{i}, {j}, {gap:.3f}")
    return "; ".join(out) or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=384)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6],
                   help="num_speculative_tokens values to compare with plain decoding")
    p.add_argument("--sync-baseline", action="store_true",
                   help="Also plain decoding without async scheduling, as verification steps run.")
    p.add_argument("--draft-model", default=None,
                   help="Guess with this draft model (method draft_model) instead of prompt lookup.")
    p.add_argument("--grow-to", default=None, metavar="CONFIG_DIR",
                   help="Run the model grown to this config's shape, computing the same function "
                        "(bench/grow.py): the small model's outputs at the larger shape's cost.")
    p.add_argument("--batch-invariant", action="store_true",
                   help="Every engine in batch-invariant mode: a verification step computes each "
                        "row as a one-row step does, so greedy output is the same token for token "
                        "(without it, bf16 rounding that differs with the rows can flip a near "
                        "tie).")
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--phases", action="store_true",
                   help="Also time the engine's calls per step (schedule, dispatch, collect and its "
                        "wait for the device, update, outputs).")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-json", default=None, metavar="PATH", help="Also write the results here.")
    args = p.parse_args()
    if args.one is not None:
        return run_one(args, args.one, args.out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [0, *([-1] if args.sync_baseline else []), *args.k]:
            out = os.path.join(tmp, f"{k}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(k), "--out", out]
            for flag in ("model", "load_format", "dtype", "max_model_len", "output_len",
                         "prompt_lookup_max", "prompt_lookup_min", "draft_model", "grow_to"):
                if getattr(args, flag) is not None:
                    cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
            cmd += ["--phases"] * args.phases + ["--batch-invariant"] * args.batch_invariant
            subprocess.run(cmd, check=True)
            with open(out) as f:
                results.append(json.load(f))
    plain = results[0]
    grown = (f" grown to {args.grow_to}" if args.grow_to else "") + (
        ", batch-invariant" if args.batch_invariant else "")
    print(f"model {args.model or 'default'}{grown} ({args.load_format}, {args.dtype}), batch 1, "
          f"{len(TASKS)} prompts, greedy, up to {args.output_len} tokens each; guesses from "
          f"{args.draft_model or 'prompt lookup'}")
    print("| k | decode tok/s | TPOT ms | speed-up | guesses kept | tokens per step | same output |"
          " first differences: prompt, token, plain's top-2 logprob gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        kept = f"{r['kept']}/{r['guesses']} ({r['kept'] / r['guesses']:.0%})" if r["guesses"] else "-"
        per_step = f"{1 + r['kept'] / r['verify_steps']:.2f}" if r["verify_steps"] else "1"
        name = {0: "off", -1: "off, synchronous"}.get(r["k"], r["k"])
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['tpot_ms']:.2f} | "
              f"{r['decode_tok_s'] / plain['decode_tok_s']:.2f}x | {kept} | {per_step} | "
              f"{r['tokens'] == plain['tokens']} | {_differences(plain, r)} |")
    for r in results:
        if r["compiled_while_timed"]:
            print(f"k {r['k']}: programs compiled while timed: {r['compiled_while_timed']}")
    if args.phases:
        print("ms per engine step (collect includes fetch; step includes the rest):")
        for r in results:
            print(f"  k {r['k']}: " + ", ".join(f"{n} {v:.2f}" for n, v in r["phases_ms"].items()))
    if plain["sample"]:
        print("first output begins:", json.dumps(plain["sample"]))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([{**{k: v for k, v in r.items() if k not in ("tokens", "gaps")},
                        "same_output": r["tokens"] == plain["tokens"]} for r in results], f,
                      indent=1)


if __name__ == "__main__":
    main()
