"""The programs JAX lowers in this process (compiled, or loaded from the persistent cache), by name,
from JAX's monitoring events. The runner compiles every program a request can need at warm-up, so a
lowering while serving means every stream waited for a compile: the runner warns, and tests fail."""
from __future__ import annotations

import threading

from jax import monitoring

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_names: list[str] = []
_listening = False


def _on_event(event: str, duration: float, **kwargs: object) -> None:
    if event == _LOWERING_EVENT:
        with _lock:
            _names.append(str(kwargs.get("fun_name", "?")))


def mark() -> int:
    """Starts listening (once per process); a mark to pass to `since`."""
    global _listening
    with _lock:
        if not _listening:
            monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
        return len(_names)


def since(mark_: int) -> list[str]:
    """Names of the programs lowered since `mark_` (in this process, by any thread)."""
    with _lock:
        return _names[mark_:]
