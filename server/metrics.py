"""Prometheus metrics (`scheinfer:*`), one CollectorRegistry per app.

Request-level metrics are observed by the serving code as outputs reach the event loop; engine
gauges are refreshed from `AsyncEngine.stats()` at every scrape; step times come from the engine
thread through `observe_step` (prometheus-client is thread-safe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                            0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

# Engine-stats attributes exported as counters of their increase (name in stats -> metric name).
_BUSY_COUNTERS: dict[str, tuple[str, str]] = {
    "cpu_busy_s": ("scheinfer:cpu_pool_busy_seconds", "seconds the CPU pool computed"),
    "gpu_busy_s": ("scheinfer:gpu_busy_seconds", "seconds the GPU computed"),
    "pcie_busy_s": ("scheinfer:pcie_busy_seconds", "seconds the CPU->GPU copy stream was busy"),
    "bytes_streamed": ("scheinfer:streamed_bytes", "weight bytes streamed CPU->GPU"),
    "decode_moves": ("scheinfer:decode_feedback_moves", "moves of the decode feedback (host pieces between PCIe and CPU)"),
}
# Engine-stats attributes exported as gauges of their last value (the decode feedback's state).
_DECODE_GAUGES: dict[str, tuple[str, str]] = {
    "decode_shift": ("scheinfer:decode_feedback_shift",
                     "host pieces per decode layer moved from PCIe to the CPU against the plan (negative: the other way)"),
    "decode_imbalance_s": ("scheinfer:decode_imbalance_seconds",
                           "decode layers' median imbalance, last copy's end minus the CPU job's (last window)"),
    "decode_layer_period_s": ("scheinfer:decode_layer_period_seconds",
                              "decode layers' median gate-to-gate period (last window; 0: not measured)"),
}


class ServerMetrics:
    """All metrics of one app, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("scheinfer:requests", "finished requests", ["finish_reason", "status"], registry=r)
        self.prompt_tokens = Counter("scheinfer:prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("scheinfer:generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "scheinfer:time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.inter_token_latency = Histogram(
            "scheinfer:inter_token_latency_seconds", "time between generated tokens",
            buckets=_TOKEN_LATENCY_BUCKETS_S, registry=r,
        )
        self.e2e_request_latency = Histogram(
            "scheinfer:e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.queue_time = Histogram(
            "scheinfer:queue_time_seconds", "arrival until the engine started the request",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.num_requests_running = Gauge("scheinfer:num_requests_running", "requests in the engine", registry=r)
        self.num_requests_waiting = Gauge(
            "scheinfer:num_requests_waiting", "requests waiting to be scheduled", registry=r
        )
        self.kv_cache_usage = Gauge("scheinfer:kv_cache_usage_ratio", "fraction of KV blocks in use", registry=r)
        self.step_time = Histogram(
            "scheinfer:step_time_seconds", "engine step time by kind (prefill, decode, mixed)", ["kind"],
            buckets=_TOKEN_LATENCY_BUCKETS_S, registry=r,
        )
        self.engine_steps_failed = Counter("scheinfer:engine_step_failures", "steps that raised", registry=r)
        self.busy = {
            stat: Counter(name, doc, registry=r) for stat, (name, doc) in _BUSY_COUNTERS.items()
        }
        self._last_busy: dict[str, float] = {}
        self.decode = {stat: Gauge(name, doc, registry=r) for stat, (name, doc) in _DECODE_GAUGES.items()}
        self._last_step_seen: Any = None
        self.plan = Info("scheinfer:plan", "placement plan in force", registry=r)

    # ---- engine side ----------------------------------------------------------------------------

    def observe_step(self, duration_s: float, stats: Any, failed: bool) -> None:
        """Called on the engine thread after every step."""
        last_step = getattr(stats, "last_step", None)
        if last_step is not None and last_step is self._last_step_seen and not failed:
            return  # an empty step: nothing was computed
        self._last_step_seen = last_step
        kind = str(getattr(last_step, "kind", "unknown"))
        step_s = getattr(last_step, "duration_s", None)
        if failed or last_step is None:
            kind, step_s = ("failed" if failed else "unknown"), duration_s
        self.step_time.labels(kind=kind).observe(float(step_s) if step_s is not None else duration_s)
        if failed:
            self.engine_steps_failed.inc()
        for stat, counter in self.busy.items():
            value = getattr(stats, stat, None)
            if value is None:
                continue
            increase = float(value) - self._last_busy.get(stat, 0.0)
            if increase > 0:
                counter.inc(increase)
            self._last_busy[stat] = float(value)
        for stat, gauge in self.decode.items():
            value = getattr(stats, stat, None)
            if value is not None:
                gauge.set(float(value))

    def refresh_engine_gauges(self, engine_stats: Any, num_waiting_first_output: int) -> None:
        """Set the running/waiting/KV gauges from the latest LLMEngine.stats()."""
        running = _first_attr(engine_stats, ("num_running", "num_running_requests", "running"), None)
        waiting = _first_attr(engine_stats, ("num_waiting", "num_waiting_requests", "waiting"), None)
        usage = _first_attr(engine_stats, ("kv_cache_usage", "kv_usage", "kv_cache_usage_ratio"), None)
        self.num_requests_running.set(float(running) if running is not None else 0.0)
        self.num_requests_waiting.set(float(waiting) if waiting is not None else float(num_waiting_first_output))
        if usage is not None:
            self.kv_cache_usage.set(float(usage))

    def set_plan(self, plan: dict[str, Any]) -> None:
        self.plan.info({str(key): str(value) for key, value in plan.items() if not isinstance(value, dict | list)})

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestTimer:
    """Latency bookkeeping of one engine request (event-loop side)."""

    metrics: ServerMetrics
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    def on_tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now_s = time.monotonic()
        since_s = self.last_token_s
        if self.first_token_s is None:
            self.first_token_s = since_s = now_s
            self.metrics.time_to_first_token.observe(now_s - self.arrival_s)
            num_new_tokens -= 1  # tokens delivered with the first one count as arriving with it
        if since_s is not None and num_new_tokens > 0:
            per_token_s = (now_s - since_s) / num_new_tokens
            for _ in range(num_new_tokens):
                self.metrics.inter_token_latency.observe(per_token_s)
        self.last_token_s = now_s

    def on_queue_time(self, queue_time_s: float) -> None:
        self.metrics.queue_time.observe(max(queue_time_s, 0.0))

    def on_finish(self, finish_reason: str | None, status: int, num_prompt_tokens: int,
                  num_generated_tokens: int) -> None:
        self.metrics.requests.labels(finish_reason=finish_reason or "none", status=str(status)).inc()
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        self.metrics.generation_tokens.inc(num_generated_tokens)
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival_s)


def _first_attr(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    if obj is None:
        return default
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return default
