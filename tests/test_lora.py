"""LoRA serving (`enable_lora`, LoRARequest, vLLM's names) against PEFT on a tiny random Llama:
adapters of different ranks and targets, and the base model, in one batch; more adapters than
slots; the prefix cache kept apart per adapter; bad adapters refused by name."""
from __future__ import annotations

import functools
import json
from typing import Optional

import numpy as np
import pytest
import torch

from hf_builders import FAR_FROM_FLAT, save_word_tokenizer, tiny_config, tiny_model
from jaxvllm import LLM, LoRARequest, SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, alpha, targets, rslora)
ADAPTERS = {"all8": (8, 16, ALL, False), "qv4": (4, 8, ["q_proj", "v_proj"], True),
            "mlp2": (2, 4, ["gate_proj", "up_proj", "down_proj"], False)}
PROMPTS = [[5, 17, 33, 70, 101, 180, 222, 9, 14, 3, 77, 42, 8, 150, 99, 4, 61, 23, 7, 31, 12],
           [44, 12, 9], [200, 3, 3, 3, 19, 88, 120, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)


def _base():
    return tiny_model(tiny_config("llama", vocab_size=256), **FAR_FROM_FLAT)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    root = tmp_path_factory.mktemp("lora")
    model_dir = root / "base"
    base = _base()
    base.save_pretrained(model_dir)
    save_word_tokenizer(model_dir, 256)
    out = {"base": str(model_dir)}
    for i, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        # init_lora_weights=False: B random too (PEFT's default zeros would make it a no-op)
        peft = get_peft_model(_base(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  lora_dropout=0.0, init_lora_weights=False,
                                                  use_rslora=rslora))
        peft.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@functools.lru_cache(maxsize=None)
def _reference(adapter: Optional[str], prompt: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    """PEFT's greedy continuation and prompt log-probabilities (float64) under the adapter
    directory `adapter` (None: the base model)."""
    from peft import PeftModel
    model = _base() if adapter is None else PeftModel.from_pretrained(_base(), adapter).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
        seq = ids
        for _ in range(8):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist(), logp[np.arange(len(prompt) - 1), prompt[1:]]


def _assert_peft(dirs, name: str, prompt: list[int], out) -> None:
    """`out` (greedy, prompt logprobs) is PEFT's under adapter `name` ("base": none)."""
    tokens, logp = _reference(None if name == "base" else dirs[name], tuple(prompt))
    assert out.outputs[0].token_ids == tokens, (name, prompt)
    got = [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    np.testing.assert_allclose(got, logp, atol=2e-4, err_msg=name)


def _llm(dirs, max_loras: int, enforce_eager: bool = True) -> LLM:
    return LLM(dirs["base"], dtype="float32", enable_lora=True, max_loras=max_loras,
               max_lora_rank=8, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32,
               num_gpu_blocks_override=64, enforce_eager=enforce_eager, token_buckets=(8, 32))


def _lora(dirs, name: str):
    return None if name == "base" else LoRARequest(name, list(ADAPTERS).index(name) + 1, dirs[name])


def test_adapters_and_base_in_one_batch_match_peft(dirs):
    """Every prompt under every adapter and the base in one generate call, with 2 slots for the 3
    adapters: two adapters and the base share steps while the third waits, then takes the slot
    its predecessor leaves (LRU)."""
    llm = _llm(dirs, 2)
    names = ["base", *ADAPTERS]
    jobs = [(n, p) for n in names for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in jobs], GREEDY, use_tqdm=False,
                        lora_request=[_lora(dirs, n) for n, _ in jobs])
    for (name, prompt), out in zip(jobs, outs):
        _assert_peft(dirs, name, prompt, out)


@pytest.mark.parametrize("quantization, load_format", [("fp8", "auto"), ("awq", "dummy")])
def test_adapters_on_quantized_weights(dirs, quantization, load_format):
    """LoRA over FP8 weights, and over int4 ones (AWQ's layout, q/k/v and gate/up fused into one
    GEMM each, the adapter added to each part): an adapter moves the prompt logprobs by what it
    moves them over the unquantized weights, up to the quantization's error."""
    def logprobs(quant):
        llm = LLM(dirs["base"], load_format=load_format, dtype="float32", quantization=quant,
                  enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=64,
                  token_buckets=(8, 32))
        got = []
        for name in ("base", "all8"):
            out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False,
                               lora_request=_lora(dirs, name))[0]
            got.append(np.array([e[t].logprob for e, t in zip(out.prompt_logprobs[1:],
                                                               PROMPTS[0][1:])]))
        return got[1] - got[0]

    plain, quantized = logprobs(None), logprobs(quantization)
    # Measured: the adapter moves them by 0.57 (FP8's checkpoint) and 0.22 (dummy weights) on
    # average, and the quantized weights change that by 12% and 5%; without the adapter on the
    # fused int4 projections, by 71%.
    assert np.abs(plain).mean() > 0.15
    assert np.abs(quantized - plain).mean() < 0.25 * np.abs(plain).mean(), (plain, quantized)


def test_prefix_cache_is_per_adapter_and_slot_swaps_compile_nothing(dirs):
    llm = _llm(dirs, 2, enforce_eager=False)
    runner = llm.llm_engine.runner
    compiled = runner._step._cache_size()
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPTS[0]}  # 21 tokens: one full block of 16
    cached = {}
    for name in ("all8", "all8", "qv4", "base", "qv4"):
        cached.setdefault(name, []).append(
            llm.generate([prompt], sp, use_tqdm=False, lora_request=_lora(dirs, name))[0]
            .num_cached_tokens)
    assert cached == {"all8": [0, 16], "qv4": [0, 16], "base": [0]}
    llm.generate([prompt], sp, use_tqdm=False, lora_request=_lora(dirs, "mlp2"))  # evicts one
    assert runner._step._cache_size() == compiled


def test_steps_without_adapters_skip_the_update(dirs):
    """With LoRA on, the steps where no token has an adapter run the step program built without
    the adapter slots (the update would cost them two GEMMs a projection for nothing), the others
    the one with them; both are built at warm-up, and the base model's output stays PEFT's."""
    llm = _llm(dirs, 2, enforce_eager=False)
    runner = llm.llm_engine.runner
    ran, run = [], runner._run
    runner._run = lambda name, *a, **kw: (ran.append(name), run(name, *a, **kw))[1]
    compiled = runner._step._cache_size()
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    for name in ("base", "all8"):
        ran.clear()
        outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=_lora(dirs, name))
        steps = [n for n in ran if n.startswith("step-")]
        assert steps and all(n.endswith("-base") == (name == "base") for n in steps), steps
        for prompt, out in zip(PROMPTS, outs):
            _assert_peft(dirs, name, prompt, out)
    assert runner._step._cache_size() == compiled


def test_bad_adapters_are_refused(dirs, tmp_path):
    llm = _llm(dirs, 1)
    prompt = {"prompt_token_ids": PROMPTS[1]}
    with pytest.raises(ValueError, match="adapter_config.json"):
        llm.generate([prompt], GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path)))
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_model.safetensors").write_bytes(
        open(dirs["all8"] + "/adapter_model.safetensors", "rb").read())
    config = json.loads(open(dirs["all8"] + "/adapter_config.json").read())
    (big / "adapter_config.json").write_text(json.dumps(dict(config, r=16)))
    with pytest.raises(ValueError, match="max_lora_rank"):
        llm.generate([prompt], GREEDY, lora_request=LoRARequest("big", 10, str(big)))
    with pytest.raises(ValueError, match="already the adapter"):
        llm.generate([prompt], GREEDY, lora_request=[LoRARequest("a", 11, dirs["all8"])])
        llm.generate([prompt], GREEDY, lora_request=LoRARequest("b", 11, dirs["qv4"]))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, dirs["all8"])
    plain = LLM(dirs["base"], dtype="float32", max_model_len=64, num_gpu_blocks_override=16,
                enforce_eager=True, token_buckets=(8,), max_num_batched_tokens=8, max_num_seqs=4)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([prompt], GREEDY, lora_request=_lora(dirs, "qv4"))


def test_server_serves_adapters_by_model_name(dirs):
    """--lora-modules: the `model` field names an adapter (its output is the offline engine's with
    that adapter), /v1/models lists it with the base as parent; an unknown name is a 404."""
    import urllib.error
    import urllib.request

    from jaxvllm import EngineArgs
    from jaxvllm.entrypoints.openai.api_server import parse_lora_modules
    from jaxvllm.entrypoints.openai.launch import ServerThread
    modules = parse_lora_modules([f"all8={dirs['all8']}", f"qv4={dirs['qv4']}"], True)
    args = EngineArgs(model=dirs["base"], dtype="float32", enable_lora=True, max_loras=2,
                      max_lora_rank=8, max_model_len=64, max_num_seqs=8,
                      max_num_batched_tokens=32, num_gpu_blocks_override=64, enforce_eager=True,
                      token_buckets=(8, 32))
    offline = _llm(dirs, 2)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def post(srv, body):
        req = urllib.request.Request(srv.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    with ServerThread(args, served_model_name="base", lora_modules=modules) as srv:
        cards = json.load(urllib.request.urlopen(srv.url + "/v1/models"))["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [
            ("base", None), ("all8", "base"), ("qv4", "base")]
        for name in ("base", "all8", "qv4"):
            got = post(srv, {"model": name, "prompt": PROMPTS[2], "max_tokens": 8,
                             "temperature": 0, "ignore_eos": True})["choices"][0]["text"]
            want = offline.generate([{"prompt_token_ids": PROMPTS[2]}], sp, use_tqdm=False,
                                    lora_request=_lora(dirs, name))[0].outputs[0].text
            assert got == want, name
        with pytest.raises(urllib.error.HTTPError) as e:
            post(srv, {"model": "nope", "prompt": PROMPTS[2], "max_tokens": 2})
        assert e.value.code == 404
    with pytest.raises(SystemExit, match="enable-lora"):
        parse_lora_modules([f"all8={dirs['all8']}"], False)
    with pytest.raises(SystemExit, match="NAME=PATH"):
        parse_lora_modules(["all8"], True)
