"""worker/serial_thread.py: order, failures, lifetime."""
from __future__ import annotations

import gc
import threading
import time

import pytest

from jaxvllm.worker.serial_thread import SerialThread


def test_works_run_in_submission_order_off_the_callers_thread():
    worker = SerialThread("test-launch")
    seen = []

    def work(i):
        time.sleep(0.01 if i % 2 == 0 else 0)  # a slow work does not let a later one pass it
        seen.append((i, threading.current_thread().name))
        return i * i

    futures = [worker.submit(lambda i=i: work(i)) for i in range(6)]
    assert [f.result(timeout=10) for f in futures] == [i * i for i in range(6)]
    assert [i for i, _ in seen] == list(range(6))
    assert {name for _, name in seen} == {"test-launch"}


def test_a_failed_work_fails_only_its_own_future():
    worker = SerialThread("test-launch")

    def boom():
        raise ValueError("injected")

    bad, good = worker.submit(boom), worker.submit(lambda: "after")
    with pytest.raises(ValueError, match="injected"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == "after"


def test_the_thread_ends_with_its_worker():
    worker = SerialThread("test-launch-lifetime")
    worker.submit(lambda: None).result(timeout=10)
    thread = worker._thread
    del worker
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_works_run_under_the_submitting_threads_jax_config():
    import jax
    import jax.numpy as jnp
    worker = SerialThread("test-launch")

    def precision():
        return jax.config.jax_default_matmul_precision

    with jax.default_matmul_precision("highest"):
        inside = worker.submit(precision)
        # a jitted call traced there sees it too
        hlo = worker.submit(lambda: jax.jit(jnp.dot).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).as_text())
    outside = worker.submit(precision)
    assert inside.result(timeout=10) == "highest"
    assert "HIGHEST" in hlo.result(timeout=30)
    assert outside.result(timeout=10) is None
