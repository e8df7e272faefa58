"""Tool-call parsers: whole outputs, and streamed pieces (any chunking, markers cut anywhere)
adding up to the same content and calls, reassembled as the openai client does."""
from __future__ import annotations

import json
import random

import pytest

from jaxvllm.entrypoints.openai.tool_parsers import (NamedCallStream, ToolCallStream,
                                                     check_parser, extract_tool_calls)

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


def _reassemble(pieces):
    """What the openai client's stream helpers do with delta.tool_calls: the first piece of an
    index names the call, every piece's arguments are appended."""
    calls = {}
    for d in pieces:
        wire = d.to_openai()
        if d.index not in calls:
            assert wire["id"].startswith("call_") and wire["type"] == "function", wire
            calls[d.index] = [wire["function"]["name"], ""]
        else:
            assert set(wire) == {"index", "function"} and set(wire["function"]) == {"arguments"}
        calls[d.index][1] += wire["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [(name, json.loads(args)) for _, (name, args) in sorted(calls.items())]


def _stream(stream, text, cuts):
    got_content, pieces = "", []
    for end in cuts + [len(text)]:
        piece, new = stream.update(text[:end], final=end == len(text))
        got_content += piece
        pieces += new
    return got_content, pieces


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_streamed_pieces_add_up(parser, text, content, calls):
    rng = random.Random(len(text))
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
        stream = ToolCallStream(parser)
        got_content, pieces = _stream(stream, text, cuts)
        assert (got_content or None, _norm(stream.calls)) == (content, calls), cuts
        if calls:
            assert _reassemble(pieces) == calls, cuts
            # The streamed ids and arguments are the whole calls' own.
            assert [c.arguments for c in stream.calls] == [
                "".join(d.arguments for d in pieces if d.index == i) for i in range(len(calls))]


def test_arguments_stream_as_they_arrive_and_markers_are_held_back():
    s = ToolCallStream("hermes")
    assert s.update("Checking <tool_", final=False) == ("Checking ", [])
    assert s.update('Checking <tool_call>{"name": "', final=False) == ("", [])
    content, [first] = s.update('Checking <tool_call>{"name": "a", "argu', final=False)
    assert content == "" and first.to_openai()["function"] == {"name": "a", "arguments": ""}
    _, [args] = s.update('Checking <tool_call>{"name": "a", "arguments": {"x": "Pa', final=False)
    assert args.to_openai() == {"index": 0, "function": {"arguments": '{"x": "Pa'}}
    _, [more] = s.update('Checking <tool_call>{"name": "a", "arguments": {"x": "Paris"}}</tool',
                         final=False)
    assert more.to_openai() == {"index": 0, "function": {"arguments": 'ris"}'}}
    assert _norm(s.calls) == [("a", {"x": "Paris"})] and s.calls[0].id == first.call.id


def test_arguments_given_as_a_json_string_are_decoded_once():
    text = '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
    content, [call] = extract_tool_calls("hermes", text)
    assert content is None and call.arguments == '{"x": 1}'
    stream = ToolCallStream("hermes")
    _, pieces = _stream(stream, text, list(range(1, len(text))))
    assert _reassemble(pieces) == [("a", {"x": 1})]


def test_arguments_before_the_name_stream_once_it_is_known():
    text = '{"parameters": {"city": "Paris"}, "name": "get_weather"}'
    stream = ToolCallStream("llama3_json")
    _, pieces = _stream(stream, text, list(range(1, len(text))))
    assert _reassemble(pieces) == [("get_weather", {"city": "Paris"})]


def test_a_call_cut_off_reads_as_content_whole():
    text = 'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1'
    assert extract_tool_calls("mistral", text) == (text, [])


@pytest.mark.parametrize("text, calls", [
    ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}]',
     [("get_weather", WEATHER)]),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": [1, {"y": "]}"}]}}]',
     [("a", {}), ("b", {"x": [1, {"y": "]}"}]})]),
])
def test_required_tool_choice_form(text, calls):
    """tool_choice "required": the grammar's array of {"name", "parameters"} objects."""
    assert _norm(extract_tool_calls("required", text)[1]) == calls
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 10)))
        stream = ToolCallStream("required")
        content, pieces = _stream(stream, text, cuts)
        assert content == "" and _reassemble(pieces) == calls == _norm(stream.calls)


def test_a_named_function_streams_its_arguments():
    text = '  {"zone": "UTC", "note": "a b  "}  '
    stream = NamedCallStream("get_time")
    content, pieces = _stream(stream, text, list(range(1, len(text))))
    assert content == "" and _reassemble(pieces) == [("get_time", {"zone": "UTC", "note": "a b  "})]
    assert stream.calls[0].arguments == text.strip()
    assert NamedCallStream("f").calls == []


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="tool_call_parser"):
        check_parser("pythonic")
