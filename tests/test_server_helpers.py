"""Helpers for the server tests: raw HTTP over loopback, SSE parsing, metric scraping, and the
settings of the real-engine server (conftest.py's `real_srv`)."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional

# The real engine with the embedded default model, small enough to start fast on CPU: few compiled
# shapes (two token buckets) and a short context.
REAL_MODEL = "SmolLM2-135M-Instruct"
REAL_MAX_LEN = 512


def real_engine_args():
    from jaxvllm.config import EngineArgs
    return EngineArgs(max_model_len=REAL_MAX_LEN, max_num_seqs=8, num_gpu_blocks_override=256,
                      enforce_eager=True, max_num_batched_tokens=64, token_buckets=(8, 64),
                      dtype="float32")


def http(method: str, url: str, body: Any = None, *, raw: Optional[bytes] = None,
         headers: Optional[dict] = None, timeout: float = 30.0) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or text). `body` is JSON-encoded; `raw` is sent as is."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, payload = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, dict(e.headers), e.read()
    text = payload.decode("utf-8", errors="replace")
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def sse_events(url: str, body: dict, headers: Optional[dict] = None,
               timeout: float = 30.0) -> list:
    """POST a streaming request; return the parsed `data:` payloads ("[DONE]" kept as a string)."""
    status, hdrs, text = http("POST", url, body, headers=headers, timeout=timeout)
    assert status == 200, (status, text)
    assert hdrs.get("Content-Type", "").startswith("text/event-stream")
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(status: int, body: Any, expected_status: int, param: Optional[str] = "__any__"):
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and "error" in body, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err


def metric(url: str, name: str, labels: Optional[dict] = None) -> float:
    """Sum of the samples of `name` (exact sample name) matching `labels`."""
    status, _, text = http("GET", url + "/metrics")
    assert status == 200
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([^{\s]+)(\{([^}]*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if labels and any(lab.get(k) != v for k, v in labels.items()):
            continue
        total += float(m.group(4))
        found = True
    assert found, f"metric {name} {labels} not found"
    return total


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(host: str, port: int, method: str, path: str, body: bytes,
                headers: Optional[dict] = None) -> socket.socket:
    """Open a connection and send a request without reading the answer (for disconnect tests)."""
    s = socket.create_connection((host, port), timeout=10)
    h = {"Host": f"{host}:{port}", "Content-Type": "application/json",
         "Content-Length": str(len(body))}
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    s.sendall(head.encode() + body)
    return s
