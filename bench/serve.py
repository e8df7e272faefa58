"""Thin wrapper: `python bench/serve.py ...` == `jaxvllm bench serve ...` (code in jaxvllm/benchmarks/serve.py)."""
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
from jaxvllm.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main())
