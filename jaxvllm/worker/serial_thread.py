"""A daemon thread that runs submitted works one at a time, in submission order, each result (or
exception) going to the work's future, and each under the JAX configuration of the thread that
submitted it: JAX's context managers (`jax.default_matmul_precision`, `jax.default_device`, a mesh,
...) are thread-local, and a jitted call made here without them would trace, compile and compute
otherwise than the caller asked (seen: a float32 engine under "highest" precision computing in
TF32 on the GPU).

The runner keeps two: one enqueues each step's programs (so the device sees them in dispatch
order) and one waits for a step's samples under a deadline (tensor parallelism). Daemon threads, not
a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, before any atexit
handler, so a work stuck behind a dead peer's collective would keep the process from exiting (the
multi-host engine's exit handler ends it with code 1 instead).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

from jax._src import config as jax_config

logger = logging.getLogger(__name__)


class SerialThread:
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._queue,), name=name, daemon=True)
        self._thread.start()
        # The thread ends with its owner, but not at interpreter exit: woken then, it would end
        # while the interpreter tears JAX down and abort the process (seen on the GPU: "terminate
        # called after throwing an instance of ...", exit code 134). Left blocked on its queue, a
        # daemon thread is simply dropped.
        weakref.finalize(self, self._queue.put, None).atexit = False

    def submit(self, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((work, future, _thread_jax_config()))
        return future


def _thread_jax_config() -> list[tuple[Any, Any]]:
    """(option, value) of every JAX configuration option set on this thread (JAX has no public
    API for this: its options are its module's `config_states`; a JAX without them runs works
    under the global configuration only, with a warning)."""
    try:
        unset = jax_config.config_ext.unset
        return [(state, v) for state in jax_config.config_states.values()
                if (v := state.get_local()) is not unset]
    except AttributeError as e:
        global _warned
        if not _warned:
            _warned = True
            logger.warning("this JAX has no per-thread configuration API (%s): works on this "
                           "thread do not see JAX context managers such as "
                           "jax.default_matmul_precision", e)
        return []


_warned = False


def _serve(q: queue.SimpleQueue) -> None:
    while (item := q.get()) is not None:
        work, future, config = item
        try:
            with contextlib.ExitStack() as stack:
                for state, value in config:
                    stack.enter_context(state(value))  # as `jax.default_matmul_precision(v)`
                result = work()
            future.set_result(result)
        except BaseException as e:  # noqa: BLE001 (handed to whoever waits for the work)
            future.set_exception(e)
        del work, future, config, item  # release the step's arrays before waiting for the next
