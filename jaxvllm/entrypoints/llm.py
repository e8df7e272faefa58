"""`LLM`: the offline API, with vLLM's names and meanings."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from jaxvllm.config import EngineArgs
from jaxvllm.engine.llm_engine import LLMEngine, PromptType
from jaxvllm.outputs import RequestOutput
from jaxvllm.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """Generate from a model offline. `model=None` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        self.llm_engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for "
                                 f"{len(prompts)} prompts")
        return self._run(prompts, params_list, use_tqdm)

    def chat(self, messages: Union[Messages, Sequence[Messages]],
             sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.llm_engine.tokenizer
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, return_dict=False))} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        # Validate everything before queueing anything, so a bad prompt leaves no half-run batch.
        prepared = [engine.prepare_request(str(next(self._counter)), p, sp)
                    for p, sp in zip(prompts, params_list)]
        order = {p.request_id: i for i, p in enumerate(prepared)}
        for p in prepared:
            engine.admit_request(p)
        bar = _progress(len(prepared)) if use_tqdm and len(prepared) > 1 else None
        results: list[Optional[RequestOutput]] = [None] * len(prepared)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(list(order))
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
