"""What structured outputs cost a decode step: the same batch greedy with every request JSON-schema
constrained and without, time per output token (median over requests) both ways.

    PYTHONPATH=. python3 bench/structured_outputs.py --model bench/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16 --tokenizer DIR [--batch-sizes 64 256]

The schema asks for an object with one string of at least 100k characters, so no request can
complete it and each runs to --output-len (the mask of a JSON string's inside allows most of the
vocabulary: the expensive case for the grammar library). The model needs a real tokenizer (JSON
needs its characters); a smaller one than the model's vocabulary is fine (ids past it are masked).
Also prints host time per step: filling the masks (it overlaps the step's forward pass), advancing
the matchers (in update_from_output), and the engine's wait for the device (near zero when the host
is the bottleneck).
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


class HostProfile:
    """Host time per engine step in the methods that structured outputs add work to: filling the
    masks, advancing the matchers (update_from_output), and the engine's wait for the device's
    samples (collect; near zero when the host is the bottleneck)."""
    METHODS = {"mask_fill": ("jaxvllm.core.scheduler", "Scheduler", "grammar_bitmask"),
               "update": ("jaxvllm.core.scheduler", "Scheduler", "update_from_output"),
               "device_wait": ("jaxvllm.worker.model_runner", "ModelRunner", "collect"),
               "steps": ("jaxvllm.engine.llm_engine", "LLMEngine", "step")}

    def __init__(self) -> None:
        import importlib
        self.seconds = dict.fromkeys(self.METHODS, 0.0)
        self.calls = dict.fromkeys(self.METHODS, 0)
        for key, (module, cls, name) in self.METHODS.items():
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, name, self._timed(key, getattr(owner, name)))

    def _timed(self, key: str, inner):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[key] += time.perf_counter() - t
                self.calls[key] += 1
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.METHODS, 0.0)
        self.calls = dict.fromkeys(self.METHODS, 0)

    def per_step_ms(self) -> dict:
        steps = max(self.calls["steps"], 1)
        out = {k: self.seconds[k] / steps * 1e3 for k in ("update", "device_wait")}
        out["mask_fill"] = self.seconds["mask_fill"] / max(self.calls["mask_fill"], 1) * 1e3
        return out


def run(args: argparse.Namespace) -> int:
    llm = common.build_llm(args)
    vocab = llm.llm_engine.model_config.vocab_size
    profile = HostProfile()
    rows, result = [], {}
    for b in args.batch_sizes:
        reqs = common.make_requests(b, common.LenSpec(args.input_len, args.input_len),
                                    common.LenSpec(args.output_len, args.output_len), vocab, b)
        prompts = [r.prompt_token_ids for r in reqs]
        run_batch(llm, prompts[:8], 8, True)  # the grammar library's tokenizer, the matchers
        profile.reset()
        base = run_batch(llm, prompts, args.output_len, False)
        base["host_ms_per_step"] = profile.per_step_ms()
        profile.reset()
        con = run_batch(llm, prompts, args.output_len, True)
        con["host_ms_per_step"] = hp = profile.per_step_ms()
        result[b] = {"unconstrained": base, "constrained": con}
        rows.append([b, base["tpot_ms"], con["tpot_ms"],
                     f"{(con['tpot_ms'] / base['tpot_ms'] - 1) * 100:+.1f}%", hp["mask_fill"],
                     hp["update"], f"{hp['device_wait']:.2f} / "
                     f"{base['host_ms_per_step']['device_wait']:.2f}",
                     ",".join(con["finish_reasons"])])
    common.emit(result, args, common.table(
        rows, ["batch", "TPOT ms, unconstrained", "TPOT ms, JSON schema", "overhead",
               "mask fill ms", "update_from_output ms / step",
               "device wait ms / step (constrained / not)", "finish"]))
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
