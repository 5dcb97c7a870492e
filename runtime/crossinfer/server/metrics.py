"""Prometheus metrics, in a registry owned by one app (never prometheus-client's global one).

Engine state (queues, KV cache, token counters) is read from the engine thread's latest
snapshot when scraped; per-request latencies are observed as outputs reach the server, so
they include the HTTP side: time to first token runs from the request's submission.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crossinfer.engine.async_engine import EngineStats
from crossinfer.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


_HELP = {
    "num_requests_running": "Sequences in the running batch.",
    "num_requests_waiting": "Sequences waiting for admission (new or preempted).",
    "kv_cache_usage_ratio": "Fraction of KV-cache blocks held by a request.",
    "kv_cache_free_blocks": "KV-cache blocks free (cached but unused ones count as free).",
    "prefix_cache_hit_rate": "Prompt tokens found in the prefix cache / prompt tokens looked up.",
    "prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache.",
    "num_preemptions": "Sequences preempted (to be recomputed later).",
    "prompt_tokens": "Prompt tokens of requests that produced a first token.",
    "generation_tokens": "Tokens generated.",
}


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's snapshot at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        queried = s.num_prefix_queried_tokens
        hit_rate = s.num_prefix_hit_tokens / queried if queried else 0.0
        yield self._family(GaugeMetricFamily, "num_requests_running", s.num_running)
        yield self._family(GaugeMetricFamily, "num_requests_waiting", s.num_waiting)
        yield self._family(GaugeMetricFamily, "kv_cache_usage_ratio", s.kv_cache_usage)
        yield self._family(GaugeMetricFamily, "kv_cache_free_blocks", s.num_free_blocks)
        yield self._family(GaugeMetricFamily, "prefix_cache_hit_rate", hit_rate)
        yield self._family(CounterMetricFamily, "prefix_cache_queried_tokens", queried)
        yield self._family(CounterMetricFamily, "prefix_cache_hit_tokens", s.num_prefix_hit_tokens)
        yield self._family(CounterMetricFamily, "num_preemptions", s.num_preemptions)
        yield self._family(CounterMetricFamily, "prompt_tokens", s.num_prompt_tokens)
        yield self._family(CounterMetricFamily, "generation_tokens", s.num_generation_tokens)

    def _family(
        self, kind: type[GaugeMetricFamily | CounterMetricFamily], name: str, value: float
    ) -> Metric:
        family = kind(f"crossinfer_{name}", _HELP[name], labels=["model_name"])
        family.add_metric(self._labels, float(value))
        return family


class ServerMetrics:
    """The app's registry: engine gauges and counters, and per-request latency histograms."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                f"crossinfer_{name}", doc, ["model_name"], registry=self.registry, buckets=buckets
            )

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "From submission to the first generated token.",
            _LATENCY_BUCKETS,
        ).labels(model_name)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first.",
            _TOKEN_BUCKETS,
        ).labels(model_name)
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "From submission to the last token.", _LATENCY_BUCKETS
        ).labels(model_name)
        self._finished = Counter(
            "crossinfer_request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._model_name = model_name

    def timer(self) -> Callable[[RequestOutput], None]:
        """An observer for one HTTP request's outputs; start timing now."""
        return _RequestTimer(self)

    def observe_finished(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            reason = completion.finish_reason or "unknown"
            self._finished.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        """The text exposition format of everything in the registry."""
        return generate_latest(self.registry)


class _RequestTimer:
    """Times the requests of one HTTP request from its submission (``time.monotonic``)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._start = time.monotonic()
        self._first_token: dict[str, float] = {}

    def __call__(self, output: RequestOutput) -> None:
        now = time.monotonic()
        first = self._first_token.get(output.request_id)
        if first is None and any(c.num_new_tokens for c in output.outputs):
            first = self._first_token[output.request_id] = now
            self._metrics.time_to_first_token.observe(now - self._start)
        if not output.finished:
            return
        self._metrics.e2e_latency.observe(now - self._start)
        self._metrics.observe_finished(output)
        num_tokens = max(len(c.token_ids) for c in output.outputs)
        if first is not None and num_tokens > 1:
            self._metrics.time_per_output_token.observe((now - first) / (num_tokens - 1))
