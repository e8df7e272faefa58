"""The runtime without PyTorch: `jaxvllm generate` on the default GGUF and on an HF directory, in a
process where torch cannot be imported (as in a venv with the README's main install). CI also runs the
real thing in such a venv; this keeps the check in the test suite, where torch is installed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FLAGS = ["--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "16",
                "--num-gpu-blocks-override", "16", "--token-buckets", "8", "16", "--enforce-eager",
                "--disable-log-stats"]
# `sys.modules["torch"] = None` makes `import torch` raise ImportError and transformers see no torch.
# It goes in a sitecustomize so that every process the engine starts (the tokenizer loader) has it too.
_HIDE_TORCH = "import sys\nsys.modules['torch'] = None\n"


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("no_torch_site")
    (site / "sitecustomize.py").write_text(_HIDE_TORCH)
    # Empty caches too: a tokenizer pickled by another test must not stand in for loading one.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT]),
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("no_torch_cache"))}


def _generate_without_torch(env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "jaxvllm.entrypoints.cli", "generate", *args, *ENGINE_FLAGS],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_hidden_torch_cannot_be_imported(no_torch_env):
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=60,
                         env=no_torch_env)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def test_default_gguf_generates_without_torch(no_torch_env):
    text = _generate_without_torch(no_torch_env, "The capital of France is", "--max-tokens", "4", "--temperature", "0")
    assert text.strip()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny random Llama saved as an HF directory with a tokenizer and a chat template."""
    pytest.importorskip("torch")
    from test_generate_cli import save_tiny_llama
    path = tmp_path_factory.mktemp("tiny_llama_no_torch")
    save_tiny_llama(path, chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return str(path)


def test_hf_directory_generates_and_chats_without_torch(no_torch_env, hf_dir):
    for chat in ([], ["--chat"]):
        text = _generate_without_torch(no_torch_env, "t5 t9 t3", "--model", hf_dir, "--max-tokens", "3",
                                       "--temperature", "0", *chat)
        assert len(text.split()) == 3 and all(w.startswith("t") for w in text.split())
