"""A tokenizer loaded in a child process and handed back pickled, for a process that has not imported
transformers' AutoTokenizer yet (the engine's start-up), and a cache of those pickles.

AutoTokenizer's imports pull in torch, and through it sympy, torch._dynamo and sklearn: 16 s of Python
on the GPU host, under the GIL, so on a thread beside the start-up's tracing and lowering it slowed
those too (a 25 s thread, a 29 s warm start). A child does that work on another core; the parent only
unpickles the tokenizer, which imports the tokenizer's own class (transformers' light part, no torch:
0.6 s on a CPU host for the default model's; transformers 5.17's fast-tokenizer module still imported
torch, 4.5 s on the GPU host: hence the floor of 5.18). The child still took 21-25 s on the GPU host, the
longest path of a warm start, so the pickle is also kept in a cache directory (the engine's: beside
the converted weights): a later start with the same tokenizer files and the same transformers and
tokenizers versions unpickles it and starts no child. Like JAX's compilation cache, which holds
executables, the cache directory is trusted: it must be the user's own.

    pending = PendingTokenizer(source, tokenizer=None, load_format="auto", cache_dir=None)  # starts now
    tok = pending.result()    # the tokenizer load_model_tokenizer(...) returns, or None
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
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
_CACHE_FORMAT = 1
# Files in a model directory up to this size are keyed (tokenizer files, configs); larger ones are
# weights, which do not change the tokenizer.
_MAX_KEYED_FILE = 64 << 20


def cache_key(source: Any, tokenizer: Optional[str], load_format: str) -> Optional[str]:
    """The tokenizer cache key: the tokenizer's source files (name, size, mtime), the transformers
    and tokenizers versions and Python's; None where the tokenizer is not read from local files."""
    from converters import _canonical_load_format, resolve_source

    if tokenizer is not None:
        path = os.path.abspath(os.path.expanduser(tokenizer))
        if not os.path.exists(path):
            return None  # a hub id
    else:
        res = resolve_source(source, _canonical_load_format(load_format))
        if res.kind not in ("hf", "gguf"):
            return None
        path = res.path
    if os.path.isdir(path):
        named = [(f, os.path.join(path, f)) for f in sorted(os.listdir(path))]
        named = [(f, q) for f, q in named if os.path.isfile(q) and os.path.getsize(q) <= _MAX_KEYED_FILE]
    else:
        named = [(path, path)]
    files = [(f, st.st_size, st.st_mtime_ns) for f, q in named for st in [os.stat(q)]]
    versions = [importlib.metadata.version(p) for p in ("transformers", "tokenizers")]
    material = [_CACHE_FORMAT, path, files, versions, list(sys.version_info[:2])]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


class PendingTokenizer:
    """What `load_model_tokenizer(source, tokenizer=..., load_format=...)` returns, loading from
    now on; with `cache_dir`, from (and into) the tokenizer cache there."""

    def __init__(self, source: Any = None, *, tokenizer: Optional[str] = None,
                 load_format: str = "auto", cache_dir: Optional[str] = None) -> None:
        self._request = (source, tokenizer, load_format)
        self._proc: Optional[subprocess.Popen] = None
        self._cancelled = False
        self.origin = ""  # after result(): "cache", "child process" or "this process"
        self._cache_file: Optional[str] = None
        if cache_dir is not None:
            try:
                key = cache_key(source, tokenizer, load_format)
            except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
                key = None  # a bad source: the load below reports it
            if key is not None:
                self._cache_file = os.path.join(cache_dir, key + ".pkl")
                if os.path.isfile(self._cache_file):
                    return
        if _HEAVY_MODULE in sys.modules:
            return
        # The package root goes first on the child's path, ahead of its working directory, which
        # may hold another `converters`.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from {__name__} import _child; _child()"
        try:
            request = pickle.dumps(self._request)
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
            self._proc.stdin.write(request)
            self._proc.stdin.close()
        except Exception as e:  # noqa: BLE001 (e.g. an unpicklable source: load in-process)
            logger.warning("tokenizer: cannot start a loader process (%s); loading in this one", e)
            self._stop()
            self._proc = None

    def cancel(self) -> None:
        """Stop the loader process (the engine failed to start); `result()` then returns None."""
        self._cancelled = True
        self._stop()

    def _stop(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()  # safe beside a reader in result(): it takes the reader's lock

    def result(self) -> Any:
        """The tokenizer (or None); raises WeightLoadError as `load_model_tokenizer` does."""
        from converters import load_model_tokenizer

        proc = self._proc  # left in place while waiting, so that cancel() can still kill it
        if self._cancelled:
            return None
        if proc is None and self._cache_file is not None and os.path.isfile(self._cache_file):
            try:
                with open(self._cache_file, "rb") as f:
                    status, value = pickle.load(f)
                if status == "ok":
                    self.origin = "cache"
                    return value
            except Exception as e:  # noqa: BLE001 (a garbled or stale entry: load and rewrite it)
                logger.warning("tokenizer cache: %s unreadable (%s); loading the tokenizer",
                               self._cache_file, e)
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
                self._store(out)
                self.origin = "child process"
                return value
            if status == "error":
                raise WeightLoadError(value)
            logger.warning("tokenizer: the loader process failed (%s); loading in this one", value)
        source, tokenizer, load_format = self._request
        tok = load_model_tokenizer(source, tokenizer=tokenizer, load_format=load_format)
        self.origin = "this process"
        if self._cache_file is not None:
            try:
                self._store(pickle.dumps(("ok", tok)))
            except Exception as e:  # noqa: BLE001 (not picklable: nothing to cache)
                logger.debug("tokenizer cache: not stored (%s)", e)
        return tok

    def _store(self, data: bytes) -> None:
        """Write a cache entry whole or not at all (a temporary file renamed into place)."""
        if self._cache_file is None:
            return
        tmp = f"{self._cache_file}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self._cache_file), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._cache_file)
        except OSError as e:
            logger.warning("tokenizer cache: cannot write %s (%s)", self._cache_file, e)


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
