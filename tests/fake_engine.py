"""A fake AsyncLLMEngine honouring the engine contract, for fast server tests.

Tokenizer: one token per UTF-8 byte (id = byte + 3; 0 pad, 1 BOS, 2 EOS). Generation is a
deterministic function of (prompt ids, seed, choice index, temperature): greedy requests always give
the same stream. Every request runs to max_tokens: the fake never emits EOS and applies no stop
rules (stop strings, stop ids, min_tokens, ignore_eos); those live in the engine, and test_server.py
tests them against the real one. Each step sleeps `token_delay` seconds, so concurrency,
disconnects and backpressure can be observed.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from jaxvllm.config import EngineArgs
from jaxvllm.core.scheduler import SpecDecodeStats
from jaxvllm.engine.setup import use_server_defaults
from jaxvllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 259
_ALPHABET = "abcdefghij klmnopqrstuvwxyz.,"


class FakeTokenizer:
    eos_token_id = EOS
    bos_token_id = BOS
    pad_token_id = PAD
    eos_token = "</s>"
    bos_token = "<s>"
    chat_template = "fake"
    all_special_ids = [PAD, BOS, EOS]

    def __len__(self) -> int:
        return VOCAB_SIZE

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([BOS] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i >= 3:
                out.append(i - 3)
            elif not skip_special_tokens:
                out += {PAD: b"<pad>", BOS: b"<s>", EOS: b"</s>"}[i]
        return out.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        return [self.decode([i]) for i in ids]

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, **kwargs):
        parts = []
        for m in messages:
            if m["role"] == "boom":
                raise ValueError("roles must alternate")
            parts.append(f"<|{m['role']}|>{m['content']}\n")
        text = "".join(parts)
        if continue_final_message:
            text = text[:-1]
        elif add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=False) if tokenize else text


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)


@dataclass
class FakeModelConfig:
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 512


class FakeEngine:
    def __init__(self, args: Optional[EngineArgs] = None, token_delay: float = 0.002,
                 load_delay: float = 0.0, fail_load: bool = False, script: Optional[str] = None):
        if load_delay:
            time.sleep(load_delay)
        if fail_load:
            raise RuntimeError("fake load failure")
        self.args = args or EngineArgs()
        use_server_defaults(self.args)  # as AsyncLLMEngine.from_engine_args
        self.tokenizer = FakeTokenizer()
        self.model_config = FakeModelConfig()
        self.max_model_len = self.args.max_model_len or 512
        self.token_delay = token_delay
        self.script = script  # the text every output spells, one character a token (repeated)
        self._running: set[str] = set()
        self._waiting: set[str] = set()
        self._slots = asyncio.Semaphore(self.args.max_num_seqs)  # bound lazily to the running loop
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started = False
        self.shut_down = False
        self._prefix_queries = 0
        self._prefix_hits = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kw) -> "FakeEngine":
        return cls(args, **kw)

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True

    def get_stats(self) -> FakeStats:
        n_blocks = 64
        used = min(n_blocks, len(self._running) * 2)
        return FakeStats(num_running=len(self._running), num_waiting=len(self._waiting),
                         kv_cache_usage=used / n_blocks, prefix_cache_queries=self._prefix_queries,
                         prefix_cache_hits=self._prefix_hits)

    def get_replica_stats(self) -> list[FakeStats]:
        return [self.get_stats()]

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    # -- generation -----------------------------------------------------------------------------
    def _token(self, rng: Optional[random.Random], prompt_ids: list[int], i: int, index: int) -> int:
        if self.script is not None:
            c = self.script[i % len(self.script)]
        elif rng is None:
            c = _ALPHABET[(sum(prompt_ids) + i * 7) % len(_ALPHABET)]
        else:
            c = rng.choice(_ALPHABET)
        return ord(c) + 3

    def _logprobs(self, tok: int, k: int, rng_seed: int) -> dict[int, Logprob]:
        d = {tok: Logprob(-0.25, 1, self.tokenizer.decode([tok]))}
        r = 2
        for j in range(k):
            alt = ord(_ALPHABET[(rng_seed + j + 1) % len(_ALPHABET)]) + 3
            if alt in d:
                continue
            d[alt] = Logprob(-0.25 - 0.5 * r, r, self.tokenizer.decode([alt]))
            r += 1
        return d

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str,
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        if lora_request is not None:
            raise ValueError("the fake engine serves no LoRA adapters")
        arrival = time.monotonic()
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        sp = sampling_params
        if not prompt_ids:
            raise ValueError("The prompt cannot be empty.")
        max_tokens = sp.max_tokens if sp.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        ptext = self.tokenizer.decode(prompt_ids)
        if "RAISE_VALUE" in ptext:
            raise ValueError("the fake engine rejects this prompt")
        if "RAISE_INTERNAL" in ptext:
            raise RuntimeError("the fake engine failed")
        n = sp.n
        self._waiting.add(request_id)
        acquired = False
        try:
            await self._slots.acquire()
            acquired = True
            self._waiting.discard(request_id)
            self._running.add(request_id)
            self._prefix_queries += len(prompt_ids)
            self._prefix_hits += len(prompt_ids) // 2
            first_sched = time.monotonic()
            rngs = []
            for i in range(n):
                if sp.greedy:
                    rngs.append(None)
                else:
                    seed = sp.seed if sp.seed is not None else random.getrandbits(32)
                    rngs.append(random.Random(hash((tuple(prompt_ids), seed, i))))
            toks: list[list[int]] = [[] for _ in range(n)]
            lps: list[list] = [[] for _ in range(n)]
            texts = [""] * n
            fin: list[Optional[str]] = [None] * n
            cum = [0.0] * n
            sent_toks, sent_text = [0] * n, [0] * n
            prompt_lps = None
            if sp.prompt_logprobs is not None:
                prompt_lps = [None] + [self._logprobs(t, sp.prompt_logprobs, t) for t in prompt_ids[1:]]
            metrics = {"arrival_time": arrival, "first_scheduled_time": first_sched,
                       "first_token_time": None, "finished_time": None}
            step = 0
            while not all(fin):
                await asyncio.sleep(self.token_delay)
                for i in range(n):
                    if fin[i]:
                        continue
                    t = self._token(rngs[i], prompt_ids, step, i)
                    toks[i].append(t)
                    if sp.logprobs is not None:
                        lps[i].append(self._logprobs(t, sp.logprobs, step))
                    cum[i] += -0.25
                    texts[i] = self.tokenizer.decode(toks[i], skip_special_tokens=sp.skip_special_tokens)
                    if len(toks[i]) >= max_tokens:
                        fin[i] = "length"
                step += 1
                now = time.monotonic()
                if metrics["first_token_time"] is None:
                    metrics["first_token_time"] = now
                done = all(fin)
                if done:
                    metrics["finished_time"] = now
                if "RAISE_MIDSTREAM" in ptext and step == 2:
                    raise RuntimeError("the fake engine failed mid-stream")
                if sp.output_kind == RequestOutputKind.FINAL_ONLY and not done:
                    continue
                # As the engine: DELTA outputs hold what is new since the previous output.
                delta = sp.output_kind == RequestOutputKind.DELTA
                outs = [CompletionOutput(index=i, text=texts[i][sent_text[i]:],
                                         token_ids=toks[i][sent_toks[i]:], cumulative_logprob=cum[i],
                                         logprobs=lps[i][sent_toks[i]:] if sp.logprobs is not None
                                         else None, finish_reason=fin[i])
                        for i in range(n)]
                if delta:
                    sent_toks = [len(t) for t in toks]
                    sent_text = [len(t) for t in texts]
                yield RequestOutput(request_id=request_id, prompt=prompt_text,
                                    prompt_token_ids=list(prompt_ids), prompt_logprobs=prompt_lps,
                                    outputs=outs, finished=done, metrics=dict(metrics))
                if delta:
                    prompt_lps = None if prompt_lps is None else []
            self.finished.append(request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self._waiting.discard(request_id)
            self._running.discard(request_id)
            if acquired:
                self._slots.release()
