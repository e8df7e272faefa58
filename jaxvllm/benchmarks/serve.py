"""Serving load generator for any OpenAI-compatible server (ours, vLLM, ...): Poisson arrivals at
--request-rate (or a --request-rates sweep; inf = all at once), streaming /v1/completions with
ignore_eos and max_tokens drawn like the offline benchmark, prompts as token ids (or random text).
Reports TTFT, TPOT and ITL (mean, p50/p90/p99), throughput (req/s, output tok/s) and goodput under
an SLO (--slo-ttft-ms, --slo-tpot-ms). Bounded by --num-prompts and --duration.

    jaxvllm bench serve --base-url http://127.0.0.1:8000 --request-rate 4 --duration 120 \\
        --num-prompts 100000 --input-len 128:1024 --output-len 32:512
    # or start our server for the run (engine flags as `jaxvllm serve`):
    jaxvllm bench serve --launch subprocess --model bench/configs/llama-3-8b --load-format dummy \\
        --dtype bfloat16 --request-rate 4 --duration 120 --num-prompts 100000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlparse

from jaxvllm.benchmarks import common as C

DEFAULT_URL = "http://127.0.0.1:8000"


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from jaxvllm.config import EngineArgs
    g = parser.add_argument_group("load")
    g.add_argument("--base-url", default=None,
                   help=f"Server URL (default {DEFAULT_URL}; with --launch, the launched server).")
    g.add_argument("--endpoint", default="/v1/completions", help="Completions path.")
    g.add_argument("--served-model-name", default=None,
                   help="The request's model field (default: --model when not launching, else "
                        "the first of GET /v1/models).")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer token (default: env OPENAI_API_KEY).")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=C.parse_rates, default=None,
                      help="Requests/s, Poisson arrivals; inf sends all at once (default inf).")
    rate.add_argument("--request-rates", type=C.parse_rates, default=None,
                      help="Comma-separated sweep, e.g. 1,2,4,inf (one run per rate).")
    g.add_argument("--num-prompts", type=int, default=200, help="Most requests per run.")
    g.add_argument("--duration", type=float, default=None,
                   help="Stop sending new requests after this many seconds.")
    g.add_argument("--grace", type=float, default=60.0,
                   help="Seconds after --duration that in-flight requests may finish before they "
                        "are cancelled (counted as failed; default 60).")
    g.add_argument("--max-concurrency", type=int, default=None, help="Cap on requests in flight.")
    C.add_len_args(g, "128:1024", "32:512")
    g.add_argument("--prompt-type", choices=("ids", "text"), default="ids",
                   help="ids: prompt is a token-id list (exact lengths); text: random words "
                        "(lengths approximate, tokenizer-dependent).")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Token ids are drawn below this (default: the launched model's vocab, "
                        "else 32000).")
    g.add_argument("--temperature", type=float, default=0.0, help="Request temperature.")
    g.add_argument("--slo-ttft-ms", type=float, default=200.0, help="Goodput SLO on TTFT.")
    g.add_argument("--slo-tpot-ms", type=float, default=30.0, help="Goodput SLO on TPOT.")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="Per-request timeout s.")
    g.add_argument("--no-warmup", action="store_true",
                   help="Skip the one short untimed request sent before each run.")
    g.add_argument("--launch", choices=("none", "subprocess", "inprocess"), default="none",
                   help="Start our server for the run on a free loopback port (subprocess: "
                        "`jaxvllm serve` with the engine flags below; inprocess: a server thread).")
    g.add_argument("--launch-timeout", type=float, default=1800.0, help="Seconds to wait for "
                   "the launched server's /health.")
    C.add_output_args(parser)
    e = parser.add_argument_group("engine for --launch (EngineArgs; --model is also the request's "
                                  "model name without --launch)")
    EngineArgs.add_cli_args(e)
    return parser


# ---------------------------------------------------------------------------------------------
# One request
# ---------------------------------------------------------------------------------------------
@dataclass
class ReqResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = float("nan")
    latency: float = float("nan")
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        if self.output_tokens < 2:
            return float("nan")
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _random_text(rng: random.Random, n: int) -> str:
    words = ("the of and to in is that for it as with was on be by at this from or have an are "
             "not but which one all their what so up out if about who get when make can like time "
             "just him know take people into year your good some could them see other than then "
             "now look only come its over think also back after use two how our work first well "
             "way even new want because any these give day most us").split()
    return " ".join(rng.choice(words) for _ in range(n))


async def _one(session: Any, url: str, headers: dict, body: dict, res: ReqResult,
               timeout: float) -> None:
    import aiohttp
    res.start = time.perf_counter()
    last = res.start
    usage_tokens = None
    chunks = 0
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    now = time.perf_counter()
                    obj = json.loads(payload)
                    if obj.get("error"):
                        res.error = str(obj["error"])[:300]
                        return
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
                    choices = obj.get("choices") or []
                    if choices and (choices[0].get("text") or choices[0].get("delta", {})
                                    .get("content")):
                        if chunks == 0:
                            res.ttft = now - res.start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
        res.latency = time.perf_counter() - res.start
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no tokens in the stream"
    except asyncio.CancelledError:
        res.error = "cancelled at the time limit"
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
        res.error = f"{type(e).__name__}: {e}"[:300]


# ---------------------------------------------------------------------------------------------
# One run (one rate)
# ---------------------------------------------------------------------------------------------
def _bodies(args: argparse.Namespace, model: str, vocab: int) -> list[tuple[dict, int, int]]:
    reqs = C.make_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                           args.data_seed, low_id=min(100, vocab // 2))
    rng = random.Random(args.data_seed + 1)
    out = []
    for r in reqs:
        prompt: Any = (r.prompt_token_ids if args.prompt_type == "ids"
                       else _random_text(rng, r.prompt_len))
        body = {"model": model, "prompt": prompt, "max_tokens": r.output_len, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True,
                "temperature": args.temperature}
        out.append((body, r.prompt_len, r.output_len))
    return out


async def _run_rate(args: argparse.Namespace, base: str, model: str, vocab: int,
                    rate: float) -> dict:
    import aiohttp
    url = base.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bodies = _bodies(args, model, vocab)
    rng = random.Random(args.data_seed + 2)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        if not args.no_warmup:
            w = ReqResult(0, 4)
            body = dict(bodies[0][0], max_tokens=4)
            await _one(session, url, headers, body, w, args.request_timeout)
            if not w.ok:
                raise SystemExit(f"warm-up request to {url} failed: {w.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        results: list[ReqResult] = []
        tasks: list[asyncio.Task] = []

        async def limited(body: dict, res: ReqResult) -> None:
            if sem is None:
                return await _one(session, url, headers, body, res, args.request_timeout)
            async with sem:
                return await _one(session, url, headers, body, res, args.request_timeout)

        t0 = time.perf_counter()
        next_at = t0
        for i, (body, plen, olen) in enumerate(bodies):
            if args.duration is not None and time.perf_counter() - t0 >= args.duration:
                break
            if rate != float("inf") and i > 0:  # the first request goes at t=0
                next_at += rng.expovariate(rate)
                delay = next_at - time.perf_counter()
                if args.duration is not None:
                    delay = min(delay, t0 + args.duration - time.perf_counter())
                if delay > 0:
                    await asyncio.sleep(delay)
                if args.duration is not None and time.perf_counter() - t0 >= args.duration:
                    break
            res = ReqResult(plen, olen)
            results.append(res)
            tasks.append(asyncio.create_task(limited(body, res)))
        sent_s = time.perf_counter() - t0
        deadline = None if args.duration is None else t0 + args.duration + args.grace
        if tasks:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    return _summarize(args, rate, results, elapsed, sent_s)


def _summarize(args: argparse.Namespace, rate: float, results: list[ReqResult], elapsed: float,
               sent_s: float) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [r.tpot * 1e3 for r in ok if r.output_tokens > 1]
    itl = [x * 1e3 for r in ok for x in r.itl]
    e2e = [r.latency * 1e3 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft * 1e3 <= args.slo_ttft_ms and
            (r.output_tokens < 2 or r.tpot * 1e3 <= args.slo_tpot_ms)]

    def dist(v: list[float]) -> dict:
        return {"mean": C.mean(v), "p50": C.percentile(v, 50), "p90": C.percentile(v, 90),
                "p99": C.percentile(v, 99)}

    return {
        "request_rate": rate, "num_sent": len(results), "completed": len(ok),
        "failed": len(failed), "errors": sorted({r.error for r in failed})[:5],
        "duration_s": elapsed, "send_window_s": sent_s,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else float("nan"),
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else float("nan"),
        "prompt_tokens": sum(r.prompt_len for r in ok),
        "total_tokens_per_s": (out_tokens + sum(r.prompt_len for r in ok)) / elapsed
        if elapsed > 0 else float("nan"),
        "ttft_ms": dist(ttft), "tpot_ms": dist(tpot), "itl_ms": dist(itl), "e2e_ms": dist(e2e),
        "goodput_requests_per_s": len(good) / elapsed if elapsed > 0 else float("nan"),
        "goodput_fraction": len(good) / len(results) if results else float("nan"),
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
    }


# ---------------------------------------------------------------------------------------------
# Launching our server
# ---------------------------------------------------------------------------------------------
def _server_cpu_s(pid: Optional[int]) -> Optional[dict]:
    """CPU seconds (user + system) the launched server has used, in its main thread (the event
    loop's: HTTP, streaming) and in all its other threads (the engine's step and launch threads,
    XLA's); None where /proc cannot tell (not Linux, or no subprocess). A thread that exits takes
    its time with it: the server's threads live as long as it does."""
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {"event_loop": 0.0, "other_threads": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread exited since the listing: its time went with it
            continue
        try:
            # Fields 14 and 15 of stat (utime, stime), counted after the command name.
            s = (int(fields[11]) + int(fields[12])) / tick
        except (ValueError, IndexError):
            return None
        out["event_loop" if int(tid) == pid else "other_threads"] += s
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base: str, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    import urllib.request
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the launched server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"the launched server was not healthy after {timeout:.0f}s")


class _Launched:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: Optional[subprocess.Popen] = None
        self.thread: Any = None
        self.url = ""

    def __enter__(self) -> "_Launched":
        args = self.args
        C.ensure_tokenizer(args)
        if args.launch == "inprocess":
            from jaxvllm.entrypoints.openai.launch import ServerThread
            C.log("starting the server in-process ...")
            self.thread = ServerThread(C.engine_args_from(args),
                                       ready_timeout=args.launch_timeout).start()
            self.url = self.thread.url
        else:
            port = _free_port()
            cmd = [sys.executable, "-m", "jaxvllm.entrypoints.cli", "serve", *C.engine_flags(args),
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            C.log("starting: " + " ".join(cmd))
            self.proc = subprocess.Popen(cmd, env=C.child_env(), stdout=sys.stderr)
            self.url = f"http://127.0.0.1:{port}"
            try:
                _wait_health(self.url, args.launch_timeout, self.proc)
            except BaseException:
                self.__exit__()
                raise
        C.log(f"server ready at {self.url}")
        return self

    def vocab_size(self) -> Optional[int]:
        if self.thread is not None:
            cfg = getattr(getattr(self.thread.engine, "engine", None), "model_config", None)
            if cfg is not None:
                return cfg.vocab_size
        cfg = C.model_config_dict(self.args.model)
        return (cfg or {}).get("vocab_size")

    def __exit__(self, *exc: Any) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _check_url(url: str) -> str:
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise SystemExit(f"--base-url must be an explicit http(s)://host:port URL, got {url!r}")
    return url.rstrip("/")


async def _model_name(args: argparse.Namespace, base: str, launched: bool) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model and not launched:
        return args.model
    import aiohttp
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/v1/models", headers=headers) as r:
            data = await r.json()
    return data["data"][0]["id"]


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be >= 1")
    rates = args.request_rates or args.request_rate or [float("inf")]
    launched = _Launched(args) if args.launch != "none" else None
    try:
        if launched is not None:
            launched.__enter__()
            base = launched.url
        else:
            base = _check_url(args.base_url or DEFAULT_URL)
        vocab = args.vocab_size or (launched.vocab_size() if launched else None) or 32000
        model = asyncio.run(_model_name(args, base, launched is not None))
        runs = []
        pid = launched.proc.pid if launched is not None and launched.proc is not None else None
        for rate in rates:
            C.log(f"rate {rate} req/s: up to {args.num_prompts} requests"
                  + (f", {args.duration:.0f}s" if args.duration else ""))
            cpu = _server_cpu_s(pid)
            runs.append(asyncio.run(_run_rate(args, base, model, vocab, rate)))
            after = _server_cpu_s(pid)
            if cpu is not None and after is not None and runs[-1]["output_tokens"]:
                runs[-1]["server_cpu_us_per_token"] = {
                    k: 1e6 * (after[k] - cpu[k]) / runs[-1]["output_tokens"] for k in cpu}
    finally:
        if launched is not None:
            launched.__exit__()
    result = {"benchmark": "serve", "base_url": base, "model": model,
              "launch": args.launch, "input_len": str(args.input_len),
              "output_len": str(args.output_len), "prompt_type": args.prompt_type,
              "num_prompts": args.num_prompts, "duration_limit_s": args.duration, "runs": runs}
    rows = []
    for r in runs:
        rows.append([r["request_rate"], f"{r['completed']}/{r['num_sent']}", r["requests_per_s"],
                     r["output_tokens_per_s"], r["ttft_ms"]["p50"], r["ttft_ms"]["p90"],
                     r["ttft_ms"]["p99"], r["tpot_ms"]["p50"], r["tpot_ms"]["p90"],
                     r["itl_ms"]["p50"], r["itl_ms"]["p99"], r["goodput_requests_per_s"]])
    header = ["rate", "done/sent", "req/s", "out tok/s", "TTFT p50", "TTFT p90", "TTFT p99",
              "TPOT p50", "TPOT p90", "ITL p50", "ITL p99",
              f"goodput req/s (TTFT<={args.slo_ttft_ms:g}, TPOT<={args.slo_tpot_ms:g} ms)"]
    title = (f"serve: {model} at {base}, input {args.input_len}, output {args.output_len} "
             f"({args.prompt_type} prompts); times in ms")
    text = title + "\n" + C.table(rows, header)
    for r in runs:
        if "server_cpu_us_per_token" in r:
            cpu = r["server_cpu_us_per_token"]
            text += (f"\nrate {r['request_rate']:g}: the server's CPU time per output token: event "
                     f"loop thread {cpu['event_loop']:.1f} us, its other threads "
                     f"{cpu['other_threads']:.1f} us")
    errs = sorted({e for r in runs for e in r["errors"]})
    if errs:
        text += "\nerrors: " + "; ".join(errs)
    C.emit(result, args, text)
    return 0 if all(r["completed"] for r in runs) else 1


def main(argv: Optional[list[str]] = None) -> int:
    return C.script_main("serve", __doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
