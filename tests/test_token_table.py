"""The device token table (worker/token_table.py) against sampler.token_bits, the numpy row it
stands for: rows written in chunks, rows given back and handed out again, samples counted on the
device, and rows without a slot reading zeros."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxvllm.worker import token_table
from jaxvllm.worker.sampler import COUNT_UNIT, PROMPT_BIT, token_bits
from jaxvllm.worker.token_table import TokenTable

V = 40


def _rows(table: TokenTable, slots: list[int]) -> np.ndarray:
    return np.asarray(jax.jit(token_table.read_rows)(table.array, np.asarray(slots, np.int32)))


def test_rows_match_token_bits_across_chunks_and_reuse():
    rng = np.random.default_rng(0)
    table = TokenTable(num_slots=3, vocab_size=V, write_chunk=8)  # most rows take several calls
    reqs = [(rng.integers(0, V, 30), rng.integers(0, V, 12), [3, 7, V + 2]),
            (rng.integers(0, V, 5), [], []),
            ([], [], [0, 1, 2])]
    slots = [table.assign(*r) for r in reqs]
    assert sorted(slots) == [0, 1, 2] and table.num_free == 0
    with pytest.raises(RuntimeError, match="token-table rows"):
        table.assign([1], [], [])
    table.write(table.take_writes())
    got = _rows(table, slots + [table.num_slots])  # the last: no slot
    for row, r in zip(got, reqs):
        np.testing.assert_array_equal(row, token_bits(V, *r))
    assert not got[-1].any()

    # The sampler counts its tokens on the device; a duplicate-free batch of rows.
    sampled = np.array([5, 5, 9], np.int32)
    table.array = jax.jit(token_table.record)(table.array, np.asarray(slots, np.int32), sampled)
    for row, r, tok in zip(_rows(table, slots), reqs, sampled):
        np.testing.assert_array_equal(row, token_bits(V, r[0], list(r[1]) + [tok], r[2]))

    # A row handed out again starts from zero, not from its previous request's bits.
    table.release(slots[0])
    again = table.assign([11, 11], [12], [])
    assert again == slots[0]
    table.write(table.take_writes())
    row = _rows(table, [again])[0]
    np.testing.assert_array_equal(row, token_bits(V, [11], [12]))
    assert row[11] == PROMPT_BIT and row[12] == COUNT_UNIT and np.count_nonzero(row) == 2
