"""A cache of converted params (orbax-checkpoint), so a second load of the same source skips conversion.

Location: `$XDG_CACHE_HOME/jaxvllm/weights` (default `~/.cache/jaxvllm/weights`), or `cache_dir=`.
One entry per key, a directory `<root>/<key>/` holding `params/` (an orbax StandardCheckpointer checkpoint)
and `meta.json` (the key, the converter version, every leaf's path/shape/dtype and a float32 sum per leaf).

- key = sha256 of (resolved source path, each weight file's name + size + mtime, dtype, load format,
  converter version): editing or replacing a weight file, or asking for another dtype, misses.
- An entry is written to a temporary directory beside it and renamed into place when complete, so an
  interrupted write never looks like an entry. On load, a missing/garbled meta.json, an orbax restore
  error, a tree/shape/dtype mismatch or a checksum mismatch counts as corrupt: a warning names the entry
  and the exception, the entry is deleted and the caller converts again (and rewrites it).
- What is cached (measured on CPU: an orbax save writes ~60 MB/s, a restore reads ~140 MB/s, while
  reading safetensors is a plain copy and dequantizing the default 100 MB GGUF takes ~1 s, so small
  sources and safetensors gain nothing): by default only GGUF sources of at least 256 MiB. An explicit
  `cache_min_bytes=N` to `load_model` (or env JAXVLLM_WEIGHT_CACHE_MIN_BYTES=N) caches every format
  whose weight files total at least N bytes; `cache_min_bytes=0` caches everything (the tests use it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 4  # 2: an entry of 1 may hold a checkpoint whose FP8 KV-cache scales it dropped;
# 3: one of 2 may hold an FP8 checkpoint's linears dequantized (now kept in FP8, uncached);
# 4: one of 3 may hold a block-scaled FP8 checkpoint's linears dequantized (now requantized)
DEFAULT_GGUF_MIN_BYTES = 256 << 20
_META = "meta.json"
_PARAMS = "params"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    events: list = field(default_factory=list)


STATS = CacheStats()


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvllm", "weights")


def resolve_cache_dir(cache_dir: Any) -> Optional[str]:
    """None, "", "none", "off" -> disabled; "auto"/"default" -> the default root; else that path."""
    if cache_dir is None:
        return None
    s = os.fspath(cache_dir)
    if s.strip().lower() in ("", "none", "off", "false", "0"):
        return None
    if s.strip().lower() in ("auto", "default"):
        return default_cache_root()
    return os.path.abspath(os.path.expanduser(s))


def should_cache(load_format: str, total_bytes: int, min_bytes: Optional[int] = None) -> bool:
    """The size/format policy above. min_bytes=None: the env override, else GGUF >= 256 MiB only."""
    if min_bytes is None:
        v = os.environ.get("JAXVLLM_WEIGHT_CACHE_MIN_BYTES")
        try:
            min_bytes = int(v) if v is not None else None
        except ValueError:
            logger.warning("ignoring JAXVLLM_WEIGHT_CACHE_MIN_BYTES=%r (not an int)", v)
    if min_bytes is None:
        return load_format == "gguf" and total_bytes >= DEFAULT_GGUF_MIN_BYTES
    return total_bytes >= min_bytes


def cache_key(source_path: str, files: list[str], dtype: str, load_format: str) -> str:
    entries = []
    for f in sorted(files):
        st = os.stat(f)
        entries.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"source": os.path.abspath(source_path), "files": entries, "dtype": dtype,
                       "format": load_format, "version": CONVERTER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _leaves(params: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(jax.tree_util.keystr(p), x) for p, x in flat]


@jax.jit
def _sums(leaves: list) -> tuple[list, list]:
    xs = [x.astype(jnp.float32) for x in leaves]
    return [jnp.sum(x) for x in xs], [jnp.sum(jnp.abs(x)) for x in xs]


def _checksums(params: Any) -> tuple[list[float], list[float]]:
    sums, abs_sums = jax.device_get(_sums([x for _, x in _leaves(params)]))
    return [float(s) for s in sums], [float(a) for a in abs_sums]


def _close(a: float, b: float, scale: float) -> bool:
    if not all(math.isfinite(v) for v in (a, b, scale)):  # inf/nan weights: compare exactly
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= 1e-4 * (scale + 1.0)


class WeightCache:
    def __init__(self, root: str):
        self.root = root

    def entry(self, key: str) -> str:
        return os.path.join(self.root, key)

    def load(self, key: str, abstract: Any) -> Optional[Any]:
        """The cached params for `key` restored onto the default device, or None (miss or corrupt entry).
        `abstract`: the expected pytree of jax.ShapeDtypeStruct."""
        path = self.entry(key)
        if not os.path.isdir(path):
            STATS.misses += 1
            return None
        try:
            params = self._restore(path, key, abstract)
        except Exception as e:
            STATS.corrupt += 1
            STATS.misses += 1
            STATS.events.append(("corrupt", key, str(e)))
            # The exception's type names the cause even where its text is terse (a KeyError's is a key).
            logger.warning("Weight cache entry %s could not be restored (%s: %s); deleting it and "
                           "converting the weights again", path, type(e).__name__, e)
            try:
                shutil.rmtree(path)
            except OSError as rm_error:  # the entry stays: every load converts until it is removed
                logger.warning("Could not delete the weight cache entry %s (%s)", path, rm_error)
            return None
        STATS.hits += 1
        return params

    def _restore(self, path: str, key: str, abstract: Any) -> Any:
        import orbax.checkpoint as ocp

        with open(os.path.join(path, _META)) as f:
            meta = json.load(f)
        if meta.get("key") != key or meta.get("version") != CONVERTER_VERSION:
            raise ValueError("meta.json does not match the key")
        want = [[p, list(x.shape), str(np.dtype(x.dtype))] for p, x in _leaves(abstract)]
        if [m[:3] for m in meta["leaves"]] != want:
            raise ValueError("the cached tree differs from the expected layout")
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(path, _PARAMS), abstract)
        got = _leaves(params)
        if [[p, list(x.shape), str(np.dtype(x.dtype))] for p, x in got] != want:
            raise ValueError("restored tree differs from the expected layout")
        sums, abs_sums = _checksums(params)
        for (p, _), s, a, m in zip(got, sums, abs_sums, meta["leaves"]):
            if not (_close(s, m[3], m[4]) and _close(a, m[4], m[4])):
                raise ValueError(f"checksum mismatch in {p}")
        return params

    def save(self, key: str, params: Any, info: Optional[dict] = None) -> bool:
        """Write an entry (temp dir + rename). Failures are logged, never raised."""
        import orbax.checkpoint as ocp

        final = self.entry(key)
        tmp = os.path.join(self.root, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(self.root, exist_ok=True)
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, _PARAMS), params)
                ckptr.wait_until_finished()
            sums, abs_sums = _checksums(params)
            meta = {"key": key, "version": CONVERTER_VERSION, "info": info or {},
                    "leaves": [[p, list(x.shape), str(np.dtype(x.dtype)), s, a]
                               for (p, x), s, a in zip(_leaves(params), sums, abs_sums)]}
            with open(os.path.join(tmp, _META), "w") as f:
                json.dump(meta, f)
            if os.path.exists(final):  # another process wrote it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            os.rename(tmp, final)
        except Exception as e:
            logger.warning("Could not write the weight cache entry %s (%s)", final, e)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        STATS.writes += 1
        return True


def abstract_params(shapes: Any, dtype: str) -> Any:
    """jax.ShapeDtypeStruct pytree of the layout on the default device (`jax.default_device` if set)."""
    device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, str):  # a platform name
        device = jax.devices(device)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    dt = jnp.dtype(dtype)

    def is_shape(x: Any) -> bool:
        return isinstance(x, tuple) and all(isinstance(i, int) for i in x)

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), dt, sharding=sharding), shapes,
                        is_leaf=is_shape)
