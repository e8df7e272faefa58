"""Tiny random Hugging Face models for the tests: one config builder, one weight initializer and one
word-level tokenizer, which every test that needs an HF checkpoint shares.

Imported as `from hf_builders import ...`: pytest puts tests/ on sys.path, and so does running a test
file as a script. torch and transformers are imported inside the functions, so that importing this
module does not need them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# The sizes most tests use; each test overrides what it needs.
DEFAULTS: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256)
# tiny_model's options for tests that compare logits against HF: large matrices and noisy norms and
# biases make the logits far from flat, so a wrong weight shows.
FAR_FROM_FLAT: dict[str, float] = dict(matrix_scale=4.0, norm_std=0.2, bias_std=0.2)


def tiny_config(model_type: str = "llama", **fields: Any) -> PretrainedConfig:
    """The HF config of `model_type` ("llama", "mistral", "qwen2", ...) with DEFAULTS, `fields`
    (HF config field names) overriding them."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(model_type, **{**DEFAULTS, **fields})
    # Set in memory too (save_pretrained writes it anyway): LLM.from_params reads it from the config.
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def tiny_model(config: PretrainedConfig, *, seed: int = 0, matrix_scale: float = 1.0,
               norm_std: float = 0.0, bias_std: float = 0.0,
               dtype: str = "float32") -> PreTrainedModel:
    """A random model for `config` in eval mode. HF's init gives nearly flat logits, ones for norm
    weights and zeros for biases, so a test that compares logits or tokens makes its weights matter:
    `matrix_scale` multiplies every matrix, and N(0, norm_std) / N(0, bias_std) noise is added to the
    norm weights / biases (in parameter order, from the torch seed)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                if matrix_scale != 1.0:
                    p.mul_(matrix_scale)
                continue
            std = norm_std if torch.all(p == 1) else bias_std
            if std:
                p.add_(torch.randn_like(p) * std)
    return model.to(getattr(torch, dtype))


def save_word_tokenizer(path: Union[str, Path], vocab_size: int, *, eos_token: Optional[str] = None,
                        chat_template: Optional[str] = None) -> None:
    """A word-level tokenizer of the tokens t0..t{vocab_size-1} (split on whitespace, unknown words
    -> t0), saved to `path` next to a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # Only the given ones: an explicit None would be written to tokenizer_config.json as null.
    extra = {k: v for k, v in (("eos_token", eos_token), ("chat_template", chat_template)) if v is not None}
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", **extra).save_pretrained(path)


def assert_generates_as_hf(llm: Any, model: PreTrainedModel, prompts: list[list[int]],
                           tokens: int = 8, tol: float = 2e-3) -> None:
    """`llm` (an engine's LLM) against the HF `model` on `prompts` (token ids): every prompt
    token's logprob within `tol` of HF's (float64 log-softmax of its logits) and the same `tokens`
    greedy tokens."""
    import numpy as np
    import torch
    from jaxvllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor(prompt)[None]
        with torch.no_grad():
            want = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        got = [next(iter(pos.values())).logprob for pos in out.prompt_logprobs[1:]]
        err = np.abs(np.asarray(got) - want[np.arange(len(prompt) - 1), prompt[1:]]).max()
        assert err < tol, (prompt, err)
        assert list(out.outputs[0].token_ids) == greedy, prompt
