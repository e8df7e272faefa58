"""Reasoning parsers: the split of whole outputs, and streamed pieces (any chunking, tags cut
anywhere) adding up to it."""
from __future__ import annotations

import random

import pytest

from jaxvllm.entrypoints.openai.reasoning import ReasoningStream, check_parser, split_reasoning

CASES = [
    # (parser, output, (reasoning, content))
    ("deepseek_r1", "Let me think.</think>The answer is 4.", ("Let me think.", "The answer is 4.")),
    ("deepseek_r1", "<think>Hmm, 2+2.</think>\n\n4", ("Hmm, 2+2.", "\n\n4")),
    ("deepseek_r1", "still thinking when cut off", ("still thinking when cut off", None)),
    ("deepseek_r1", "</think>only content", (None, "only content")),
    ("deepseek_r1", "a < b and </thinking> is not the tag</think>ok",
     ("a < b and </thinking> is not the tag", "ok")),
    ("qwen3", "<think>\nreason\n</think>\n\nanswer", ("\nreason\n", "\n\nanswer")),
    ("qwen3", "no thinking here", (None, "no thinking here")),
    ("qwen3", "x <think>y</think> z", (None, "x <think>y</think> z")),
    ("qwen3", "<think>cut off", ("cut off", None)),
    ("qwen3", "<thin", (None, "<thin")),
    ("qwen3", "", (None, None)),
]


@pytest.mark.parametrize("parser, text, want", CASES)
def test_split(parser, text, want):
    assert split_reasoning(parser, text) == want


@pytest.mark.parametrize("parser, text, want", CASES)
def test_streamed_pieces_add_up_to_the_split(parser, text, want):
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) \
            if len(text) > 1 else []
        stream, reasoning, content = ReasoningStream(parser), "", ""
        for end in cuts + [len(text)]:
            r, c = stream.update(text[:end], final=end == len(text))
            reasoning, content = reasoning + r, content + c
        assert (reasoning or None, content or None) == want, cuts


def test_a_partial_tag_is_held_back_until_known():
    stream = ReasoningStream("deepseek_r1")
    assert stream.update("step one </thi", final=False) == ("step one ", "")
    assert stream.update("step one </think>Done", final=False) == ("", "Done")
    stream = ReasoningStream("qwen3")
    assert stream.update("<th", final=False) == ("", "")
    assert stream.update("<think>why", final=False) == ("why", "")


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="reasoning_parser"):
        check_parser("granite")
    assert check_parser(None) is None and check_parser("qwen3") == "qwen3"
