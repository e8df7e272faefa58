"""`jaxvllm generate`: the model's generation_config.json sets the sampling defaults (as
LLM.generate without sampling_params), and the sampling flags that are given override them
(a tiny random Llama saved as an HF directory, float32, CPU)."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.entrypoints.cli import main

ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
                "--max-num-batched-tokens", "16", "--num-gpu-blocks-override", "16",
                "--token-buckets", "8", "16", "--enforce-eager", "--disable-log-stats"]
GENERATION_CONFIG = {"temperature": 0.5, "top_p": 0.8, "top_k": 7, "max_new_tokens": 3}


def save_tiny_llama(path: Any, chat_template: Optional[str] = None) -> None:
    """A tiny random Llama (1 layer, 64 tokens t0..t63, no EOS) saved as an HF directory with a
    word-level tokenizer."""
    from hf_builders import save_word_tokenizer, tiny_config, tiny_model
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      max_position_embeddings=128)
    tiny_model(cfg).save_pretrained(path)
    save_word_tokenizer(path, 64, chat_template=chat_template)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama_gen_config")
    save_tiny_llama(path)
    # No EOS anywhere: every completion runs to max_tokens, so its length shows which one applied.
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return str(path)


def _generate(monkeypatch, capsys, model_dir: str, *flags: str) -> tuple[SamplingParams, list[int]]:
    """Runs the real CLI; returns the SamplingParams it passed to LLM.generate and the tokens."""
    calls = []
    real = LLM.generate

    def observe(self, prompts, sampling_params=None, use_tqdm=True):
        outs = real(self, prompts, sampling_params, use_tqdm)
        calls.append((sampling_params, outs[0].outputs[0]))
        return outs

    monkeypatch.setattr(LLM, "generate", observe)
    assert main(["generate", "t5 t9 t3", "--model", model_dir, *ENGINE_FLAGS, *flags]) == 0
    (sp, completion), = calls
    assert capsys.readouterr().out == completion.text + "\n"
    return sp, completion.token_ids


def test_generate_uses_generation_config_defaults(monkeypatch, capsys, model_dir):
    sp, tokens = _generate(monkeypatch, capsys, model_dir)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (0.5, 0.8, 7, 3)
    assert len(tokens) == 3


def test_generate_flags_override_defaults(monkeypatch, capsys, model_dir):
    sp, tokens = _generate(monkeypatch, capsys, model_dir, "--top-k", "3", "--max-tokens", "5",
                           "--sampling-seed", "11")
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed) == (0.5, 0.8, 3, 5, 11)
    assert len(tokens) == 5
    sp, _ = _generate(monkeypatch, capsys, model_dir, "--temperature", "0")
    assert sp.greedy and sp.max_tokens == 3
    with pytest.raises(ValueError, match="top_p"):  # the flags go through SamplingParams' checks
        _generate(monkeypatch, capsys, model_dir, "--top-p", "0")


def test_generate_compiles_buckets_on_first_use_unless_told():
    """One prompt runs a bucket or two: the CLI skips the warm-up of every bucket (the server's)."""
    from jaxvllm.entrypoints.cli import build_parser
    assert build_parser().parse_args(["generate", "x"]).enforce_eager is True
    assert build_parser().parse_args(["generate", "x", "--no-enforce-eager"]).enforce_eager is False
    assert build_parser().parse_args(["serve"]).enforce_eager is None  # by the device
