"""`LLM`: the offline API, with vLLM's names and meanings."""
from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from jaxvllm.config import EngineArgs
from jaxvllm.engine.data_parallel import create_engine
from jaxvllm.engine.llm_engine import PromptType, as_token_ids, check_text, is_token_ids
from jaxvllm.entrypoints.chat_utils import parse_messages, parse_tools
from jaxvllm.lora.request import LoRARequest
from jaxvllm.outputs import RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

Messages = list[dict[str, Any]]
TokenIds = Union[Sequence[int], np.ndarray]  # or a 1-D integer JAX array


@dataclass
class GenerationArrays:
    """A batch's outputs as padded arrays (one row per completion), to feed a training step."""
    token_ids: np.ndarray     # int32[N, L], -1 padded
    logprobs: np.ndarray      # float32[N, L], NaN padded (NaN everywhere unless logprobs were asked)
    lengths: np.ndarray       # int32[N]
    prompt_index: np.ndarray  # int32[N]: which prompt each row continues (n > 1 gives n rows each)


class LLM:
    """Generate from a model offline. `model=None` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        self.llm_engine = create_engine(EngineArgs(model=model, **kwargs))
        self._init_state()

    def _init_state(self) -> None:
        self._counter = itertools.count()
        # pause_generation() from another thread than the one in generate().
        self._pause = threading.Condition()
        self._paused_by: Optional[int] = None  # the pausing thread's ident
        self._retract = False
        self._generating = False

    @classmethod
    def from_params(cls, params: Any, config: Any, tokenizer: Any = None,
                    generation_config: Optional[dict] = None, **kwargs: Any) -> "LLM":
        """An engine over an in-memory params pytree (the engine's layout or HF-named tensors) and an
        HF config (object or dict). Arrays already on device are used as they are."""
        import jax
        import jax.numpy as jnp
        from converters import LoadedModel
        from jaxvllm.engine.setup import configure_jax
        from jaxvllm.engine.weights import to_engine_layout
        from jaxvllm.models.config import ModelConfig
        args = EngineArgs(**kwargs)
        configure_jax(args)
        cfg = ModelConfig.from_hf(config)
        dtype = args.dtype
        params = to_engine_layout(params, cfg, dtype)
        if dtype != "auto" and str(params["final_norm"].dtype) != dtype:
            params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        leaf_dtype = str(params["final_norm"].dtype)
        cfg = dataclasses.replace(cfg, dtype=leaf_dtype)
        hf_config = config if isinstance(config, dict) else config.to_dict()
        loaded = LoadedModel(params=params, config=cfg, hf_config=hf_config, tokenizer=tokenizer,
                             generation_config=generation_config, source="<params>", path=None,
                             load_format="params")
        self = cls.__new__(cls)
        self.llm_engine = create_engine(args, loaded)
        self._init_state()
        return self

    def update_weights(self, params: Any, reset_prefix_cache: bool = True) -> None:
        """Overwrite every weight in place (no recompilation; the old buffers are reused). The prefix
        cache holds K/V computed with the old weights, so it is dropped unless told otherwise.
        `params` hold the model's dtype: a quantized model rounds the ones it stores quantized
        to nearest in its own layout (FP8 per channel; int4 or int8 in the checkpoint's groups,
        offsets and input order, without AWQ's or GPTQ's calibration)."""
        self.llm_engine.update_weights(params, reset_prefix_cache)

    def start_weight_update(self) -> None:
        """Begin a weight update in chunks (vLLM's names): until finish_weight_update(),
        update_weights(chunk) takes a dict of some weights by name in the engine's layout
        ("embed", "final_norm", "lm_head", "layers.3.q", ...; a quantized model's in the model's
        dtype, quantized as update_weights does: an int4 or int8 model's q, k and v, and gate and
        up, in one chunk where it stores them as one weight), each written in place, so a trainer
        streams its weights with one chunk in memory at a time. Generating meanwhile is a
        RuntimeError (the weights are half old)."""
        self.llm_engine.start_weight_update()

    def finish_weight_update(self, reset_prefix_cache: bool = True) -> None:
        """End the update begun by start_weight_update(); the prefix cache is dropped unless told
        otherwise (its K/V came from the old weights)."""
        self.llm_engine.finish_weight_update(reset_prefix_cache)

    def pause_generation(self, *, wait_for_inflight_requests: bool = False,
                         clear_cache: bool = True) -> None:
        """Stop generating so the weights can change (vLLM's AsyncLLM call), for a generate() on
        another thread: its requests either finish (wait_for_inflight_requests) or are retracted
        at once, that generate() returning what they had so far with finish_reason "abort".
        Returns once it has returned; clear_cache drops the prefix cache. Until
        resume_generation(), generate() on another thread waits, and on this one raises."""
        with self._pause:
            self._paused_by = threading.get_ident()
            self._retract = not wait_for_inflight_requests
            self._pause.wait_for(lambda: not self._generating)
            self._retract = False
        if clear_cache:
            self.llm_engine.reset_prefix_cache()

    def resume_generation(self) -> None:
        with self._pause:
            self._paused_by = None
            self._pause.notify_all()

    def is_paused(self) -> bool:
        return self._paused_by is not None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their K/V stay valid only while the weights do)."""
        self.llm_engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Give the device memory to something else between generate calls (vLLM's sleep mode): the
        KV cache is freed and its prefix cache dropped; level 1 moves the weights to host memory,
        level 2 drops them (after wake_up(tags=["weights"]) they are zeros: load new ones with
        update_weights). Generating while asleep is a RuntimeError."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Bring back what `tags` name ("weights", "kv_cache"; None: both) with the shapes and
        shardings they had: nothing is compiled again."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def score(self, prompts: Sequence[Union[str, TokenIds]], continuations: Sequence[Union[str, TokenIds]],
              use_tqdm: bool = False) -> list[np.ndarray]:
        """Log-probabilities (float32[len(continuation tokens)]) of each continuation given its
        prompt, batched through the paged engine (prompt logprobs, so logits instead under
        logprobs_mode "raw_logits"/"processed_logits"; the prefix cache is bypassed).
        Token ids may be lists of Python or numpy ints or 1-D integer numpy/JAX arrays."""
        if len(prompts) != len(continuations):
            raise ValueError(f"score needs as many continuations ({len(continuations)}) as prompts "
                             f"({len(prompts)})")
        engine = self.llm_engine

        def ids(x: Union[str, TokenIds], name: str, special: bool) -> list[int]:
            if isinstance(x, str):
                x = engine.encode(x, special, name)
            return as_token_ids(x, name, engine.model_config.vocab_size)

        pairs = [(ids(p, f"prompts[{i}]", True), ids(c, f"continuations[{i}]", False))
                 for i, (p, c) in enumerate(zip(prompts, continuations))]
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.generate([{"prompt_token_ids": p + c} for p, c in pairs], sp, use_tqdm=use_tqdm)
        result = []
        for (p, c), out in zip(pairs, outs):
            entries = out.prompt_logprobs[len(p):]
            result.append(np.array([e[t].logprob for e, t in zip(entries, c)], np.float32))
        return result

    def generate_arrays(self, prompts: Union[PromptType, Sequence[PromptType]],
                        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                        use_tqdm: bool = False) -> GenerationArrays:
        """`generate`, returned as padded numpy arrays instead of RequestOutput objects."""
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        rows = [(i, c) for i, o in enumerate(outs) for c in o.outputs]
        width = max((len(c.token_ids) for _, c in rows), default=0)
        token_ids = np.full((len(rows), width), -1, np.int32)
        logprobs = np.full((len(rows), width), np.nan, np.float32)
        for r, (_, c) in enumerate(rows):
            token_ids[r, :len(c.token_ids)] = c.token_ids
            if c.logprobs is not None:
                logprobs[r, :len(c.token_ids)] = [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)]
        return GenerationArrays(token_ids, logprobs,
                                np.array([len(c.token_ids) for _, c in rows], np.int32),
                                np.array([i for i, _ in rows], np.int32))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens), as vLLM: what generate uses without
        sampling_params."""
        return SamplingParams(**self.llm_engine.default_sampling)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True,
                 lora_request: Optional[Union[LoRARequest, Sequence[Optional[LoRARequest]]]] = None
                 ) -> list[RequestOutput]:
        """`lora_request`: the adapter for every prompt, or one per prompt (None: the base
        model); the engine needs enable_lora=True."""
        if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a dict, token ids (a list or 1-D array) or a "
                            f"list of those, got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for "
                                 f"{len(prompts)} prompts")
        if isinstance(lora_request, (list, tuple)):
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        else:
            loras = [lora_request] * len(prompts)
        return self._run(prompts, params_list, use_tqdm, loras)

    def chat(self, messages: Union[Messages, Sequence[Messages]],
             sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None,
             tools: Optional[list[dict]] = None,
             lora_request: Optional[Union[LoRARequest, Sequence[Optional[LoRARequest]]]] = None
             ) -> list[RequestOutput]:
        """Each conversation rendered with the model's chat template (or `chat_template`), with
        `tools` (OpenAI's function entries) passed to it, then generated from."""
        from jinja2 import TemplateError
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a non-empty list of message dicts or a list of those")
        tool_list = parse_tools(tools) if tools else None
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.llm_engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer: chat needs one (use generate with token ids)")
        prompts = []
        for i, conv in enumerate(conversations):
            name = "messages" if len(conversations) == 1 else f"messages[{i}]"
            conv = parse_messages(conv, name)  # a bad message is named here, not inside the template
            for j, m in enumerate(conv):
                check_text(m["content"], f"{name}[{j}].content")
            try:
                text = tok.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                               add_generation_prompt=add_generation_prompt,
                                               tools=tool_list)
            except TemplateError as e:  # the template's own raise_exception()
                raise ValueError(f"the chat template rejected {name}: {e}") from None
            # The rendered text is the prompt (as vLLM reports it); the template wrote the special
            # tokens already, so the tokenizer adds none.
            prompts.append({"prompt": text, "prompt_token_ids": self.llm_engine.encode(text, False, name)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams],
             use_tqdm: bool, loras: list[Optional[LoRARequest]]) -> list[RequestOutput]:
        engine = self.llm_engine
        # Validate everything before queueing anything, so a bad prompt leaves no half-run batch.
        prepared = [engine.prepare_request(str(next(self._counter)), p, sp, lora_request=lora)
                    for p, sp, lora in zip(prompts, params_list, loras)]
        for p in prepared:  # as vLLM's LLM: only the final outputs are read (on the prepared copy)
            p.params.output_kind = RequestOutputKind.FINAL_ONLY
        order = {p.request_id: i for i, p in enumerate(prepared)}
        bar = tqdm(total=len(prepared), desc="Processed prompts", unit="req", dynamic_ncols=True,
                   disable=not (use_tqdm and len(prepared) > 1))
        results: list[Optional[RequestOutput]] = [None] * len(prepared)
        with self._pause:
            if self._paused_by == threading.get_ident():
                raise RuntimeError("generation is paused (pause_generation()): call "
                                   "resume_generation() first")
            self._pause.wait_for(lambda: self._paused_by is None)
            self._generating = True
        try:
            for p in prepared:
                engine.admit_request(p)
            while engine.has_unfinished_requests():
                for out in engine.retract_requests() if self._retract else engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request(list(order))
            raise
        finally:
            bar.close()
            with self._pause:
                self._generating = False
                self._pause.notify_all()
        return results  # type: ignore[return-value]

