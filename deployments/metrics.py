"""Engine metrics through Ray's metrics API (ray.util.metrics): Ray exports them on each node's Prometheus
endpoint (the `metrics_export_port`), with Ray's `ray_` prefix in front of these names."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from nanovllm_ray.engine.llm_engine import EngineStats

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]
_TPOT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5]
_E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0]


class EngineMetrics:
    """One set per LLMServer replica, tagged with the served model and the replica."""

    def __init__(self, model: str, replica: str) -> None:
        tags = ("model", "replica")
        default = {"model": model, "replica": replica}

        def make(cls, name: str, description: str, keys: tuple[str, ...] = tags, **kw):
            m = cls(name, description=description, tag_keys=keys, **kw)
            m.set_default_tags(default)
            return m

        self.requests = make(Counter, "nanovllm_requests_total", "Requests finished, by finish reason",
                             (*tags, "finish_reason"))
        self.prompt_tokens = make(Counter, "nanovllm_prompt_tokens_total", "Prompt tokens of finished requests")
        self.generation_tokens = make(Counter, "nanovllm_generation_tokens_total", "Tokens generated")
        self.ttft = make(Histogram, "nanovllm_time_to_first_token_seconds", "Time to first token",
                         boundaries=_TTFT_BUCKETS)
        self.tpot = make(Histogram, "nanovllm_time_per_output_token_seconds",
                         "Mean time per output token after the first, per request", boundaries=_TPOT_BUCKETS)
        self.e2e = make(Histogram, "nanovllm_e2e_request_latency_seconds", "Request latency, arrival to last token",
                        boundaries=_E2E_BUCKETS)
        self.running = make(Gauge, "nanovllm_num_requests_running", "Requests in the running batch")
        self.waiting = make(Gauge, "nanovllm_num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = make(Gauge, "nanovllm_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1)")
        self.hit_rate = make(Gauge, "nanovllm_prefix_cache_hit_rate",
                             "Prompt tokens found in the prefix cache / prompt tokens looked up, since start")
        self.cache_queries = make(Counter, "nanovllm_prefix_cache_queries_total",
                                  "Prompt tokens looked up in the prefix cache")
        self.cache_hits = make(Counter, "nanovllm_prefix_cache_hits_total", "Prompt tokens found in the prefix cache")
        self.preemptions = make(Counter, "nanovllm_num_preemptions_total", "Requests preempted")
        self._last = EngineStats(0, 0, 0.0, 0, 0, 0, 0)

    def record_stats(self, s: EngineStats) -> None:
        """Engine-wide state (called from the engine thread, at most every stats interval)."""
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_usage)
        self.hit_rate.set(s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        last = self._last
        if s.prefix_cache_queries > last.prefix_cache_queries:
            self.cache_queries.inc(s.prefix_cache_queries - last.prefix_cache_queries)
        if s.prefix_cache_hits > last.prefix_cache_hits:
            self.cache_hits.inc(s.prefix_cache_hits - last.prefix_cache_hits)
        if s.num_preemptions > last.num_preemptions:
            self.preemptions.inc(s.num_preemptions - last.num_preemptions)
        self._last = s

    def record_request(self, finish_reason: str, num_prompt_tokens: int, num_generated: int, arrival: float,
                       first_token: float | None, end: float) -> None:
        self.requests.inc(1, {"finish_reason": finish_reason})
        if num_prompt_tokens > 0:
            self.prompt_tokens.inc(num_prompt_tokens)
        if num_generated:
            self.generation_tokens.inc(num_generated)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_generated > 1:
                self.tpot.observe((end - first_token) / (num_generated - 1))
        self.e2e.observe(end - arrival)
