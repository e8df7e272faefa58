"""Engine benchmarks: `jaxvllm bench {throughput,latency,serve,startup}` (also `python bench/<name>.py`).

Each module exposes `add_args(parser)`, `run(args) -> int` and `main(argv) -> int`; none imports JAX
or torch at import time, so `--help` is instant and the HF backend never starts JAX.
"""
BENCHMARKS = ("throughput", "latency", "serve", "startup")
