"""Host side of a step: per-request state the runner keeps, and the padded numpy arrays of one batch.

Requests arrive whole once (NewRequestData), then only as deltas (CachedRequestData); the runner
appends the tokens it samples itself, so the scheduler never re-sends token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np

from jaxvllm.core.outputs import NewRequestData, SchedulerOutput
from jaxvllm.sampling_params import SamplingParams
from jaxvllm.spec_decode import NgramIndex
from jaxvllm.worker.sampler import SamplingTensors
from jaxvllm.worker.token_table import TokenTable

# Padded tokens' K/V go to an out-of-range slot, which the cache scatter drops: block 0 (never handed
# out) stays zero, so a kernel's masked-off reads (redirected to slot 0) never meet garbage or NaN.
PAD_SLOT = np.iinfo(np.int32).max


# SamplingInputs.floats' rows, in this order.
FLOAT_KNOBS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty")
_FLOAT_PAD = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)  # padding rows: greedy, no-ops


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    table_row: int   # its row of InputBatch.block_table
    num_blocks: int  # KV-cache blocks it holds (the row's first num_blocks entries)
    seed: int
    slot: int = -1  # its row of the token table; -1: none (no penalties, nothing to mask)
    lora_id: int = 0  # its LoRA adapter (0: none)
    num_inflight: int = 0  # sampled on device by a dispatched step, not yet appended to token_ids
    ngrams: Optional[NgramIndex] = field(default=None, repr=False)  # its n-grams, when guessing

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, including those still on the device."""
        return len(self.token_ids) + self.num_inflight - self.num_prompt_tokens


@dataclass
class StepBatch:
    """One step's arrays, padded to the bucket (T tokens, R requests)."""
    req_ids: list[str]              # batch order, len = num_reqs
    num_tokens: int
    token_ids: np.ndarray           # int32[T]
    positions: np.ndarray           # int32[T]
    slot_mapping: np.ndarray        # int32[T]
    query_start_loc: np.ndarray     # int32[R+1]
    seq_lens: np.ndarray            # int32[R]
    block_tables: np.ndarray        # int32[R, max_blocks]
    num_seqs: np.ndarray            # int32[1]
    logits_indices: np.ndarray      # int32[L]: the tokens whose logits are sampled (logits_rows)
    sample_mask: np.ndarray         # bool[R]: this request's chunk ends at its last token
    prev_rows: np.ndarray           # int32[T]: row of the previous step's samples holding this
                                    # token's id (a token still on the device), else -1
    # Requests asking for prompt logprobs: (req_id, batch offset, first position, count); the logits
    # at position p score prompt token p + 1.
    prompt_logprob_spans: list[tuple[str, int, int, int]] = field(default_factory=list)
    lora_slots: Optional[np.ndarray] = None  # int32[T]: each token's LoRA slot (-1: none)
    # Speculative decoding: each request's guesses, whose logits rows follow its own (None:
    # speculative decoding off, row i is request i's alone).
    num_drafts: Optional[np.ndarray] = None   # int32[num_reqs]
    draft_ids: Optional[np.ndarray] = None    # int32[L]: the guess each row verifies, -1: none
    table_rows: Optional[np.ndarray] = None   # int64[num_reqs]: each request's InputBatch row

    @property
    def row_starts(self) -> np.ndarray:
        """Each request's first logits row."""
        if self.num_drafts is None:
            return np.arange(len(self.req_ids))
        return np.concatenate(([0], np.cumsum(1 + self.num_drafts)[:-1])).astype(np.int32)

    @property
    def num_rows(self) -> int:
        """Logits rows in use (the rest is padding)."""
        n = len(self.req_ids)
        return n if self.num_drafts is None else n + int(self.num_drafts.sum())


class InputBatch:
    def __init__(self, block_size: int, max_blocks_per_seq: int, token_buckets: tuple[int, ...],
                 max_num_seqs: int, rng_seed: int, token_table: TokenTable,
                 num_speculative_tokens: int = 0) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.token_buckets = token_buckets
        self.max_num_seqs = max_num_seqs
        self.num_speculative_tokens = num_speculative_tokens
        self.requests: dict[str, RequestState] = {}
        self.token_table = token_table
        self._seed_rng = np.random.default_rng(rng_seed)
        self.last_rows: dict[str, int] = {}  # req_id -> its sample row in the last built step
        self.biased: set[str] = set()  # requests with a logit_bias: a step without any skips it
        # Every request's block ids, a row each, kept across steps: a step copies its requests'
        # rows in one gather instead of converting each request's block list (measured ~20% of
        # build() at 256 decode rows).
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), np.int32)
        # Likewise each request's constant sampling knobs, a column each: FLOAT_KNOBS, and top_k,
        # seed (its low 32 bits), token-table row and min_tokens (a step gathers its requests'
        # columns instead of collecting them request by request: ~2 us a request).
        self.float_knobs = np.zeros((len(FLOAT_KNOBS), max_num_seqs), np.float32)
        self.int_knobs = np.zeros((4, max_num_seqs), np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def request_bucket(self, t_bucket: int) -> int:
        return min(t_bucket, self.max_num_seqs)

    def logits_rows(self, t_bucket: int) -> int:
        """Logits rows of a bucket: one per request, and with speculative decoding one per guess."""
        return min(t_bucket, self.max_num_seqs * (1 + self.num_speculative_tokens))

    def token_bucket(self, num_tokens: int) -> int:
        for b in self.token_buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_buckets[-1]}")

    def update(self, scheduler_output: SchedulerOutput) -> None:
        for rid in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
            state = self.requests.pop(rid, None)
            self.biased.discard(rid)
            if state is not None:
                self._free_rows.append(state.table_row)
                if state.slot >= 0:
                    self.token_table.release(state.slot)
        for new_req in scheduler_output.new_reqs:
            self.requests[new_req.req_id] = self._new_state(new_req)
            if new_req.sampling_params.logit_bias:
                self.biased.add(new_req.req_id)
        table = self.block_table
        for cached_req in scheduler_output.cached_reqs:
            new = cached_req.new_block_ids
            if new:
                state = self.requests[cached_req.req_id]
                table[state.table_row, state.num_blocks:state.num_blocks + len(new)] = new
                state.num_blocks += len(new)

    def _table_row(self, block_ids: list[int]) -> int:
        if not self._free_rows:  # the scheduler runs at most max_num_seqs
            raise RuntimeError(f"more than max_num_seqs ({self.max_num_seqs}) requests in the "
                               f"batch: the scheduler's finished requests were not released")
        row = self._free_rows.pop()
        self.block_table[row] = 0  # a recycled row: no stale ids past the request's blocks
        self.block_table[row, :len(block_ids)] = block_ids
        return row

    def _new_state(self, new_req: NewRequestData) -> RequestState:
        sp = new_req.sampling_params
        # Unseeded requests get a seed here, so every request's random stream is (seed, position).
        seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(0, 2**31 - 1))
        slot = -1
        masks = bool(sp.min_tokens and sp.all_stop_token_ids)
        if sp.has_penalties or masks:
            pen = sp.has_penalties
            slot = self.token_table.assign(new_req.prompt_token_ids if pen else (),
                                           new_req.output_token_ids if pen else (),
                                           sorted(sp.all_stop_token_ids) if masks else ())
        row = self._table_row(new_req.block_ids)
        self.float_knobs[:, row] = [getattr(sp, k) for k in FLOAT_KNOBS]
        # Any Python int seed, as its low 32 bits in an int32 lane.
        self.int_knobs[:, row] = (sp.top_k, np.uint32(seed & 0xFFFFFFFF).view(np.int32), slot,
                                  sp.min_tokens)
        return RequestState(
            req_id=new_req.req_id,
            token_ids=list(new_req.prompt_token_ids) + list(new_req.output_token_ids),
            num_prompt_tokens=len(new_req.prompt_token_ids), params=sp, table_row=row,
            num_blocks=len(new_req.block_ids), seed=seed, slot=slot, lora_id=new_req.lora_id)

    def build(self, scheduler_output: SchedulerOutput) -> StepBatch:
        req_ids = list(scheduler_output.num_scheduled_tokens)
        counts = np.fromiter(scheduler_output.num_scheduled_tokens.values(), dtype=np.int64,
                             count=len(req_ids))
        total = int(counts.sum())
        t_bucket = self.token_bucket(total)
        r_bucket = self.request_bucket(t_bucket)
        bs = self.block_size

        token_ids = np.zeros(t_bucket, np.int32)
        positions = np.zeros(t_bucket, np.int32)
        slot_mapping = np.full(t_bucket, PAD_SLOT, np.int32)
        qsl = np.full(r_bucket + 1, total, np.int32)
        qsl[0] = 0
        seq_lens = np.zeros(r_bucket, np.int32)
        block_tables = np.zeros((r_bucket, self.max_blocks), np.int32)
        drafts = scheduler_output.scheduled_spec_decode_tokens
        l_rows = self.logits_rows(t_bucket)
        logits_indices = np.zeros(l_rows, np.int32)
        sample_mask = np.zeros(r_bucket, bool)
        spec = self.num_speculative_tokens > 0
        if spec:
            num_drafts = np.zeros(len(req_ids), np.int32)
            draft_ids = np.full(l_rows, -1, np.int32)
        row = 0
        prev_rows = np.full(t_bucket, -1, np.int32)
        spans = []
        last_rows = self.last_rows
        self.last_rows = {}

        # Tokens each request has in the cache before this step: the scheduler's count.
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.new_reqs}
        computed.update((r.req_id, r.num_computed_tokens) for r in scheduler_output.cached_reqs)
        # Per request: only what needs its Python state; per-token arrays are vectorized below.
        starts = np.empty(len(req_ids), np.int64)
        table_rows = np.empty(len(req_ids), np.int64)
        offset = 0
        for i, (rid, n) in enumerate(zip(req_ids, counts.tolist())):
            state = self.requests[rid]
            start = starts[i] = computed[rid]
            guesses = drafts.get(rid, ()) if spec else ()
            k = len(guesses)
            end = start + n - k  # the guesses follow its known tokens
            known = len(state.token_ids)
            if end <= known:
                token_ids[offset:offset + n - k] = state.token_ids[start:end]
            else:  # the last token is the previous step's sample, still on the device
                if n - k > 1:  # a decode has no other
                    token_ids[offset:offset + n - k - 1] = state.token_ids[start:end - 1]
                prev_rows[offset + n - k - 1] = last_rows[rid]
            table_rows[i] = state.table_row
            if k:
                num_drafts[i] = k
                token_ids[offset + n - k:offset + n] = guesses
                draft_ids[row:row + k] = guesses
            if end == known + state.num_inflight:
                sample_mask[i] = True
                if k:
                    logits_indices[row:row + k + 1] = np.arange(offset + n - k - 1, offset + n)
                else:
                    logits_indices[row] = offset + n - 1
                state.num_inflight += 1
                self.last_rows[rid] = row + k
            row += 1 + k
            if state.params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
                # Position p's logits score prompt token p+1.
                last = min(end, state.num_prompt_tokens - 1)
                spans.append((rid, offset, start, last - start))
            offset += n
        nreq = len(req_ids)
        block_tables[:nreq] = self.block_table[table_rows]
        seq_lens[:nreq] = starts + counts
        np.cumsum(counts, out=qsl[1:nreq + 1])
        seq_of_token = np.repeat(np.arange(nreq), counts)
        pos = np.arange(total) + np.repeat(starts - qsl[:nreq], counts)
        positions[:total] = pos
        slot_mapping[:total] = block_tables[seq_of_token, pos // bs] * bs + pos % bs
        return StepBatch(req_ids, total, token_ids, positions, slot_mapping, qsl, seq_lens,
                         block_tables, np.array([len(req_ids)], np.int32), logits_indices,
                         sample_mask, prev_rows, spans, table_rows=table_rows,
                         **(dict(num_drafts=num_drafts, draft_ids=draft_ids) if spec else {}))

    def sampling_inputs(self, batch: StepBatch) -> "SamplingInputs":
        """The batch's sampling parameters, one column per logits row, padded to L rows; with
        speculative decoding a request's columns repeat over its guesses' rows."""
        r = len(batch.logits_indices)
        spec = batch.draft_ids is not None
        states = [self.requests[rid] for rid in batch.req_ids]
        n = len(states)
        floats, ints = (np.zeros(s, d) for s, d in zip(sampling_shapes(r, spec),
                                                       (np.float32, np.int32)))
        floats[:] = _FLOAT_PAD[:, None]
        ints[4] = self.token_table.num_slots
        if spec:
            ints[5] = batch.draft_ids
        if n:
            rows = batch.table_rows
            floats[:, :n] = self.float_knobs[:, rows]
            top_k, seeds, slots, min_tokens = self.int_knobs[:, rows]
            ints[0, :n], ints[1, :n] = top_k, seeds
            # build() already counted this step's sample as pending: it is output number k - 1.
            ints[2, :n] = np.fromiter((s.num_output_tokens for s in states), np.int32, n) \
                - batch.sample_mask[:n]
            # Only a row that samples reads its token bits and counts its token in them.
            has_row = (slots >= 0) & batch.sample_mask[:n]
            ints[3, :n] = has_row & (ints[2, :n] < min_tokens)
            ints[4, :n] = np.where(has_row, slots, self.token_table.num_slots)
            if spec:  # a request's column over its rows; each guess's samples the next token
                rows = 1 + batch.num_drafts
                of_row = np.repeat(np.arange(n), rows)
                m = len(of_row)
                floats[:, :m] = floats[:, of_row]
                ints[:5, :m] = ints[:5, of_row]
                ints[2, :m] += np.arange(m) - np.repeat(batch.row_starts, rows)
                ints[3, :m] = has_row[of_row] & (ints[2, :m] < min_tokens[of_row])
        return SamplingInputs(floats, ints)


class SamplingInputs(NamedTuple):
    """A batch's sampling parameters packed for the device (two arrays: two host->device copies),
    one column per row. `floats` [6, R]: temperature, top_p, min_p, presence, frequency and
    repetition penalties. `ints` [5, R] (speculative decoding: [6, R]): top_k, seed, index of the
    output token being sampled, min_tokens still masking stop ids (0/1), token-table row
    (num_slots: none) and the guess the row verifies (-1: none)."""
    floats: Any
    ints: Any

    @property
    def temperature(self) -> Any:
        return self.floats[0]

    @property
    def top_p(self) -> Any:
        return self.floats[1]

    @property
    def top_k(self) -> Any:
        return self.ints[0]

    @property
    def slots(self) -> Any:
        return self.ints[4]

    def tensors(self, token_bits: Any) -> SamplingTensors:
        """The sampler's view (on the device, inside a jitted call)."""
        f, i = self.floats, self.ints
        return SamplingTensors(**{k: f[j] for j, k in enumerate(FLOAT_KNOBS)}, top_k=i[0],
                               seeds=i[1], steps=i[2], min_tokens_active=i[3] != 0,
                               token_bits=token_bits, draft_ids=i[5] if len(i) > 5 else None)


def sampling_shapes(rows: int, speculative: bool = False
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of `SamplingInputs`' floats and ints for `rows` rows."""
    return (len(_FLOAT_PAD), rows), (5 + speculative, rows)


def default_token_buckets(max_num_batched_tokens: int, smallest: int = 8) -> tuple[int, ...]:
    buckets, b = [], smallest
    while b < max_num_batched_tokens:
        buckets.append(b)
        b *= 2
    buckets.append(max_num_batched_tokens)
    return tuple(buckets)
