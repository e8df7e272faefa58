"""Weight updates in chunks (LLM.start_weight_update / update_weights(chunk) /
finish_weight_update, vLLM's names) on a tiny random Llama: streamed layer by layer they give what
one whole update gives, in bf16 and with FP8 weights quantized on arrival."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.worker.weight_swap import weight_chunks

PROMPTS = ["t5 t9 t13 t2 t77", "t100 t3"]
SP = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from hf_builders import FAR_FROM_FLAT, save_word_tokenizer, tiny_config, tiny_model
    d = str(tmp_path_factory.mktemp("llama"))
    tiny_model(tiny_config(num_hidden_layers=3), **FAR_FROM_FLAT).save_pretrained(d)
    save_word_tokenizer(d, 256)
    return d


@pytest.fixture(scope="module")
def llms(model_dir):
    """One engine per quantization for the module's tests."""
    made: dict = {}

    def get(quantization=None) -> LLM:
        if quantization not in made:
            made[quantization] = LLM(
                model_dir, dtype="bfloat16", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=64, num_gpu_blocks_override=64, enforce_eager=True,
                token_buckets=(8, 64), quantization=quantization)
        return made[quantization]
    return get


def _run(llm: LLM) -> list:
    outs = llm.generate(PROMPTS, SP, use_tqdm=False)
    return [(o.outputs[0].token_ids, [next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
            for o in outs]


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_chunked_update_equals_a_whole_one(quantization, llms, model_dir):
    """On one engine: a whole update, the old weights back, then the same update in chunks."""
    llm = llms(quantization)
    from converters import load_model
    base = load_model(model_dir, dtype="bfloat16", cache_dir=None, load_tokenizer=False).params
    # The unquantized weights, scaled: the new weights a trainer would push.
    new = jax.tree.map(lambda a: np.asarray(a * 1.25 if a.ndim > 1 else a), base)
    before = _run(llm)
    llm.update_weights(new)
    want = _run(llm)
    assert want != before
    llm.update_weights(base)
    assert _run(llm) == before
    llm.start_weight_update()
    for chunk in weight_chunks(new):
        llm.update_weights(chunk)
        with pytest.raises(RuntimeError, match="finish_weight_update"):
            llm.generate(PROMPTS, SP, use_tqdm=False)
    llm.finish_weight_update()
    assert _run(llm) == want


def test_chunk_errors_name_the_problem(llms):
    llm = llms()
    q = np.asarray(llm.llm_engine.runner.params["layers"][0]["q"])
    with pytest.raises(RuntimeError, match="start_weight_update"):
        llm.finish_weight_update()
    llm.start_weight_update()
    with pytest.raises(ValueError, match="layers.0.qq"):
        llm.update_weights({"layers.0.qq": q})
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights({"layers.0.q": q[:, :3]})
    with pytest.raises(TypeError, match="by name"):
        llm.update_weights([q])
    with pytest.raises(RuntimeError, match="already"):
        llm.start_weight_update()
    llm.finish_weight_update()
    assert llm.generate(PROMPTS, SP, use_tqdm=False)
