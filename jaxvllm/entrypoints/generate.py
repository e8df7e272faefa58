"""`jaxvllm generate PROMPT`: one completion (or a chat reply with --chat), printed to stdout."""
from __future__ import annotations

import argparse

from jaxvllm.config import EngineArgs


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="The prompt text.")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt in the chat template.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None)
    EngineArgs.add_cli_args(parser)


def run(args: argparse.Namespace) -> int:
    from jaxvllm import LLM, SamplingParams
    engine_kwargs = {k: v for k, v in vars(args).items() if k in EngineArgs.field_names()}
    llm = LLM(**engine_kwargs)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.sampling_seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], sp, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, sp, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
