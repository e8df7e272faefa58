"""Prometheus metrics for the server, under the `jaxvllm:` prefix (in the spirit of vLLM's `vllm:`).

Each server owns a private CollectorRegistry, so several servers can live in one process (tests).
Engine-side state (running/waiting counts, KV-cache usage, prefix-cache counters, preemptions) is read
from `engine.get_replica_stats()` at scrape time, one series per data-parallel replica under the
`engine` label (vLLM's; "0" without data parallelism); request-level counters and histograms are fed
by the server as requests finish.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# No `*_created` sample series next to every counter (as vLLM does).
prometheus_client.disable_created_metrics()

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector:
    """Reads each replica's stats on each scrape."""

    def __init__(self, get_engine: Callable[[], Any], model_name: str):
        self._get_engine = get_engine
        self._model = model_name

    def describe(self):  # no pre-registration lookups at register time
        return []

    def collect(self):
        engine = self._get_engine()
        per_replica: list = [None]  # zeros for replica 0 until the engine answers
        if engine is not None:
            try:
                per_replica = engine.get_replica_stats()
            except Exception:  # a scrape must never fail because the engine is mid-update
                logger.exception("engine.get_replica_stats() failed")
        g = lambda stats, v: float(operator.attrgetter(v)(stats) or 0) if stats is not None else 0.0
        labels = ["model_name", "engine"]
        for kind, name, attr, doc in (
                (GaugeMetricFamily, "jaxvllm:num_requests_running", "num_running",
                 "Requests in the running batch."),
                (GaugeMetricFamily, "jaxvllm:num_requests_waiting", "num_waiting",
                 "Requests waiting to be scheduled."),
                (GaugeMetricFamily, "jaxvllm:kv_cache_usage_perc", "kv_cache_usage",
                 "KV-cache usage (1 = full)."),
                (CounterMetricFamily, "jaxvllm:prefix_cache_queries", "prefix_cache_queries",
                 "Prompt tokens looked up in the prefix cache."),
                (CounterMetricFamily, "jaxvllm:prefix_cache_hits", "prefix_cache_hits",
                 "Prompt tokens found in the prefix cache."),
                (CounterMetricFamily, "jaxvllm:num_preemptions", "num_preemptions",
                 "Preempted requests."),
                (CounterMetricFamily, "jaxvllm:spec_decode_num_drafts", "spec_decode.num_drafts",
                 "Speculative decoding: request steps that verified guesses."),
                (CounterMetricFamily, "jaxvllm:spec_decode_num_draft_tokens",
                 "spec_decode.num_draft_tokens", "Speculative decoding: guesses verified."),
                (CounterMetricFamily, "jaxvllm:spec_decode_num_accepted_tokens",
                 "spec_decode.num_accepted_tokens", "Speculative decoding: guesses accepted.")):
            m = kind(name, doc, labels=labels)
            for i, stats in enumerate(per_replica):
                m.add_metric([self._model, str(i)], g(stats, attr))
            yield m


class ServerMetrics:
    def __init__(self, model_name: str, get_engine: Callable[[], Any],
                 get_in_flight: Optional[Callable[[], int]] = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        r, L = self.registry, ["model_name"]
        r.register(_EngineStatsCollector(get_engine, model_name))
        self.prompt_tokens = Counter("jaxvllm:prompt_tokens", "Prompt tokens processed.", L, registry=r)
        self.generation_tokens = Counter("jaxvllm:generation_tokens", "Tokens generated.", L,
                                         registry=r)
        self.request_success = Counter("jaxvllm:request_success",
                                       "Finished requests (one per choice), by finish reason.",
                                       L + ["finished_reason"], registry=r)
        self.http_errors = Counter("jaxvllm:http_request_errors",
                                   "Requests answered with an error status, by status.",
                                   L + ["status"], registry=r)
        self.rejected = Counter("jaxvllm:requests_rejected",
                                "Requests refused by backpressure (503).", L, registry=r)
        self.ttft = Histogram("jaxvllm:time_to_first_token_seconds", "Time to first token.", L,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("jaxvllm:inter_token_latency_seconds", "Time between output tokens.", L,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jaxvllm:e2e_request_latency_seconds", "Request latency, end to end.",
                             L, buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("jaxvllm:request_queue_time_seconds",
                                    "Time from arrival to first scheduling.", L,
                                    buckets=_E2E_BUCKETS, registry=r)
        if get_in_flight is not None:
            g = Gauge("jaxvllm:num_requests_in_flight",
                      "Sequences (prompts x n) admitted by the server and not finished.", L,
                      registry=r)
            g.labels(model_name).set_function(get_in_flight)
        # Pre-create the common label sets so they show (at 0) before the first request.
        self.prompt_tokens.labels(model_name)
        self.generation_tokens.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)

    # -- feeding ---------------------------------------------------------------------------------
    def observe_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(self.model_name).inc(generation_tokens)

    def observe_itl(self, dt: float, count: int = 1) -> None:
        h = self.itl.labels(self.model_name)
        for _ in range(max(0, count)):
            h.observe(max(dt, 0.0))

    def observe_finished(self, metrics: Optional[dict], finish_reasons: list[Optional[str]]) -> None:
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason or "abort").inc()
        if not metrics:
            return
        arr = metrics.get("arrival_time")
        sched = metrics.get("first_scheduled_time")
        first = metrics.get("first_token_time")
        fin = metrics.get("finished_time")
        try:
            if arr is not None and first is not None:
                self.ttft.labels(self.model_name).observe(max(first - arr, 0.0))
            if arr is not None and sched is not None:
                self.queue_time.labels(self.model_name).observe(max(sched - arr, 0.0))
            if arr is not None and fin is not None:
                self.e2e.labels(self.model_name).observe(max(fin - arr, 0.0))
        except TypeError:
            logger.warning("unexpected request metrics: %r", metrics)

    def observe_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
