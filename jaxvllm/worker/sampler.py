"""On-device sampler, called inside the engine's jitted step.

Semantics follow vLLM v1's sampler:

* Returned logprobs, ranks and top-k come from the RAW model logits
  (log_softmax before any penalty or temperature: vLLM's default "raw_logprobs").
* Order of processing: min_tokens stop-id masking -> penalties -> (greedy rows: argmax here)
  -> temperature -> min_p -> top_k -> top_p -> sample.
* Each row's random stream depends only on (seed, step): ``fold_in(key(seed), step)``, then
  Gumbel-max over the processed logits. Identical requests with the same seed produce identical
  tokens wherever they sit in the batch.

Penalties and min_tokens masking read each row's *token bits* (int32 [R, V], see
:func:`token_bits`): ``PROMPT_BIT`` for a token in the prompt, ``STOP_BIT`` for a stop id masked
while min_tokens is not reached, and ``COUNT_UNIT`` times the token's count in the output. The
engine keeps them on the device (worker/token_table.py), so their size never depends on the length
of a request and no step waits for the host.

Everything is fixed-shape, with no Python loops over rows and no host syncs. ``mode`` (and the
optional ``topk_bound``) are static: the model runner picks them on the host from the batch's
parameters (see :func:`sampling_mode` and :func:`topk_bound_for`). Logprobs are a function of
their own (:func:`token_logprobs`), run after :func:`sample` only for batches that ask for them:
inside the sampler they were a static width that doubled its variants compiled at start-up, and
made every batch compute a logsumexp and a rank over the vocabulary that few requests read.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.sampling_params import GREEDY_EPS
from pallas_kernels.reference import ordered_sum

MODES = ("greedy", "random", "random_sort")
# Static top-k widths the runner may pass as ``topk_bound`` (one executable per value used).
# Up to 16, XLA:GPU's TopK runs a dedicated kernel (~10x cheaper than a sort over V = 128k);
# 64 uses the two-stage top-k below. Above that a full sort is about as cheap.
TOPK_BOUNDS = (16, 64)

_NEG_INF = float("-inf")

# Token bits: one int32 per (row, vocabulary id). Prompt and stop bits are set once per distinct id,
# the output count is added per occurrence, so every contribution is a plain scatter-add.
PROMPT_BIT = 1
STOP_BIT = 2
COUNT_UNIT = 4

_FIELDS = (
    "temperature", "top_k", "top_p", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seeds", "steps", "min_tokens_active", "token_bits", "draft_ids",
)


@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters, padded to R rows (numpy on the host, jax.Array on device)."""
    temperature: jax.Array        # f32[R]; < GREEDY_EPS = greedy
    top_k: jax.Array              # i32[R]; 0 = off
    top_p: jax.Array              # f32[R]; 1 = off
    min_p: jax.Array              # f32[R]; 0 = off
    presence_penalty: jax.Array   # f32[R]
    frequency_penalty: jax.Array  # f32[R]
    repetition_penalty: jax.Array  # f32[R]; 1 = off
    seeds: jax.Array              # u32[R] or i32[R]
    steps: jax.Array              # i32[R]; index of the output token being sampled
    min_tokens_active: jax.Array  # bool[R]; mask the row's STOP_BIT ids
    token_bits: jax.Array         # i32[R, V] (see token_bits()), or i32[R, 0]: no penalties/masking
    # Speculative decoding: the guess each row verifies (-1: none, the row samples freely); None
    # without speculative decoding.
    draft_ids: Optional[jax.Array] = None


jax.tree_util.register_dataclass(SamplingTensors, data_fields=list(_FIELDS), meta_fields=[])


class SamplerOutput(NamedTuple):
    token_ids: jax.Array      # i32[R]
    accepted: Optional[jax.Array] = None  # bool[R]: the row's guess was kept (with draft_ids)
    # bool[R] (with draft_ids): the row's token is output, every guess before it in its request
    # having been kept.
    counted: Optional[jax.Array] = None
    # f32[R, V], with a "processed_*" logprobs_mode only: the logits each token was drawn from,
    # which token_logprobs then reads (in the raw modes it reads the model's logits).
    processed: Optional[jax.Array] = None


class TokenLogprobs(NamedTuple):
    logprob: jax.Array        # f32[R]   log-prob of the token (raw: under the model's logits)
    rank: jax.Array           # i32[R]   1-based rank of the token in that distribution
    topk_ids: jax.Array       # i32[R, k]
    topk_logprobs: jax.Array  # f32[R, k]


# ----------------------------------------------------------------------------------------------
# Host-side helpers for the model runner (numpy, cheap).


def token_bit_entries(prompt_ids: Sequence[int], output_ids: Sequence[int] = (),
                      stop_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary ids, values) whose scatter-add into a zeroed row gives that row's token bits;
    ids need not be in range (out-of-range ones are dropped by the scatter)."""
    parts = []
    for ids, unit in ((prompt_ids, PROMPT_BIT), (stop_ids, STOP_BIT)):
        if len(ids):
            parts.append((np.unique(np.asarray(ids, np.int64)), None, unit))
    if len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        parts.append((ids, counts, COUNT_UNIT))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    ids = np.concatenate([p[0] for p in parts])
    vals = np.concatenate([np.full(len(p[0]), p[2], np.int32) if p[1] is None
                           else (p[1] * p[2]).astype(np.int32) for p in parts])
    return ids, vals


def token_bits(vocab_size: int, prompt_ids: Sequence[int], output_ids: Sequence[int] = (),
               stop_ids: Sequence[int] = ()) -> np.ndarray:
    """One row of token bits (int32 [vocab_size]) for a request's prompt, its output so far and
    the stop ids min_tokens masks."""
    ids, vals = token_bit_entries(prompt_ids, output_ids, stop_ids)
    row = np.zeros(vocab_size, np.int32)
    ok = (ids >= 0) & (ids < vocab_size)
    np.add.at(row, ids[ok], vals[ok])
    return row


def sampling_mode(temperature: Sequence[float] | np.ndarray, top_k: Sequence[int] | np.ndarray,
                  top_p: Sequence[float] | np.ndarray) -> str:
    """The static ``mode`` for a batch, from its real (unpadded) rows."""
    temperature = np.asarray(temperature, np.float32)
    if temperature.size == 0 or bool(np.all(temperature < GREEDY_EPS)):
        return "greedy"
    rnd = temperature >= GREEDY_EPS
    top_k = np.asarray(top_k)
    top_p = np.asarray(top_p, np.float32)
    if bool(np.any(rnd & ((top_k > 0) | (top_p < 1.0)))):
        return "random_sort"
    return "random"


def topk_bound_for(temperature, top_k, top_p, bounds: Sequence[int] = TOPK_BOUNDS) -> int:
    """Smallest static bound B such that "random_sort" may use a top-B partial sort instead of a
    full sort over V, or 0 when a full sort is needed (some random row uses top_p without top_k,
    or top_k above the largest bound)."""
    temperature = np.asarray(temperature, np.float32)
    top_k = np.asarray(top_k)
    top_p = np.asarray(top_p, np.float32)
    rnd = temperature >= GREEDY_EPS
    if bool(np.any(rnd & (top_k <= 0) & (top_p < 1.0))):
        return 0
    need = int(np.max(np.where(rnd, top_k, 0), initial=0))
    for b in bounds:
        if need <= b:
            return int(b)
    return 0


# ----------------------------------------------------------------------------------------------
# Device-side pieces.


def _safe_lse(x: jax.Array, invariant: bool = False) -> jax.Array:
    """logsumexp over the last axis, keepdims; 0 for rows that are all -inf (so that
    x - lse is -inf there, not NaN). `invariant`: summed in a fixed order (batch-invariant mode)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(x - m)
    s = ordered_sum(e) if invariant else jnp.sum(e, axis=-1, keepdims=True)
    return jnp.where(s > 0, m + jnp.log(s), 0.0)


_TOPK_DIRECT_MAX = 16  # XLA:GPU has a fast TopK kernel up to here; larger k lowers to a sort
_TOPK_CHUNKS = 256


def _top_k(x: jax.Array, k: int):
    """Exact ``lax.top_k`` over the last axis of [N, V] (values, int32 ids).

    For k above the fast-kernel limit and large V, a two-stage top-k: top-k within each of
    256 chunks, then top-k of the 256*k candidates (about 1.5x cheaper than one top-k over V
    on an H100 at V = 128k, k = 20..64)."""
    n, v = x.shape
    w = -(-v // _TOPK_CHUNKS)
    if k <= _TOPK_DIRECT_MAX or w < 2 * k:
        vals, ids = jax.lax.top_k(x, k)
        return vals, ids.astype(jnp.int32)
    xp = jnp.pad(x, ((0, 0), (0, w * _TOPK_CHUNKS - v)), constant_values=_NEG_INF)
    vals, ids = jax.lax.top_k(xp.reshape(n, _TOPK_CHUNKS, w), k)
    ids = ids.astype(jnp.int32) + (jnp.arange(_TOPK_CHUNKS, dtype=jnp.int32) * w)[None, :, None]
    vals2, pos = jax.lax.top_k(vals.reshape(n, _TOPK_CHUNKS * k), k)
    ids2 = jnp.take_along_axis(ids.reshape(n, _TOPK_CHUNKS * k), pos, axis=-1)
    return vals2, jnp.minimum(ids2, v - 1)


def token_logprobs(values: jax.Array, token_ids: jax.Array, num_logprobs: int = 0,
                   as_logits: bool = False, invariant: bool = False) -> TokenLogprobs:
    """Logprob, rank and the top ``num_logprobs`` (static) of ``token_ids`` (i32[N]) under
    log_softmax(values) (f32/bf16 [N, V]), or with ``as_logits`` the values themselves (ranks and
    top-k the same). `invariant`: batch-invariant mode (the logsumexp summed in a fixed order)."""
    raw = values.astype(jnp.float32)
    n = raw.shape[0]
    lse = 0.0 if as_logits else _safe_lse(raw, invariant)
    tok = jnp.take_along_axis(raw, token_ids[:, None].astype(jnp.int32), axis=-1)  # [N, 1]
    logprob = (tok - lse)[:, 0]
    # Rank in raw-logit space (same order as logprobs, without extra rounding).
    # As vLLM: the count of tokens at least as likely, so tied tokens rank below each other.
    rank = jnp.sum(raw >= tok, axis=-1).astype(jnp.int32)
    if num_logprobs > 0:
        vals, topk_ids = _top_k(raw, num_logprobs)
        topk_lp = vals - lse
    else:
        topk_ids = jnp.zeros((n, 0), jnp.int32)
        topk_lp = jnp.zeros((n, 0), jnp.float32)
    return TokenLogprobs(logprob, rank, topk_ids, topk_lp)


def _argmax_or(x: jax.Array, fallback: jax.Array) -> jax.Array:
    """Row argmax of x; where a row of x is all -inf (or NaN), the argmax of ``fallback``."""
    ok = jnp.max(x, axis=-1) > _NEG_INF
    return jnp.where(ok, jnp.argmax(x, axis=-1), jnp.argmax(fallback, axis=-1)).astype(jnp.int32)


def _mask_stop_ids(x: jax.Array, bits: jax.Array, active: jax.Array) -> jax.Array:
    return jnp.where(active[:, None] & ((bits & STOP_BIT) != 0), _NEG_INF, x)


def _apply_penalties(x: jax.Array, bits: jax.Array, t: SamplingTensors) -> jax.Array:
    seen = (bits & ~STOP_BIT) != 0  # in the prompt or the output
    counts = (bits // COUNT_UNIT).astype(jnp.float32)
    rep = t.repetition_penalty.astype(jnp.float32)[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    freq = t.frequency_penalty.astype(jnp.float32)[:, None]
    pres = t.presence_penalty.astype(jnp.float32)[:, None]
    return x - freq * counts - pres * (counts > 0).astype(jnp.float32)


def _apply_min_p(x: jax.Array, min_p: jax.Array) -> jax.Array:
    # p_i < min_p * p_max  <=>  x_i - x_max < log(min_p)   (log(0) = -inf: nothing dropped)
    xmax = jnp.max(x, axis=-1, keepdims=True)
    cut = xmax + jnp.log(min_p.astype(jnp.float32))[:, None]
    return jnp.where(x < cut, _NEG_INF, x)


def _apply_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array,
                       topk_bound: int) -> jax.Array:
    """Top-k then top-p (over the renormalized top-k set), as a per-row logit threshold.

    One descending sort of values (or a top-``topk_bound`` partial sort), no argsort and no
    scatter back: the kept set is {x >= threshold}. Ties at the threshold are kept.
    """
    r, v = x.shape
    if 0 < topk_bound < v:
        srt, _ = _top_k(x, topk_bound)
        w = topk_bound
    else:
        srt = -jnp.sort(-x, axis=-1)  # descending; -inf last
        w = v
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, w), w)
    pos = jnp.arange(w, dtype=jnp.int32)[None, :]
    in_k = pos < k[:, None]
    srt_k = jnp.where(in_k, srt, _NEG_INF)
    m = srt_k[:, :1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(srt_k - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(s > 0, s, 1.0)
    cum = jnp.cumsum(probs, axis=-1)
    excl = jnp.concatenate([jnp.zeros((r, 1), cum.dtype), cum[:, :-1]], axis=-1)
    keep = in_k & ((excl < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    thr = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)  # [R, 1]
    no_filter = ((top_k <= 0) | (top_k >= v)) & (top_p >= 1.0)
    thr = jnp.where(no_filter[:, None], _NEG_INF, thr)
    return jnp.where(x < thr, _NEG_INF, x)


def _row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        seeds, steps.astype(jnp.uint32))


def _gumbel_rows(keys: jax.Array, v: int) -> jax.Array:
    return jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32))(keys)


# The acceptance draw's stream, apart from the Gumbel noise of the same row.
_ACCEPT_STREAM = 0x5EC


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Structured outputs: the logits (f32) with every token a row's grammar forbids at -inf.
    `bitmask` is int32 [R, ceil(V/32)]: bit j of word w allows token 32w + j."""
    r, v = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(r, -1)[:, :v] != 0
    return jnp.where(allowed, logits.astype(jnp.float32), _NEG_INF)


def apply_logit_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """OpenAI's logit_bias: `values[r, j]` added to the logit of token `ids[r, j]` (padding entries
    add 0)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.astype(jnp.float32).at[rows, ids].add(values)


def apply_token_bits(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """min_tokens stop-id masking and penalties from ``t.token_bits`` (f32 [R, V])."""
    x = logits.astype(jnp.float32)
    if t.token_bits.shape[-1] > 0:
        x = _mask_stop_ids(x, t.token_bits, t.min_tokens_active)
        x = _apply_penalties(x, t.token_bits, t)
    return x


def _process(logits: jax.Array, t: SamplingTensors, mode: str, topk_bound: int = 0,
             raw_logits: Optional[jax.Array] = None):
    """(raw f32 logits, processed logits right before the random draw, greedy token ids).

    For mode "greedy" the processed logits are the penalized ones (no temperature or filters).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    raw = (logits if raw_logits is None else raw_logits).astype(jnp.float32)
    x = apply_token_bits(logits, t)
    greedy_tok = _argmax_or(x, raw)
    if mode == "greedy":
        return raw, x, greedy_tok
    temp = t.temperature.astype(jnp.float32)
    temp = jnp.where(temp < GREEDY_EPS, 1.0, temp)
    x = x / temp[:, None]
    x = _apply_min_p(x, t.min_p)
    if mode == "random_sort":
        x = _apply_top_k_top_p(x, t.top_k, t.top_p, topk_bound)
    return raw, x, greedy_tok


def sample(logits: jax.Array, t: SamplingTensors, *, mode: str, topk_bound: int = 0,
           raw_logits: Optional[jax.Array] = None, logprobs_mode: str = "raw_logprobs",
           invariant: bool = False) -> SamplerOutput:
    """Sample one token per row of ``logits`` (f32/bf16 [R, V]).

    mode (static): "greedy" (every row has temperature 0: argmax, no RNG), "random" (top_k/top_p
    ignored), "random_sort" (some row uses top_k/top_p).
    topk_bound (static, "random_sort" only): 0 = full sort over V; B > 0 = partial top-B sort,
    valid only when every random row has 1 <= top_k <= B or (top_k = 0 and top_p = 1)
    (see :func:`topk_bound_for`).
    raw_logits: the model's logits when ``logits`` come already processed by the caller (e.g.
    :func:`apply_token_bits` in a program of its own); the fallback of rows left all -inf.
    logprobs_mode (static): config.LOGPROBS_MODES; with "processed_*" the output carries the
    logits each token was drawn from (for greedy rows: after penalties and the caller's
    processing, without temperature), for :func:`token_logprobs`.
    invariant (static): batch-invariant mode (the acceptance test's sums in a fixed order).
    """
    raw, x, greedy_tok = _process(logits, t, mode, topk_bound, raw_logits)
    d = t.draft_ids
    accepted = None
    if d is not None:  # a row's guess stands where the greedy token is the guess
        accepted = (d >= 0) & (greedy_tok == d)
    if mode == "greedy":
        tok = greedy_tok
    else:
        keys = _row_keys(t.seeds, t.steps)
        drawn_from = x
        if d is not None:
            drawn_from, rand_accepted = _verify_guesses(x, d, keys, invariant)
        rand_tok = _argmax_or(drawn_from + _gumbel_rows(keys, raw.shape[-1]), raw)
        greedy_row = t.temperature < GREEDY_EPS
        if d is not None:
            rand_tok = jnp.where(rand_accepted, d, rand_tok)
            accepted = jnp.where(greedy_row, accepted, rand_accepted)
        tok = jnp.where(greedy_row, greedy_tok, rand_tok)
    return SamplerOutput(tok, accepted, None if d is None else counted_rows(d, accepted),
                         x if logprobs_mode.startswith("processed") else None)


def _request_first_rows(draft_ids: jax.Array) -> jax.Array:
    """Each row's request's first row. A request's rows are one per guess it verifies (draft id
    >= 0) and the row after its last guess (-1), so a request starts after a row without one."""
    r = jnp.arange(draft_ids.shape[0])
    first = (r == 0) | (jnp.roll(draft_ids, 1) < 0)
    return jax.lax.cummax(jnp.where(first, r, 0))


def counted_rows(draft_ids: jax.Array, accepted: jax.Array) -> jax.Array:
    """bool[R]: the row's token is output (every guess before it in its request was kept)."""
    rejected = ((draft_ids >= 0) & ~accepted).astype(jnp.int32)
    before = jnp.cumsum(rejected) - rejected
    return before == before[_request_first_rows(draft_ids)]


def count_guesses(bits: jax.Array, draft_ids: jax.Array, num_guesses: int) -> jax.Array:
    """Token bits (i32[R, V]) of verification rows: a row samples after the guesses before it in
    its request (at most `num_guesses`), so those count as output tokens for its penalties and
    min_tokens, as they would had they been sampled one at a time."""
    first = _request_first_rows(draft_ids)
    r = jnp.arange(draft_ids.shape[0])
    for m in range(1, num_guesses + 1):
        src = r - m
        tok = jnp.where(src >= first, draft_ids[jnp.maximum(src, 0)], bits.shape[-1])  # else dropped
        bits = bits.at[r, tok].add(COUNT_UNIT, mode="drop")
    return bits


def _verify_guesses(x: jax.Array, d: jax.Array, keys: jax.Array, invariant: bool
                    ) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of a guess made with certainty (prompt lookup: q(d) = 1) against the
    row's distribution p = softmax(x): kept with probability p(d); otherwise the row's token is
    drawn from the residual max(p - q, 0), which is p without d, renormalized. Returns (x with a
    row's guess at -inf, for that draw; whether the guess was kept). So every row's token is
    distributed as p whatever the guess. Rows without one (d < 0) are untouched."""
    has = d >= 0
    dc = jnp.maximum(d, 0)[:, None]
    p_d = jnp.exp(jnp.take_along_axis(x, dc, axis=-1) - _safe_lse(x, invariant))[:, 0]
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _ACCEPT_STREAM)))(keys)
    kept = has & (u < p_d)
    guess = has[:, None] & (jnp.arange(x.shape[-1], dtype=jnp.int32)[None, :] == dc)
    return jnp.where(guess, _NEG_INF, x), kept


def prompt_logprobs(logits: jax.Array, target_ids: jax.Array, *, num_logprobs: int = 0,
                    as_logits: bool = False, invariant: bool = False):
    """Raw (logprob f32[N], rank i32[N], topk_ids i32[N, k], topk_logprobs f32[N, k]) of
    ``target_ids`` (the next prompt token at each position), or the logits with ``as_logits``.
    Negative targets (padding) are read as token 0; the caller drops those rows."""
    tgt = jnp.clip(target_ids.astype(jnp.int32), 0, logits.shape[-1] - 1)
    return token_logprobs(logits, tgt, num_logprobs, as_logits, invariant)

