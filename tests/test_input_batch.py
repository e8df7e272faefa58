"""The runner's host batch keeps every request's block ids in a row of a table across steps: a
step's block tables are its requests' rows, new blocks land after the old ones, a finished
request's row is reused without its stale ids; a request past max_num_seqs (a scheduler that
released nothing) is an error, not a row shared."""
from __future__ import annotations

import pytest

from jaxvllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from jaxvllm.sampling_params import SamplingParams
from jaxvllm.worker.input_batch import InputBatch
from jaxvllm.worker.token_table import TokenTable

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


def _batch(max_num_seqs: int) -> InputBatch:
    return InputBatch(block_size=4, max_blocks_per_seq=6, token_buckets=(8, 32),
                      max_num_seqs=max_num_seqs, rng_seed=0, token_table=TokenTable(4, 32))


def _new(rid: str, prompt: list[int], blocks: list[int]) -> NewRequestData:
    return NewRequestData(rid, prompt, [], GREEDY, blocks, 0)


def _step(batch: InputBatch, out: SchedulerOutput) -> list[list[int]]:
    """Dispatches `out`; the block-table rows of its requests, up to their blocks' count."""
    batch.update(out)
    step = batch.build(out)
    for rid in out.num_scheduled_tokens:  # as collect() appends the sampled token
        state = batch.requests[rid]
        if state.num_inflight:
            state.token_ids.append(1)
            state.num_inflight -= 1
    return [step.block_tables[i].tolist() for i in range(len(out.num_scheduled_tokens))]


def test_rows_follow_blocks_and_are_reused_clean():
    batch = _batch(max_num_seqs=2)
    rows = _step(batch, SchedulerOutput([_new("a", [1] * 8, [3, 4]), _new("b", [2] * 5, [5, 6])],
                                        [], {"a": 8, "b": 5}, 13))
    assert rows == [[3, 4, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0]]
    # a's ninth token needs a third block; b finishes and c takes its row
    rows = _step(batch, SchedulerOutput([_new("c", [3] * 4, [9])],
                                        [CachedRequestData("a", [7], 8)], {"a": 1, "c": 4}, 5,
                                        finished_req_ids={"b"}))
    assert rows == [[3, 4, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0]]  # nothing of b's [5, 6] left
    for computed in (9, 10, 11):
        _step(batch, SchedulerOutput([], [CachedRequestData("a", [], computed)], {"a": 1}, 1))
    rows = _step(batch, SchedulerOutput([], [CachedRequestData("a", [8], 12)], {"a": 1}, 1))
    assert rows == [[3, 4, 7, 8, 0, 0]]


def test_a_request_past_max_num_seqs_is_an_error():
    batch = _batch(max_num_seqs=1)
    _step(batch, SchedulerOutput([_new("a", [1] * 4, [3])], [], {"a": 4}, 4))
    with pytest.raises(RuntimeError, match="max_num_seqs"):
        batch.update(SchedulerOutput([_new("b", [2] * 4, [4])], [], {"b": 4}, 4))
