"""Thin wrapper: `python bench/latency.py ...` == `jaxvllm bench latency ...` (code in jaxvllm/benchmarks/latency.py)."""
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks.latency import main

if __name__ == "__main__":
    sys.exit(main())
