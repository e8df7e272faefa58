"""Compiled programs kept on disk between starts: a warm start loads each executable instead of
tracing and lowering it again.

JAX's persistent compilation cache keys an executable by its lowered module, so a start that finds
every program there still traces and lowers each one first: 23 s of a 35 s warm start at the 8B
shape on an H200 (276 programs, bench/RESULTS.md). Here a program is keyed by what it is made of
instead: the source of the packages that build it, the model's and the runner's configuration,
the shapes, dtypes and placement of the weights and the KV cache, the JAX and XLA versions and
flags, and the devices. A change to any of them is another fingerprint, and a program not stored
under the current one is lowered and compiled (through the persistent cache) as before. Where the
store keeps every program it builds (a GPU), those programs are not written to the persistent
cache as well (`_store_keeps_every_program`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import jax
from jax._src import config as jax_config

logger = logging.getLogger(__name__)

STORE_DIR = "jaxvllm-executables"  # under JAX's persistent compilation cache directory
KEEP = 8  # fingerprints kept; the least recently used beyond that are deleted
_PACKAGES = ("jaxvllm", "pallas_kernels")
# JAX settings that change what a traced program computes.
_JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
              "jax_threefry_partitionable", "jax_numpy_rank_promotion")


@functools.cache
def source_digest() -> str:
    """A digest of every Python file of the packages that trace the programs."""
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        root = os.path.dirname(os.path.abspath(__import__(pkg).__file__))
        for d, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()


def describe_arrays(tree: Any) -> str:
    """Structure, shapes, dtypes and placement of a pytree of arrays (for a fingerprint)."""
    leaves, treedef = jax.tree.flatten(tree)
    return repr((str(treedef), [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)),
                                 bool(getattr(x, "committed", False))) for x in leaves]))


def describe_function(fn: Any) -> str:
    """A function by name (a partial with its arguments), stable across processes."""
    if isinstance(fn, functools.partial):
        return (f"partial({describe_function(fn.func)}, {fn.args!r}, "
                f"{sorted(fn.keywords.items())!r})")
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


@functools.cache
def _host_cpu() -> str:
    """The host CPU's feature flags: a CPU executable is machine code for them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.machine()


def fingerprint(*parts: Any) -> str:
    """`parts` (reprs that name what the programs are made of) and this process's JAX, XLA and
    devices, as one digest."""
    backend = jax.devices()[0].client
    import jaxlib
    env = (jax.__version__, jaxlib.__version__, backend.platform,
           backend.platform_version, os.environ.get("XLA_FLAGS", ""),
           [(f, str(getattr(jax.config, f, None))) for f in _JAX_FLAGS],
           [(d.id, d.device_kind) for d in jax.devices()], _host_cpu(), source_digest())
    return hashlib.sha256(repr((env, parts)).encode()).hexdigest()[:32]


class ExecutableStore:
    """Executables and small JSON values under one fingerprint's directory."""

    def __init__(self, root: str, key: str) -> None:
        self.dir = os.path.join(root, key)
        os.makedirs(self.dir, exist_ok=True)
        os.utime(self.dir)  # most recently used
        _prune(root, keep=KEEP)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name.replace(os.sep, "_"))

    def load(self, name: str) -> Optional[Any]:
        """The executable stored as `name`, loaded onto its devices (None: none stored, or one
        that does not load here)."""
        try:
            with open(self._path(name) + ".exe", "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
        except FileNotFoundError:
            return None
        except Exception as e:  # a torn or foreign file: compile instead
            logger.warning("Stored executable %s unreadable (%s); compiling it", name, e)
            return None
        from jax.experimental import serialize_executable
        try:
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:
            logger.warning("Stored executable %s did not load (%s); compiling it", name, e)
            return None

    def save(self, name: str, compiled: Any) -> None:
        from jax.experimental import serialize_executable
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception as e:  # e.g. a backend that cannot serialize: the next start compiles
            logger.warning("Executable %s not stored (%s)", name, e)
            return
        self._write(self._path(name) + ".exe", blob)

    def discard(self, name: str) -> None:
        """Removes what is stored as `name` (a file that did not load is not read again)."""
        try:
            os.remove(self._path(name) + ".exe")
        except OSError:
            pass

    def get_json(self, name: str) -> Any:
        try:
            with open(self._path(name) + ".json") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def put_json(self, name: str, value: Any) -> None:
        self._write(self._path(name) + ".json", json.dumps(value).encode())

    def _write(self, path: str, data: bytes) -> None:
        # Another process of the same fingerprint (a data-parallel replica) may write the same
        # file: each writes its own temporary file and renames it, so a reader sees one whole file.
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("Could not write %s: %s", path, e)


def _prune(root: str, keep: int) -> None:
    try:
        dirs = [os.path.join(root, d) for d in os.listdir(root)]
        dirs = sorted((d for d in dirs if os.path.isdir(d)), key=os.path.getmtime, reverse=True)
    except OSError:
        return
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def store_for(*parts: Any) -> Optional[ExecutableStore]:
    """The store of programs made of `parts`, under JAX's persistent cache directory; None where
    there is none, and in a multi-process run (every process must run the programs it lowers)."""
    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir or jax.process_count() > 1:
        return None
    try:
        return ExecutableStore(os.path.join(cache_dir, STORE_DIR), fingerprint(*parts))
    except OSError as e:  # e.g. a read-only cache directory: every start compiles, as without
        logger.warning("No stored executables (%s): each start traces and lowers its programs", e)
        return None


_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_served = threading.local()  # per compiling thread: whether JAX's persistent cache answered


def _on_jax_event(event: str, **_: Any) -> None:
    if event == _CACHE_HIT:
        _served.hit = True


jax.monitoring.register_event_listener(_on_jax_event)


def _compile(lowered: Any, persist: bool) -> tuple[Any, bool]:
    """`lowered` compiled, and whether JAX's persistent cache served it (the event is recorded
    on the compiling thread). `persist`: whether the program is also written to that cache (it
    is read either way)."""
    _served.hit = False
    with (contextlib.nullcontext() if persist
          else jax_config.persistent_cache_min_compile_time_secs(float("inf"))):  # this thread's
        return lowered.compile(), _served.hit


def _store_keeps_every_program() -> bool:
    """Whether the store keeps every program a build compiles (see `_storable`). Where it does, a
    program is not written to JAX's persistent cache as well: that serialized each executable a
    second time, holding the GIL (8 s of a cold start at the 8B shape on an H200, whose lowering
    of the next programs waits for the GIL: bench/RESULTS.md)."""
    return jax.default_backend() != "cpu"


def _storable(from_persistent_cache: bool) -> bool:
    """Whether an executable can be stored: on the CPU not one JAX's persistent cache served,
    whose serialization there leaves out functions of the program (loaded later, it fails when
    run: 'Function ... not found'; XLA:CPU, jax 0.10-0.11). Such a program goes through the
    persistent cache at every start instead, as without the store."""
    return not from_persistent_cache or jax.default_backend() != "cpu"


class Build:
    """Executables for `programs` (name -> a function returning the program lowered), being built
    on threads of this build's own: those the store has are loaded on `workers` threads; the
    others are lowered on one thread, in the given order (a lowered Mosaic GPU kernel can carry
    process-wide state: lowering concurrently gave modules that differed between processes), each
    compiled (and stored) on the `workers` threads as soon as it is lowered, so lowering the next
    overlaps compiling the last (XLA compiles, and loads from the persistent cache, release the
    GIL). `seconds` gets each compiled program's (lower, compile, store) seconds by name (store:
    serializing and writing it, which holds the GIL while serializing)."""

    def __init__(self, programs: dict[str, Callable[[], Any]], store: Optional[ExecutableStore],
                 workers: int, on_done: Callable[[], None] = lambda: None,
                 seconds: Optional[dict[str, tuple[float, float, float]]] = None) -> None:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxvllm-compile")
        self._store, self._pool, self._on_done, self._seconds = store, pool, on_done, seconds
        self._persist = store is None or not _store_keeps_every_program()
        self._futures = {n: Future() for n in programs}
        loads = {n: pool.submit(store.load, n) for n in programs} if store is not None else {}
        threading.Thread(target=self._lower_all, args=(programs, loads), daemon=True,
                         name="jaxvllm-lower").start()

    def get(self, name: str) -> Any:
        """One program's executable, once built (raises what building it raised)."""
        return self._futures[name].result()

    def result(self) -> dict[str, Any]:
        """Every program's executable, by name, once all are built."""
        return {n: f.result() for n, f in self._futures.items()}

    def _lower_all(self, programs: dict[str, Callable[[], Any]], loads: dict[str, Future]) -> None:
        for name, lower in programs.items():
            out = self._futures[name]
            try:
                exe = loads[name].result() if name in loads else None
                if exe is not None:
                    self._on_done()
                    out.set_result(exe)
                    continue
                t0 = time.perf_counter()
                lowered = lower()
            except BaseException as e:  # the caller sees it from get() / result()
                out.set_exception(e)
                continue
            self._pool.submit(self._build, name, lowered, out, time.perf_counter() - t0)
        self._pool.shutdown(wait=False)  # what was submitted still runs

    def _build(self, name: str, lowered: Any, out: Future, lower_s: float) -> None:
        try:
            t0 = time.perf_counter()
            compiled, from_cache = _compile(lowered, self._persist)
            t1 = time.perf_counter()
            if self._store is not None:
                if _storable(from_cache):
                    self._store.save(name, compiled)
                else:
                    self._store.discard(name)
            if self._seconds is not None:
                self._seconds[name] = (lower_s, t1 - t0, time.perf_counter() - t1)
            self._on_done()
        except BaseException as e:
            out.set_exception(e)
            return
        out.set_result(compiled)
