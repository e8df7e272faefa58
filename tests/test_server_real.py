"""The server on the real engine with the embedded default model (SmolLM2-135M-Instruct), on CPU.

One server (conftest.py's `real_srv`) for every test here: few compiled shapes (two token buckets)
to stay fast."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from test_server_helpers import (REAL_MAX_LEN as MAX_LEN, REAL_MODEL as MODEL, assert_error, http,
                                 metric, raw_request, sse_events, wait_until)

C, CH = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def srv(real_srv):
    return real_srv


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_health_and_models(srv, client):
    assert http("GET", srv.url + "/health")[0] == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_matches_full(srv, client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    c = full.choices[0]
    assert c.finish_reason in ("length", "stop") and c.text
    toks = http("POST", srv.url + "/tokenize", {"prompt": kw["prompt"]})[2]
    assert full.usage.prompt_tokens == toks["count"]
    assert 1 <= full.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw))
    assert streamed == c.text


def test_stop_string_stream_matches_full(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text.strip()[-2:] if len(text.strip()) > 3 else None
    if not stop:
        pytest.skip(f"greedy text too short for a stop string: {text!r}")
    full = client.completions.create(stop=[stop], **kw).choices[0]
    assert full.finish_reason == "stop" and stop not in full.text
    assert text.startswith(full.text)
    streamed = "".join(ch.choices[0].text
                       for ch in client.completions.create(stream=True, stop=[stop], **kw))
    assert streamed == full.text


def test_chat_stream_matches_full(srv, client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
              temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    ev = sse_events(srv.url + "/v1/chat/completions",
                    {**kw, "stream": True, "stream_options": {"include_usage": True}})
    assert ev[-1] == "[DONE]"
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    chunks = [e for e in ev[:-1] if e["choices"]]
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == text
    assert ev[-2]["usage"] == {"prompt_tokens": full.usage.prompt_tokens,
                               "completion_tokens": full.usage.completion_tokens,
                               "total_tokens": full.usage.total_tokens}
    tok = http("POST", srv.url + "/tokenize", {"messages": kw["messages"]})[2]
    assert tok["count"] == full.usage.prompt_tokens


def test_n_batch_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=["Once upon a time", "1, 2, 3,"], n=2,
                                  max_tokens=4, temperature=0.8, seed=7, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_bad_requests(srv):
    st, _, body = http("POST", srv.url + "/v1/completions",
                       {"model": MODEL, "prompt": "hi", "max_tokens": MAX_LEN})
    assert_error(st, body, 400, "max_tokens")
    st, _, body = http("POST", srv.url + "/v1/completions", {"model": "x", "prompt": "hi"})
    assert_error(st, body, 404, "model")
    st, _, body = http("POST", srv.url + "/v1/completions", raw=b"{")
    assert_error(st, body, 400)
    # An id past int32 with min_tokens once reached the step thread and stopped the engine.
    st, _, body = http("POST", srv.url + "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3,
                                                              "stop_token_ids": [2 ** 31], "min_tokens": 1})
    assert_error(st, body, 400, "stop_token_ids")
    st, _, body = http("POST", srv.url + "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3,
                                                              "top_k": 2 ** 31 - 1, "temperature": 1.0})
    assert st == 200 and body["usage"]["completion_tokens"] == 3, body


def test_no_file_read_through_request_fields(srv, tmp_path):
    """A model name or a chat template given as a file path is a name or refused, never read."""
    template = tmp_path / "template.jinja"
    template.write_text("SECRET {{ messages }}")
    msgs = [{"role": "user", "content": "hi"}]
    for model in (str(template), "../" * 8 + "etc/passwd"):
        st, _, body = http("POST", srv.url + "/v1/chat/completions",
                           {"model": model, "messages": msgs, "max_tokens": 1})
        assert_error(st, body, 404, "model")
    for path in ("/v1/chat/completions", "/tokenize"):
        st, _, body = http("POST", srv.url + path,
                           {"messages": msgs, "max_tokens": 1, "chat_template": str(template)})
        assert_error(st, body, 400, "chat_template")
    plain = http("POST", srv.url + "/tokenize", {"messages": msgs})[2]["tokens"]
    extra = {"chat_template_kwargs": {"chat_template": str(template)}}
    assert http("POST", srv.url + "/tokenize", {"messages": msgs, **extra})[2]["tokens"] == plain


def test_concurrent(client):
    def one(i):
        return client.completions.create(model=MODEL, prompt=f"Number {i} is", max_tokens=6,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as ex:
        texts = list(ex.map(one, range(8)))
    assert all(isinstance(t, str) for t in texts)
    assert one(3) == texts[3]


def test_disconnect_aborts(srv):
    body = json.dumps({"model": MODEL, "prompt": "Write a long story.", "max_tokens": 400,
                       "stream": True, "ignore_eos": True}).encode()
    s = raw_request(srv.handle.host, srv.handle.port, "POST", "/v1/completions", body)
    try:
        got = b""
        deadline = time.monotonic() + 120
        while got.count(b"data: ") < 3 and time.monotonic() < deadline:
            got += s.recv(4096)
    finally:
        s.close()
    assert wait_until(lambda: metric(srv.url, "jaxvllm:num_requests_running") == 0, 30)
    assert wait_until(lambda: srv.server.serving.in_flight == 0, 10)


def test_metrics(srv):
    assert metric(srv.url, "jaxvllm:generation_tokens_total") > 0
    assert metric(srv.url, "jaxvllm:prefix_cache_queries_total") > 0
    assert metric(srv.url, "jaxvllm:time_to_first_token_seconds_count") > 0
    assert metric(srv.url, "jaxvllm:request_success_total") > 0


def _serve_process(cmd_head: list[str]):
    """`cmd_head` + the real-engine serve flags in a subprocess (stderr to a file, read with
    `.stderr_text()`); returns (process, {"name", "url"} once the ready line is printed)."""
    import os
    import re
    import subprocess
    import sys
    import tempfile
    import threading
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("JAXVLLM_API_KEY", None)
    cache = os.environ.get("JAXVLLM_TEST_COMPILE_CACHE")
    cmd = [sys.executable] + cmd_head + [
        "--port", "0", "--max-model-len", str(MAX_LEN), "--max-num-seqs", "8",
        "--num-gpu-blocks-override", "256", "--enforce-eager", "--max-num-batched-tokens", "64",
        "--token-buckets", "8", "64", "--dtype", "float32", "--shutdown-timeout", "30"]
    if cache:
        cmd += ["--compilation-cache-dir", cache]
    err = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block the server
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=root)
    p.stderr_text = lambda: (err.seek(0), err.read())[1]
    url = {}
    ready = threading.Event()

    def reader():
        for line in p.stdout:
            m = re.search(r"jaxvllm: serving (\S+) at (http://\S+)", line)
            if m:
                url["name"], url["url"] = m.group(1), m.group(2)
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(300)
    return p, url


def test_cli_serve_process_sigterm_exits_0():
    """`jaxvllm serve` end to end in its own process: ready line, one request, SIGTERM, exit 0."""
    import signal
    p, url = _serve_process(["-m", "jaxvllm.entrypoints.cli", "serve"])
    try:
        assert "url" in url, p.stderr_text() if p.poll() is not None else "no ready line"
        assert url["name"] == MODEL
        assert http("GET", url["url"] + "/health")[0] == 200
        st, _, body = http("POST", url["url"] + "/v1/completions",
                           {"prompt": "Hello", "max_tokens": 3, "temperature": 0}, timeout=300)
        assert st == 200 and body["usage"]["completion_tokens"] >= 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_dead_engine_fails_requests_and_exits_1():
    """A step that raises kills the engine: the requests in flight (stream and full) end with a
    503, /health fails, and the process exits 1 on its own so that a supervisor restarts it."""
    import os
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_failing_step.py")
    p, url = _serve_process([script, "12"])
    try:
        assert "url" in url, p.stderr_text() if p.poll() is not None else "no ready line"
        body = {"prompt": "Write a long story.", "max_tokens": 200, "ignore_eos": True,
                "temperature": 0}
        with ThreadPoolExecutor(2) as ex:
            full = ex.submit(http, "POST", url["url"] + "/v1/completions", body, timeout=120)
            stream = ex.submit(http, "POST", url["url"] + "/v1/completions",
                               {**body, "stream": True}, timeout=120)
            st, _, resp = full.result()
            assert_error(st, resp, 503)
            assert "engine" in resp["error"]["message"]
            st, _, text = stream.result()
        assert st == 200 and text.rstrip().endswith("data: [DONE]"), text
        last = json.loads(text.rstrip().split("\n\n")[-2][len("data: "):])
        assert last["error"]["type"] == "ServiceUnavailableError", last
        try:  # until it exits, /health answers 503; then nothing listens
            assert http("GET", url["url"] + "/health")[0] == 503
        except OSError:
            pass
        assert p.wait(60) == 1, p.stderr_text()
        assert "the engine is dead" in p.stderr_text()
    finally:
        if p.poll() is None:
            p.kill()


PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def test_structured_outputs_over_the_api(srv, client):
    """response_format (json_schema, json_object) and vLLM's structured_outputs / guided_* extras
    constrain the real model's output; a stream of a constrained request reassembles to the same
    text; a schema the grammar library refuses is a 400 naming the field."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    full = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0,
                                          response_format=fmt)
    text = full.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert full.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100,
                                            temperature=0, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    ok = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    obj = client.chat.completions.create(model=MODEL, messages=ok, max_tokens=40, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, n=3,
                                       temperature=1.0, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["blue", "grey"]}})
    assert {c.text for c in choice.choices} <= {"blue", "grey"}
    date = client.completions.create(model=MODEL, prompt="Today's date:", max_tokens=12,
                                     temperature=0, extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.choices[0].text), date.choices[0].text
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    for stream in (False, True):
        st, _, body = http("POST", srv.url + "/v1/chat/completions",
                           {"messages": ASK, "max_tokens": 4, "response_format": bad,
                            "stream": stream})
        assert_error(st, body, 400, "response_format")
        assert "structured_outputs.json" in body["error"]["message"]


def test_logit_bias_and_allowed_token_ids_over_the_api(srv, client):
    def text_of(ids):
        return http("POST", srv.url + "/detokenize", {"tokens": ids})[2]["prompt"]

    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"1234": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == text_of([1234] * 4)
    allowed = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                             temperature=1.0, seed=1, logprobs=True,
                                             extra_body={"allowed_token_ids": [300, 301]})
    assert {t.token for t in allowed.choices[0].logprobs.content} <= {text_of([300]),
                                                                     text_of([301])}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
        "additionalProperties": False}}}


def test_forced_tool_calls_validate_and_stream_the_same(client):
    """tool_choice "required" and a named function: a grammar built from the functions' schemas
    makes the output the calls, so the arguments always parse and validate."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=ask, tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=120,
              temperature=0)
    req = client.chat.completions.create(**kw, tool_choice="required").choices[0]
    assert req.finish_reason == "tool_calls" and req.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    for call in req.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = client.chat.completions.create(
        **kw, tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0]
    [call] = named.message.tool_calls
    assert call.function.name == "get_time" and named.finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), schemas["get_time"])
    # Streamed, the official client's stream helper reassembles the same calls from arguments
    # that arrive in pieces (as the tokens come).
    pieces: dict[int, int] = {}
    with client.chat.completions.stream(**kw, tool_choice="required") as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces[event.index] = pieces.get(event.index, 0) + 1
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in req.message.tool_calls]
    assert pieces and all(n > 3 for n in pieces.values()), pieces


def test_tool_results_round_trip_through_the_template(srv, client):
    """An assistant turn with tool_calls and the tool's result are sent back and rendered."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather",
                                  "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                         tool_choice="none", max_tokens=8, temperature=0)
    assert out.choices[0].message.content
    st, _, body = http("POST", srv.url + "/tokenize", {"messages": messages})
    assert st == 200, body
    text = http("POST", srv.url + "/detokenize", {"tokens": body["tokens"]})[2]["prompt"]
    assert "21 degrees and sunny" in text


def test_dev_endpoints_pause_sleep_wake_and_resume(srv, client):
    """A trainer's cycle over HTTP: /pause ends a running stream ("abort") and holds new requests;
    /sleep while paused; /resume admits the held request, which the sleeping engine answers 503;
    /wake_up, and requests are served again. Bad arguments are 400s naming the field, a sleep
    with requests running a 409."""
    url = srv.url

    def call(method: str, path: str) -> tuple[int, object]:
        status, _, body = http(method, url + path)
        return status, body

    long_body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 300,
                 "ignore_eos": True}
    pool = ThreadPoolExecutor(2)
    try:
        assert call("GET", "/is_paused") == (200, {"is_paused": False})
        assert call("GET", "/is_sleeping") == (200, {"is_sleeping": False})
        assert_error(*call("POST", "/pause?clear_cache=maybe"), 400, "clear_cache")
        running = pool.submit(http, "POST", url + "/v1/completions", long_body, timeout=300)
        assert wait_until(lambda: metric(url, "jaxvllm:num_requests_running") == 1, 120)
        assert call("POST", "/pause") == (200, {"status": "paused"})
        status, _, body = running.result(60)
        assert status == 200 and body["choices"][0]["finish_reason"] == "abort", body
        assert body["usage"]["completion_tokens"] < 300
        assert call("GET", "/is_paused") == (200, {"is_paused": True})

        held = pool.submit(http, "POST", url + "/v1/completions",
                           {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=300)
        time.sleep(1.0)
        assert not held.done()  # waits for /resume
        assert_error(*call("POST", "/sleep?level=3"), 400, "level")
        assert call("POST", "/sleep?level=1") == (200, {"is_sleeping": True})
        assert call("POST", "/resume") == (200, {"status": "resumed"})
        status, _, body = held.result(60)
        assert_error(status, body, 503)
        assert "wake_up" in body["error"]["message"]

        assert_error(*call("POST", "/wake_up?tags=gpu"), 400, "tags")
        assert call("POST", "/wake_up?tags=weights") == (200, {"is_sleeping": True})
        assert call("POST", "/wake_up") == (200, {"is_sleeping": False})
        assert call("POST", "/reset_prefix_cache") == (200, {"status": "reset"})
        out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                        max_tokens=4, temperature=0)
        assert out.choices[0].text

        running = pool.submit(http, "POST", url + "/v1/completions", long_body, timeout=300)
        assert wait_until(lambda: metric(url, "jaxvllm:num_requests_running") == 1, 60)
        assert_error(*call("POST", "/sleep"), 409)
        assert call("GET", "/is_sleeping") == (200, {"is_sleeping": False})
        assert call("POST", "/pause") == (200, {"status": "paused"})  # ends it
        assert running.result(60)[2]["choices"][0]["finish_reason"] == "abort"
    finally:  # the server is shared: leave it serving
        http("POST", url + "/wake_up")
        http("POST", url + "/resume")
        pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------
# Sampling and stopping: rules that live in the engine, so on the real engine with the embedded
# default model. Each test first takes the model's own output, then asserts what the rule does to it.
# ------------------------------------------------------------------------------------------------
def _real(srv, path: str, body: dict) -> dict:
    status, _, resp = http("POST", srv.url + path, body, timeout=300)
    assert status == 200, resp
    return resp


def _stream_text(srv, path: str, body: dict) -> tuple[str, str]:
    """(the streamed text, the last finish_reason) of a single-choice streaming request."""
    ev = sse_events(srv.url + path, {**body, "stream": True}, timeout=300)
    assert ev[-1] == "[DONE]"
    pieces, reasons = [], []
    for e in ev[:-1]:
        for c in e["choices"]:
            pieces.append(c["text"] if "text" in c else c["delta"].get("content") or "")
            reasons.append(c["finish_reason"])
    return "".join(pieces), reasons[-1]


def test_real_stop_string(real_srv):
    body = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    base = _real(real_srv, C, body)["choices"][0]
    text = base["text"]
    assert base["finish_reason"] == "length" and base["stop_reason"] is None
    # A 3-character stop string that first occurs past the first third of the output (so the cut is
    # visible), mostly inside a token.
    i = next(i for i in range(len(text) // 3, len(text) - 3)
             if text.find(text[i:i + 3]) == i and not text[i:i + 3].isspace())
    stop = text[i:i + 3]
    r = _real(real_srv, C, {**body, "stop": [stop]})
    c = r["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (text[:i], "stop", stop)
    assert r["usage"]["completion_tokens"] < 24
    # Streamed, the same text (a possible partial stop string is held back, never sent).
    assert _stream_text(real_srv, C, {**body, "stop": [stop]}) == (text[:i], "stop")
    c = _real(real_srv, C, {**body, "stop": stop, "include_stop_str_in_output": True})["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (text[:i + 3], "stop", stop)
    # Stop strings wait for min_tokens (as vLLM): past the whole output, the stop never applies.
    c = _real(real_srv, C, {**body, "stop": [stop], "min_tokens": 24})["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (text, "length", None)


def test_real_eos_ignore_eos_min_tokens(real_srv):
    eos = real_srv.engine.tokenizer.eos_token
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0}
    r = _real(real_srv, CH, body)
    text, n = r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] is None
    assert text and 2 <= n < 40  # the model's EOS ended it
    # ignore_eos: the same EOS is sampled (shown where special tokens are not skipped), and the
    # request runs on to max_tokens.
    r = _real(real_srv, CH, {**body, "ignore_eos": True, "skip_special_tokens": False})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 40
    assert r["choices"][0]["message"]["content"].startswith(text + eos)
    # min_tokens: EOS cannot be sampled (nor stop the request) before min_tokens tokens.
    r = _real(real_srv, CH, {**body, "min_tokens": n + 5, "skip_special_tokens": False})
    out = r["choices"][0]["message"]["content"]
    assert r["usage"]["completion_tokens"] >= n + 5
    assert out.startswith(text) and len(out) > len(text) and eos not in out
    # Streamed alike.
    assert _stream_text(real_srv, CH, body) == (text, "stop")


def test_real_seeded_sampling_is_reproducible(real_srv):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0}

    def texts(**kw) -> list[str]:
        return [c["text"] for c in _real(real_srv, C, {**body, **kw})["choices"]]

    a = texts(seed=1)[0]
    assert texts(seed=1) == [a]
    # Batched with another request of the same seed: the same text for both.
    assert texts(seed=1, prompt=[body["prompt"]] * 2) == [a, a]
    others = [texts(seed=s)[0] for s in (2, 3, 4)]
    assert len({a, *others}) == 4, others
    # Without a seed, two requests differ.
    assert texts()[0] != texts()[0]


def test_real_fuzz_no_5xx(real_srv):
    """Edge values one at a time (on a request with the engine's optional paths on: min_tokens
    masking, seeded sampling, penalties), then random and garbled bodies and random combinations
    of edge values, against the real engine's validation, sampler, stop checks and detokenizer:
    only 2xx and 4xx answers, errors OpenAI-shaped, no error inside a stream, and the engine
    answers alike afterwards."""
    import random
    srv = real_srv
    probe = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    before = _real(srv, C, probe)["choices"][0]["text"]
    rng = random.Random(1234)
    vocab = srv.engine.model_config.vocab_size
    values = [None, True, False, 0, -1, 1, 2, 3.5, -2.5, 1e308, 10 ** 20, -(10 ** 20), "", "x",
              "\u0000", "é" * 3, [], [1], [[1, 2]], ["a"], [[]], {}, {"a": 1}, [None], [1.5], [-7],
              {"type": "text"}, {"include_usage": True}, "0.5", [[1], "a"], [{"role": "user"}],
              [{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text"}]}]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "best_of",
              "temperature", "top_p", "top_k", "min_p", "stop", "seed", "logprobs", "top_logprobs",
              "echo", "stream", "stream_options", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
              "skip_special_tokens", "include_stop_str_in_output", "response_format", "user",
              "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
              "logit_bias", "tools", "tool_choice", "suffix", "prompt_logprobs", "tokens",
              "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
              "add_special_tokens", "return_token_strs", "spaces_between_special_tokens"]
    # Valid values and values just past valid, per field.
    edge = {"n": [1, 2, 3], "temperature": [0, 1e-6, 0.7, 2.0], "top_p": [1e-6, 0.5, 1],
            "top_k": [-1, 0, 1, 5, vocab - 1, vocab, 2 ** 31 - 1, 2 ** 31],
            "min_p": [0, 0.3, 1], "seed": [0, 1, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1, 2 ** 64],
            "stop": ["x", " ", "\n", ".", ["e", "the"], [], "", ["\ud83d\ude00"]],
            "stop_token_ids": [[], [0], [2], [vocab - 1], [vocab], [2 ** 31 - 1], [2 ** 31]],
            "min_tokens": [0, 1, 2, 3, 4], "ignore_eos": [True, False],
            "presence_penalty": [-2, 0, 2], "frequency_penalty": [-2, 2],
            "repetition_penalty": [0.01, 1, 2], "logprobs": [True, 0, 1, 5, 20, 21],
            "top_logprobs": [0, 5, 20, 21], "prompt_logprobs": [0, 1, 5, 21], "echo": [True],
            "skip_special_tokens": [False], "include_stop_str_in_output": [True],
            "stream": [True, False], "stream_options": [{"include_usage": True}],
            "max_tokens": [1, 2, 3, 4], "add_special_tokens": [False],
            "prompt": ["", "hi", " ", "é\U0001F600", [0], [vocab - 1], [vocab], [[1, 2], [3]],
                       "a " * (MAX_LEN - 8), "a " * MAX_LEN],
            "messages": [[{"role": "user", "content": ""}],
                         [{"role": "assistant", "content": "Sure"}],
                         [{"role": "user", "content": "a " * MAX_LEN}],
                         [{"role": "system", "content": "x"}, {"role": "user", "content": "é"}]]}
    paths = [C, CH, "/tokenize", "/detokenize"]
    hi = [{"role": "user", "content": "hi"}]

    def requests():
        base = {"max_tokens": 3, "min_tokens": 1, "temperature": 0.8, "seed": 7,
                "presence_penalty": 0.5}
        for k, vs in edge.items():
            for v in vs:
                path = CH if k == "messages" else C
                first = {"messages": hi} if path == CH else {"prompt": "hi"}
                yield path, json.dumps({**first, **base, k: v}).encode()
        for _ in range(50):
            path = rng.choice(paths)
            kind = rng.random()
            if kind < 0.1:
                yield path, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            elif kind < 0.15:
                yield path, json.dumps(rng.choice(values)).encode()
            elif kind < 0.6:
                body = {}
                if path in (C, "/tokenize") and rng.random() < 0.8:
                    body["prompt"] = rng.choice(["hi", ["a", "b"], [5, 6], [[5], [6, 7]]])
                if path == CH and rng.random() < 0.8:
                    body["messages"] = hi
                if path == "/detokenize":
                    body["tokens"] = rng.choice([[5, 6], [0, 1, 2], [vocab - 1]])
                body["max_tokens"] = rng.choice([1, 2, 3])
                for _ in range(rng.randint(1, 5)):
                    body[rng.choice(fields)] = rng.choice(values)
                raw = json.dumps(body).encode()
                yield path, (raw[:rng.randint(0, len(raw))] if rng.random() < 0.1 else raw)
            else:  # a generation request with several edge values at once
                path = rng.choice([C, CH])
                body = {"prompt": "hi"} if path == C else {"messages": hi}
                body["max_tokens"] = rng.choice(edge["max_tokens"])
                for k, vs in edge.items():
                    if rng.random() < 0.25:
                        body[k] = rng.choice(vs)
                yield path, json.dumps(body).encode()

    codes = {}
    for path, raw in requests():
        status, hdrs, resp = http("POST", srv.url + path, raw=raw, timeout=300)
        codes[status] = codes.get(status, 0) + 1
        assert status < 500, (path, raw, resp)
        if status >= 400:
            assert_error(status, resp, status)
        elif hdrs.get("Content-Type", "").startswith("text/event-stream"):
            events = [b[len("data: "):] for b in resp.strip().split("\n\n")]
            assert events[-1] == "[DONE]", (path, raw, resp)
            assert not any("error" in json.loads(e) for e in events[:-1]), (path, raw, resp)
        else:
            assert isinstance(resp, dict) and "error" not in resp, (path, raw, resp)
    assert codes.get(200, 0) >= 60 and codes.get(400, 0) >= 40, codes
    assert http("GET", srv.url + "/health")[0] == 200
    assert wait_until(lambda: srv.server.serving.in_flight == 0, 60)
    assert _real(srv, C, probe)["choices"][0]["text"] == before
