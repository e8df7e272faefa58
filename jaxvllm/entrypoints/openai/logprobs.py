"""OpenAI-shaped logprobs from the engine's per-step {token id: Logprob} dicts.

Token strings come from the engine's `decoded_token` when it has one, else from decoding the id
alone.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from jaxvllm.entrypoints.openai.protocol import clean_logprob

logger = logging.getLogger(__name__)

# Token ids already reported as undecodable: one warning per id, not one per response or stream chunk.
_undecodable: set[int] = set()


def decode_token(tokenizer: Any, tid: int) -> str:
    """The text of one token id. A model without a tokenizer has no token text: its ids are shown
    as "token_id:<id>" (vLLM's spelling), which keeps top_logprobs keys distinct."""
    if tokenizer is None:
        return f"token_id:{tid}"
    try:
        return tokenizer.decode([tid])
    except (LookupError, OverflowError) as e:
        # What a tokenizer raises for an id it has no entry for (slow tokenizers: IndexError or
        # KeyError; the Rust one: OverflowError past 2**32). Such an id shows as "" rather than
        # failing the whole response; any other error is a bug and propagates.
        if tid not in _undecodable:
            _undecodable.add(tid)
            logger.warning("token id %d cannot be decoded by the tokenizer (%s: %s); it is shown "
                           "as \"\"", tid, type(e).__name__, e)
        return ""


def _token_str(tokenizer: Any, tid: int, lp: Any) -> str:
    s = getattr(lp, "decoded_token", None)
    return s if isinstance(s, str) else decode_token(tokenizer, tid)


def _by_rank(step: dict) -> list[tuple[int, Any]]:
    return sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                -kv[1].logprob))


def _top(tid: int, step: dict, num: int) -> list[tuple[int, Any]]:
    # The sampled token counts among the top `num` only when its rank puts it there.
    return [(t, lp) for t, lp in _by_rank(step)
            if t != tid or (lp.rank is not None and lp.rank <= num)][:num]


def completion_logprobs(tokenizer: Any, token_ids: list[int], steps: list, num: int,
                        offset: int) -> dict:
    """The /v1/completions shape; `offset` is the text offset of the first token."""
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for tid, step in zip(token_ids, steps):
        if step is None:
            s = decode_token(tokenizer, tid)
            token_lps.append(None)
            top_lps.append(None)
        else:
            lp = step.get(tid)
            s = _token_str(tokenizer, tid, lp) if lp is not None else decode_token(tokenizer, tid)
            token_lps.append(clean_logprob(lp.logprob) if lp is not None else None)
            top = {}
            if lp is not None:
                top[s] = clean_logprob(lp.logprob)
            for t, l in _top(tid, step, num):
                top.setdefault(_token_str(tokenizer, t, l), clean_logprob(l.logprob))
            top_lps.append(top)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_lps,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, token_ids: list[int], steps: list, num: int) -> dict:
    """The /v1/chat/completions shape."""
    content = []
    for tid, step in zip(token_ids, steps or []):
        step = step or {}
        lp = step.get(tid)
        s = _token_str(tokenizer, tid, lp) if lp is not None else decode_token(tokenizer, tid)
        entry = {"token": s, "logprob": clean_logprob(lp.logprob) if lp is not None else -9999.0,
                 "bytes": list(s.encode("utf-8"))}
        entry["top_logprobs"] = [
            {"token": (ts := _token_str(tokenizer, t, l)), "logprob": clean_logprob(l.logprob),
             "bytes": list(ts.encode("utf-8"))} for t, l in _by_rank(step)[:num]]
        content.append(entry)
    return {"content": content}


def prompt_logprobs(tokenizer: Any, out: Any) -> Optional[list]:
    """vLLM's `prompt_logprobs` field of a completion choice."""
    if out.prompt_logprobs is None:
        return None
    res = []
    for step in out.prompt_logprobs:
        if step is None:
            res.append(None)
        else:
            res.append({str(t): {"logprob": clean_logprob(l.logprob), "rank": l.rank,
                                 "decoded_token": _token_str(tokenizer, t, l)}
                        for t, l in step.items()})
    return res
