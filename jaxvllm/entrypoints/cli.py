"""`jaxvllm` console script: serve | generate | bench. Each subcommand module registers its own flags."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

# subcommand -> module exposing `add_args(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "serve": ("jaxvllm.entrypoints.openai.api_server", "Start the OpenAI-compatible HTTP server."),
    "generate": ("jaxvllm.entrypoints.generate", "Generate a completion for a prompt and print it."),
    "bench": ("jaxvllm.entrypoints.bench", "Run a benchmark (throughput | latency | serve | startup)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvllm", description="LLM inference and serving on JAX.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_args(p)
        except ImportError as e:  # a subcommand whose optional parts are missing stays listed
            p.set_defaults(_import_error=str(e))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_import_error", None):
        parser.error(f"{args.command} is unavailable: {args._import_error}")
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
