"""The server's Prometheus metrics (GET /metrics): gauges and counters the engine thread updates
where the steps happen, and the prefix cache's and speculation's counters read from the engine
when asked."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(PrefixCacheCounters(engine))
        r.register(SpeculationCounters(engine))
        self.running = Gauge("llama_lite_requests_running", "Requests holding a KV-cache row", registry=r)
        self.waiting = Gauge("llama_lite_requests_waiting", "Requests waiting for a KV-cache row", registry=r)
        self.rows_in_use = Gauge("llama_lite_kv_cache_rows_in_use", "KV-cache rows held by requests", registry=r)
        # vLLM's names, which Kubernetes LLM gateways (llm-d, the Gateway API Inference Extension) read to
        # pick a replica; kv_cache_usage_perc is vLLM's newer name for gpu_cache_usage_perc (a fraction, 0..1).
        self.vllm = {name: Gauge(f"vllm:{name}", what, registry=r) for name, what in [
            ("num_requests_running", "Requests holding a KV-cache row (vLLM's name)"),
            ("num_requests_waiting", "Requests waiting for a KV-cache row (vLLM's name)"),
            ("gpu_cache_usage_perc", "Share of KV-cache rows held by requests, 0..1, on any device (vLLM's name)"),
            ("kv_cache_usage_perc", "Share of KV-cache rows held by requests, 0..1 (vLLM's newer name)")]}
        self.prompt_tokens = Counter("llama_lite_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("llama_lite_generation_tokens", "Tokens generated", registry=r)
        self.requests_finished = Counter("llama_lite_requests_finished", "Requests finished", ["finish_reason"], registry=r)
        self.ttft = Histogram("llama_lite_time_to_first_token_seconds", "From a request's arrival to its first new token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.itl = Histogram("llama_lite_inter_token_latency_seconds", "Between a request's successive new tokens",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), registry=r)

    def update_gauges(self, engine):
        """The requests running and waiting, and the rows they hold, as the engine has them now."""
        rows = engine.model.params.max_batch_size
        running, waiting, in_use = len(engine.running), len(engine.waiting), rows - len(engine.free_rows)
        self.running.set(running)
        self.waiting.set(waiting)
        self.rows_in_use.set(in_use)
        for name, value in [("num_requests_running", running), ("num_requests_waiting", waiting),
                            ("gpu_cache_usage_perc", in_use / rows), ("kv_cache_usage_perc", in_use / rows)]:
            self.vllm[name].set(value)


class PrefixCacheCounters:
    """The prefix cache's hits, misses and reused tokens, read from the engine when /metrics is asked
    (ints, so reading them from another thread is safe); zeros with the cache off."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        prefix = self.engine.prefix
        for name, what, value in [
            ("hits", "Requests admitted with the K/V of their prompt's beginning reused", prefix and prefix.hits),
            ("misses", "Requests admitted that found no reusable beginning (prompts of 3+ tokens)", prefix and prefix.misses),
            ("reused_tokens", "Prompt tokens whose K/V were reused instead of prefilled", prefix and prefix.reused_tokens),
        ]:
            yield CounterMetricFamily(f"llama_lite_prefix_cache_{name}", what, value=value or 0)


class SpeculationCounters:
    """Speculative decoding's guessed and accepted tokens, and the decoding steps of requests that
    guessed (tokens per such step: 1 + accepted / steps), read from the engine when /metrics is asked."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        acceptance = self.engine.acceptance
        for name, what, value in [
            ("proposed_tokens", "Tokens guessed by prompt lookup and checked", acceptance.proposed),
            ("accepted_tokens", "Guessed tokens the model agreed with (kept)", acceptance.accepted),
            ("steps", "Decoding steps of requests that guessed", acceptance.steps),
        ]:
            yield CounterMetricFamily(f"llama_lite_speculative_{name}", what, value=value)
