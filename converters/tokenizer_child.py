"""A tokenizer loaded in a child process and handed back pickled, for a process that has not imported
transformers' AutoTokenizer yet (the engine's start-up).

AutoTokenizer's imports pull in torch, and through it sympy, torch._dynamo and sklearn: 16 s of Python
on the GPU host, under the GIL, so on a thread beside the start-up's tracing and lowering it slowed
those too (a 25 s thread, a 29 s warm start). A child does that work on another core; the parent only
unpickles the tokenizer, which imports the tokenizer's own class (transformers' light part, no torch:
0.6 s on a CPU host for the default model's).

    pending = start_tokenizer_load(source, tokenizer=None, load_format="auto")   # spawns now
    tok = pending.result()    # the tokenizer load_model_tokenizer(...) returns, or None
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from typing import Any, Optional

from converters.errors import WeightLoadError

logger = logging.getLogger(__name__)

# A process that imported this already loads in-process: nothing left to save.
_HEAVY_MODULE = "transformers.models.auto.tokenization_auto"


class PendingTokenizer:
    def __init__(self, source: Any, tokenizer: Optional[str], load_format: str) -> None:
        self._request = (source, tokenizer, load_format)
        self._proc: Optional[subprocess.Popen] = None
        self._cancelled = False
        if _HEAVY_MODULE in sys.modules:
            return
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=env)
            self._proc.stdin.write(pickle.dumps(self._request))
            self._proc.stdin.close()
        except (OSError, pickle.PicklingError) as e:
            logger.warning("tokenizer: cannot start a loader process (%s); loading in this one", e)
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None

    def cancel(self) -> None:
        """Stop the loader process (the engine failed to start); `result()` then returns None."""
        self._cancelled = True
        proc = self._proc
        if proc is not None:
            proc.kill()
            proc.wait()

    def result(self) -> Any:
        """The tokenizer (or None); raises WeightLoadError as `load_model_tokenizer` does."""
        from converters import load_model_tokenizer

        proc = self._proc  # left in place while waiting, so that cancel() can still kill it
        if self._cancelled:
            return None
        if proc is not None:
            out = proc.stdout.read()
            code = proc.wait()
            proc.stdout.close()
            self._proc = None
            if self._cancelled:
                return None
            try:
                status, value = pickle.loads(out) if code == 0 else ("crashed", f"exit code {code}")
            except Exception as e:  # noqa: BLE001 (an unpicklable class: load it here instead)
                status, value = "crashed", f"{type(e).__name__}: {e}"
            if status == "ok":
                return value
            if status == "error":
                raise WeightLoadError(value)
            logger.warning("tokenizer: the loader process failed (%s); loading in this one", value)
        source, tokenizer, load_format = self._request
        return load_model_tokenizer(source, tokenizer=tokenizer, load_format=load_format)


def start_tokenizer_load(source: Any = None, *, tokenizer: Optional[str] = None,
                         load_format: str = "auto") -> PendingTokenizer:
    """Start loading what `load_model_tokenizer(source, tokenizer=..., load_format=...)` returns."""
    return PendingTokenizer(source, tokenizer, load_format)


def _child() -> None:
    # Only the pickled result goes to the real stdout; anything printed while loading goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    source, tokenizer, load_format = pickle.load(sys.stdin.buffer)
    from converters import load_model_tokenizer

    try:
        result: tuple = ("ok", load_model_tokenizer(source, tokenizer=tokenizer, load_format=load_format))
    except WeightLoadError as e:
        result = ("error", str(e))
    except Exception as e:  # noqa: BLE001 (the parent loads in-process and raises the real error)
        result = ("crashed", f"{type(e).__name__}: {e}")
    try:
        data = pickle.dumps(result)
    except Exception as e:  # noqa: BLE001
        data = pickle.dumps(("crashed", f"cannot pickle the tokenizer ({type(e).__name__}: {e})"))
    out.write(data)
    out.close()


if __name__ == "__main__":
    _child()
