"""Shared test setup: one JAX compilation cache for the whole run, GPU markers, shared engines and
the shared real-engine server."""
from __future__ import annotations

import os
import tempfile

import pytest

# jaxvllm's own caches (converted weights, pickled tokenizers, bench tokenizers) start empty in every
# run and stay out of the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxvllm-test-cache-")

# Executables compiled by one test are reused by the next (and by the next run on this machine).
_CACHE = os.environ.setdefault(
    "JAXVLLM_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "jaxvllm-test-jax-cache"))


def pytest_configure(config: pytest.Config) -> None:
    import jax
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import jax
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2 GGUF, loaded once (float32)."""
    from converters import load_model
    return load_model(None, dtype="float32", cache_dir=None)


@pytest.fixture(scope="session")
def default_model_dir() -> tuple[str, str]:
    from jaxvllm.default_model import default_model_path
    path = default_model_path()
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir, tmp_path_factory):
    """transformers' own reading of the embedded GGUF (float32, torch). Reading it dequantizes
    every tensor in Python (~20 s, a minute on a busy machine), so the first pytest worker to need
    it saves its config and weights where the others load them from (5 s)."""
    import fcntl

    import torch
    import transformers
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # one directory for every worker of the run
    saved = shared / "hf-default-model.pt"
    with open(shared / "hf-default-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if saved.exists():
            read = torch.load(saved, weights_only=True)
            config = transformers.AutoConfig.for_model(**read["config"])
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(read["state"])
            return model.eval()
        directory, name = default_model_dir
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32).eval()
        config = model.config.to_dict()
        config.pop("quantization_config")  # the GGUF's: the weights saved are plain float32
        torch.save({"config": config, "state": model.state_dict()}, saved)
        return model


@pytest.fixture(scope="session")
def real_srv():
    """The OpenAI server on the real engine with the embedded default model (test_server_helpers'
    real_engine_args), started once for the whole run and shared by the server test modules; in
    dev mode (its pause/sleep endpoints)."""
    from jaxvllm.entrypoints.openai.launch import ServerThread
    from test_server_helpers import real_engine_args
    s = ServerThread(real_engine_args(), ready_timeout=600, dev_mode=True).start()
    yield s
    s.stop()
