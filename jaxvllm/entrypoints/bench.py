"""`jaxvllm bench {throughput,latency,serve,startup} ...`: the engine benchmarks (jaxvllm/benchmarks/).
`python bench/<name>.py ...` runs the same code with the same flags."""
from __future__ import annotations

import argparse
import importlib

from jaxvllm.benchmarks import BENCHMARKS


def _module(name: str):
    return importlib.import_module(f"jaxvllm.benchmarks.{name}")


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="bench_name", metavar="{" + ",".join(BENCHMARKS) + "}")
    for name in BENCHMARKS:
        mod = _module(name)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
    parser.set_defaults(_bench_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "bench_name", None):
        args._bench_parser.print_help()
        return 2
    return _module(args.bench_name).run(args) or 0
