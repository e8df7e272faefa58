"""The serve CLI: flags, `python -m`, and graceful shutdown of a real server process on SIGTERM/SIGINT
(fake engine, so no model is loaded)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxvllm.config import EngineArgs
from test_server_helpers import assert_error, http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("JAXVLLM_API_KEY", None)
    return env


def test_serve_flags_via_cli_dispatcher():
    from jaxvllm.entrypoints.cli import build_parser
    from jaxvllm.entrypoints.openai.api_server import _engine_args_from
    from jaxvllm.entrypoints.openai.server import default_served_model_name
    args = build_parser().parse_args(
        ["serve", "/models/my-model", "--max-model-len", "300", "--max-num-seqs", "4",
         "--no-enable-prefix-caching", "--port", "0", "--api-key", "k",
         "--served-model-name", "a", "b", "--max-waiting-requests", "3",
         "--max-request-body-bytes", "1000", "--shutdown-timeout", "2.5"])
    ea = _engine_args_from(args)
    assert isinstance(ea, EngineArgs)
    assert ea.model == "/models/my-model" and ea.max_model_len == 300 and ea.max_num_seqs == 4
    assert ea.enable_prefix_caching is False
    assert args.api_key == "k" and args.served_model_name == ["a", "b"]
    assert args.max_waiting_requests == 3 and args.max_request_body_bytes == 1000
    assert args.shutdown_timeout == 2.5 and args.host == "127.0.0.1"
    d = build_parser().parse_args(["serve"])
    assert d.port == 8000 and d.host == "127.0.0.1" and _engine_args_from(d).model is None
    assert default_served_model_name(None) == "SmolLM2-135M-Instruct"
    assert default_served_model_name("/x/y/Llama-3-8B/") == "Llama-3-8B"
    # --model works as well as the positional MODEL; the positional wins.
    assert _engine_args_from(build_parser().parse_args(["serve", "--model", "/m"])).model == "/m"
    assert _engine_args_from(build_parser().parse_args(["serve", "/p", "--model", "/m"])).model == "/p"


def test_python_m_help():
    r = subprocess.run([sys.executable, "-m", "jaxvllm.entrypoints.openai.api_server", "--help"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-waiting-requests",
                 "--max-request-body-bytes", "--shutdown-timeout", "--max-model-len",
                 "--num-gpu-blocks-override", "--tensor-parallel-size", "--enforce-eager"):
        assert flag in r.stdout, flag


_LAUNCH = ("import sys; from fake_engine import FakeEngine; "
           "from jaxvllm.entrypoints.openai import api_server as a; "
           "sys.exit(a.main(sys.argv[1:], engine_factory=lambda args: "
           "FakeEngine(args, token_delay=0.01, load_delay=0.3)))")


class _Proc:
    def __init__(self, *extra: str, env_extra: dict | None = None):
        env = _env()
        env.update(env_extra or {})
        self.p = subprocess.Popen([sys.executable, "-c", _LAUNCH, "--port", "0", "--max-model-len",
                                   "512", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def reader():
            for line in self.p.stdout:
                self.lines.append(line)
                m = re.search(r"jaxvllm: serving (\S+) at (http://\S+)", line)
                if m:
                    self.url = m.group(2)
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        ready.wait(60)
        if self.url is None:
            self.p.kill()
            raise AssertionError("server did not start: " + "".join(self.lines)
                                 + self.p.stderr.read())

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_finish_and_exits_0(sig):
    proc = _Proc("--shutdown-timeout", "20")
    assert http("GET", proc.url + "/health")[0] == 200
    result = {}

    def req():
        result["r"] = http("POST", proc.url + "/v1/completions",
                           {"prompt": "in flight", "max_tokens": 60})

    t = threading.Thread(target=req)
    t.start()
    time.sleep(0.2)
    proc.p.send_signal(sig)
    assert proc.wait(30) == 0
    t.join(10)
    st, _, body = result["r"]
    assert st == 200 and body["usage"]["completion_tokens"] == 60


def test_sigterm_aborts_after_shutdown_timeout():
    proc = _Proc("--shutdown-timeout", "0.3")
    result = {}

    def req():
        result["r"] = http("POST", proc.url + "/v1/completions",
                           {"prompt": "too long", "max_tokens": 400}, timeout=30)

    t = threading.Thread(target=req)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 10
    t.join(10)
    # 400 tokens at 10 ms each outlast the 0.3 s timeout: the request is ended with a 503.
    status, headers, body = result["r"]
    assert_error(status, body, 503, param=None)
    assert body["error"] == {"message": "The server is shutting down; the request was not finished.",
                             "type": "ServiceUnavailableError", "param": None, "code": 503}
    assert headers.get("Retry-After") == "1"


def test_sigterm_while_loading_exits_0():
    env = _env()
    launch = _LAUNCH.replace("load_delay=0.3", "load_delay=30")
    p = subprocess.Popen([sys.executable, "-c", launch, "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        # Once the server says it is loading (its signal handlers are in place), not after a fixed
        # sleep: a slow import on a busy machine made that a kill by the default handler.
        seen = []
        for line in p.stderr:
            seen.append(line)
            if "/health answers 503 until ready" in line:
                break
        else:
            raise AssertionError("the server never said it was loading: " + "".join(seen))
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        p.kill()


def test_api_key_from_env():
    proc = _Proc(env_extra={"JAXVLLM_API_KEY": "envkey"})
    try:
        assert http("GET", proc.url + "/v1/models")[0] == 401
        assert http("GET", proc.url + "/v1/models",
                    headers={"Authorization": "Bearer envkey"})[0] == 200
    finally:
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_load_failure_exits_nonzero():
    launch = _LAUNCH.replace("load_delay=0.3", "fail_load=True")
    r = subprocess.run([sys.executable, "-c", launch, "--port", "0"], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert "failed to load" in r.stderr


def test_port_in_use_exits_1():
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        launch = _LAUNCH.replace("load_delay=0.3", "load_delay=0")
        r = subprocess.run([sys.executable, "-c", launch, "--port", str(port)], capture_output=True,
                           text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "cannot listen" in r.stderr
