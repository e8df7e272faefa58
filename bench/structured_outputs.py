"""What structured outputs cost a decode step: the same batch greedy with every request JSON-schema
constrained and without, time per output token (median over requests) both ways.

    PYTHONPATH=. python3 bench/structured_outputs.py --model bench/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16 --tokenizer DIR [--batch-sizes 64 256]

The schema asks for an object with one string of at least 100k characters, so no request can
complete it and each runs to --output-len (the mask of a JSON string's inside allows most of the
vocabulary: the expensive case for the grammar library). The model needs a real tokenizer (JSON
needs its characters); a smaller one than the model's vocabulary is fine (ids past it are masked).
Also prints the host time spent filling masks per step (it overlaps the step's forward pass).
"""
from __future__ import annotations

import argparse
import statistics
import time

import common

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100000}},
          "required": ["text"]}


def run_batch(llm, prompts: list, output_len: int, constrained: bool) -> dict:
    from jaxvllm import SamplingParams, StructuredOutputsParams
    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                        structured_outputs=StructuredOutputsParams(json=SCHEMA) if constrained
                        else None)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tpot = [(o.metrics["finished_time"] - o.metrics["first_token_time"])
            / max(len(o.outputs[0].token_ids) - 1, 1) * 1e3 for o in outs]
    return {"tpot_ms": statistics.median(tpot), "wall_s": wall,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs})}


def run(args: argparse.Namespace) -> int:
    from jaxvllm.core.scheduler import Scheduler
    llm = common.build_llm(args)
    vocab = llm.llm_engine.model_config.vocab_size
    fill = {"seconds": 0.0, "calls": 0}
    inner = Scheduler.grammar_bitmask

    def timed(self, scheduler_output):  # the scheduler's mask filling, timed
        t = time.perf_counter()
        masks = inner(self, scheduler_output)
        fill["seconds"] += time.perf_counter() - t
        fill["calls"] += 1
        return masks

    Scheduler.grammar_bitmask = timed
    rows, result = [], {}
    for b in args.batch_sizes:
        reqs = common.make_requests(b, common.LenSpec(args.input_len, args.input_len),
                                    common.LenSpec(args.output_len, args.output_len), vocab, b)
        prompts = [r.prompt_token_ids for r in reqs]
        run_batch(llm, prompts[:8], 8, True)  # the grammar library's tokenizer, the matchers
        base = run_batch(llm, prompts, args.output_len, False)
        fill.update(seconds=0.0, calls=0)
        con = run_batch(llm, prompts, args.output_len, True)
        fill_ms = fill["seconds"] / max(fill["calls"], 1) * 1e3
        result[b] = {"unconstrained": base, "constrained": con, "mask_fill_ms_per_step": fill_ms}
        rows.append([b, base["tpot_ms"], con["tpot_ms"],
                     f"{(con['tpot_ms'] / base['tpot_ms'] - 1) * 100:+.1f}%", fill_ms,
                     ",".join(con["finish_reasons"])])
    common.emit(result, args, common.table(
        rows, ["batch", "TPOT ms, unconstrained", "TPOT ms, JSON schema", "overhead",
               "mask fill ms / step (host)", "finish"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    from jaxvllm.config import EngineArgs
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    common.add_output_args(parser)
    EngineArgs.add_cli_args(parser.add_argument_group("engine (EngineArgs)"))


if __name__ == "__main__":
    raise SystemExit(common.script_main("structured_outputs", __doc__, add_args, run))
