"""`jaxvllm generate PROMPT`: one completion (or a chat reply with --chat), printed to stdout."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxvllm.config import EngineArgs

if TYPE_CHECKING:
    from jaxvllm import LLM, SamplingParams

# Sampling flag -> SamplingParams field. A flag left out (None) keeps the model's default, as
# LLM.generate without sampling_params does.
_SAMPLING_FLAGS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "sampling_seed": "seed"}
_DEFAULT = "Default: the model's generation_config.json, else vLLM's default"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="The prompt text.")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt in the chat template.")
    parser.add_argument("--max-tokens", type=int, default=None, help=f"{_DEFAULT} (16).")
    parser.add_argument("--temperature", type=float, default=None, help=f"0 is greedy. {_DEFAULT} (1.0).")
    parser.add_argument("--top-p", type=float, default=None, help=f"{_DEFAULT} (1.0).")
    parser.add_argument("--top-k", type=int, default=None, help=f"0 is all tokens. {_DEFAULT} (0).")
    parser.add_argument("--sampling-seed", type=int, default=None)
    EngineArgs.add_cli_args(parser)
    # One prompt runs one or two token buckets: compiling every bucket first (the server's
    # warm-up, so that no request waits on a compile) tripled a cold first run on a CPU.
    parser.set_defaults(enforce_eager=True)


def sampling_params(llm: LLM, args: argparse.Namespace) -> SamplingParams:
    """The model's default sampling params with the sampling flags that were given laid over them."""
    from jaxvllm import SamplingParams
    given = {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items()
             if getattr(args, flag) is not None}
    # Built from the defaults' keywords rather than by replacing fields of
    # llm.get_default_sampling_params(): a greedy default has dropped the model's top_p/top_k
    # there, which a given --temperature needs back.
    return SamplingParams(**{**llm.llm_engine.default_sampling, **given})


def run(args: argparse.Namespace) -> int:
    from jaxvllm import LLM
    engine_kwargs = {k: v for k, v in vars(args).items() if k in EngineArgs.field_names()}
    if engine_kwargs["node_rank"] > 0:  # multi-host: rank 0 generates and prints
        from jaxvllm.engine.multihost import run_follower
        return run_follower(EngineArgs(**engine_kwargs))
    llm = LLM(**engine_kwargs)
    sp = sampling_params(llm, args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], sp, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, sp, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
