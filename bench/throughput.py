"""Thin wrapper: `python bench/throughput.py ...` == `jaxvllm bench throughput ...` (code in jaxvllm/benchmarks/throughput.py)."""
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks.throughput import main

if __name__ == "__main__":
    sys.exit(main())
