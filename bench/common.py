"""Shared setup for the bench/*.py wrappers: makes the repository importable without installing it
and re-exports the benchmark helpers (jaxvllm/benchmarks/common.py)."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from jaxvllm.benchmarks.common import *  # noqa: E402,F401,F403
