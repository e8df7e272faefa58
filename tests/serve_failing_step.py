"""`jaxvllm serve` whose engine step raises once it has run N steps: `python serve_failing_step.py N
SERVE_ARGS...`. The fault is injected here, by patching, so that the server code has no test hook."""
from __future__ import annotations

import sys

from jaxvllm.engine.llm_engine import LLMEngine
from jaxvllm.entrypoints.openai import api_server


def main() -> int:
    limit = int(sys.argv[1])
    step = LLMEngine.step
    calls = 0

    def failing_step(self):
        nonlocal calls
        calls += 1
        if calls > limit:
            raise RuntimeError(f"injected step failure (step {calls})")
        return step(self)

    LLMEngine.step = failing_step
    return api_server.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
