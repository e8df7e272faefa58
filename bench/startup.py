"""Thin wrapper: `python bench/startup.py ...` == `jaxvllm bench startup ...` (code in jaxvllm/benchmarks/startup.py)."""
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks.startup import main

if __name__ == "__main__":
    sys.exit(main())
