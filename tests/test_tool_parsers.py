"""Tool-call parsers: whole outputs, and streamed pieces (any chunking, markers cut anywhere)
adding up to the same content and calls."""
from __future__ import annotations

import json
import random

import pytest

from jaxvllm.entrypoints.openai.tool_parsers import (ToolCallStream, check_parser,
                                                     extract_tool_calls)

WEATHER = {"city": "Paris", "unit": "celsius"}
CASES = [
    # (parser, output, content, [(name, arguments dict)])
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
               '"arguments": {"x": 1}}</tool_call>', None, [("a", {}), ("b", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "cut", "arguments": {"x": [1, 2]}}', None,
     [("cut", {"x": [1, 2]})]),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": '
                    '{"x": 1}}', None, [("a", {}), ("b", {"x": 1})]),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
                '"unit": "celsius"}}]', "Sure.", [("get_weather", WEATHER)]),
    ("mistral", "[TOOL_CALLS] [broken", "[TOOL_CALLS] [broken", []),
    ("mistral", "Plain [TOOL answer.", "Plain [TOOL answer.", []),
]


def _norm(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_whole_output(parser, text, content, calls):
    got_content, got_calls = extract_tool_calls(parser, text)
    assert (got_content, _norm(got_calls)) == (content, calls)
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_streamed_pieces_add_up(parser, text, content, calls):
    rng = random.Random(len(text))
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
        stream, got_content, got_calls = ToolCallStream(parser), "", []
        for end in cuts + [len(text)]:
            piece, new_calls = stream.update(text[:end], final=end == len(text))
            got_content += piece
            got_calls += new_calls
        assert (got_content or None, _norm(got_calls)) == (content, calls), cuts


def test_a_call_streams_once_complete_and_markers_are_held_back():
    s = ToolCallStream("hermes")
    assert s.update("Checking <tool_", final=False) == ("Checking ", [])
    assert s.update('Checking <tool_call>{"name": "a", "argu', final=False) == ("", [])
    content, calls = s.update('Checking <tool_call>{"name": "a", "arguments": {}}</tool_call>',
                              final=False)
    assert content == "" and _norm(calls) == [("a", {})]


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="tool_call_parser"):
        check_parser("pythonic")
