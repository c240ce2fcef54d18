"""Per-adapter and per-family Prometheus metrics, exported on vLLM's /metrics beside vLLM's own.

Request metrics are observed around the engine client's `generate` (so HTTP and gRPC traffic both count); load and
unload metrics around `add_lora` / `remove_lora`; residency is refreshed from the engine on every /metrics scrape,
which is also when evictions (adapters that left the workers' cache without an unload) are counted: the workers
evict in their own processes, so an adapter loaded and evicted between two scrapes is not seen.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BASE = "base"

REQUESTS = Counter("tenfold_adapter_requests", "Generation requests that reached the engine", ["adapter", "family"])
ERRORS = Counter("tenfold_adapter_request_errors", "Generation requests that ended in an error", ["adapter", "family"])
PROMPT_TOKENS = Counter("tenfold_adapter_prompt_tokens", "Prompt tokens processed", ["adapter", "family"])
GENERATED_TOKENS = Counter("tenfold_adapter_generation_tokens", "Tokens generated", ["adapter", "family"])
TTFT = Histogram("tenfold_adapter_time_to_first_token_seconds", "Time to first token", ["adapter", "family"],
                 buckets=LATENCY_BUCKETS)
E2E = Histogram("tenfold_adapter_e2e_request_latency_seconds", "End-to-end request latency", ["adapter", "family"],
                buckets=LATENCY_BUCKETS)
LOADS = Counter("tenfold_adapter_loads", "Adapter loads into the engine", ["family"])
LOAD_FAILURES = Counter("tenfold_adapter_load_failures", "Adapter loads the engine refused")
UNLOADS = Counter("tenfold_adapter_unloads", "Adapters removed from the engine")
EVICTIONS = Counter("tenfold_adapter_evictions", "Adapters that left the workers' cache without an unload")
LOAD_LATENCY = Histogram("tenfold_adapter_load_seconds", "Adapter load latency", ["family"], buckets=LATENCY_BUCKETS)
RESIDENT = Gauge("tenfold_resident_adapters", "Adapters per tier (registered names; workers' cache)", ["tier"])
VERSIONS = Gauge("tenfold_adapter_versions", "Adapter versions the engine holds: each loaded adapter's current one, "
                 "plus retired ones (unloaded or rewritten) that requests in flight still use")
RESIDENT_BYTES = Gauge("tenfold_resident_adapter_bytes", "Bytes of adapter weights per tier", ["tier"])


def family_of(lora_request, spec) -> str:
    if lora_request is None:
        return BASE
    from ..engine.loader import adapter_facts

    try:
        return adapter_facts(lora_request.lora_path, spec).family
    except Exception:  # an adapter that fails validation is still counted, as an error
        return "invalid"


class RequestTracker:
    """One generation request: counts it and its tokens, times first token and completion."""

    def __init__(self, lora_request, spec, delta_outputs: bool):
        self.labels = (lora_request.lora_name if lora_request else BASE, family_of(lora_request, spec))
        self.delta = delta_outputs
        self.start = time.perf_counter()
        self.first_token_seen = False
        self.prompt_tokens = 0
        self.generated = 0
        REQUESTS.labels(*self.labels).inc()

    def output(self, output) -> None:
        self.prompt_tokens = len(output.prompt_token_ids or [])
        count = len(output.outputs[0].token_ids) if output.outputs else 0
        self.generated = self.generated + count if self.delta else count
        if count and not self.first_token_seen:
            self.first_token_seen = True
            TTFT.labels(*self.labels).observe(time.perf_counter() - self.start)

    def failed(self) -> None:
        ERRORS.labels(*self.labels).inc()

    def done(self) -> None:
        PROMPT_TOKENS.labels(*self.labels).inc(self.prompt_tokens)
        GENERATED_TOKENS.labels(*self.labels).inc(self.generated)
        E2E.labels(*self.labels).observe(time.perf_counter() - self.start)


class LoadTracker:
    def __init__(self, lora_request, spec):
        self.family = family_of(lora_request, spec)
        self.start = time.perf_counter()

    def done(self, ok: bool) -> None:
        if ok:
            LOADS.labels(self.family).inc()
            LOAD_LATENCY.labels(self.family).observe(time.perf_counter() - self.start)
        else:
            LOAD_FAILURES.inc()


class ResidencyTracker:
    """Refreshes the residency gauges from the engine and counts evictions."""

    def __init__(self, admin, spec):
        self.admin, self.spec = admin, spec
        self.previous: set[int] = set()
        self.unloaded: set[int] = set()

    def note_unload(self, lora_id: int) -> None:
        UNLOADS.inc()
        self.unloaded.add(lora_id)

    async def refresh(self) -> None:
        from ..engine.loader import adapter_facts

        engine_client = self.admin.state.engine_client
        resident = set(await engine_client.list_loras())
        versions = getattr(engine_client, "_tenfold_versions", None)
        VERSIONS.set(versions.live_versions() if versions is not None else 0)
        EVICTIONS.inc(len(self.previous - resident - self.unloaded))
        self.previous, self.unloaded = resident, set()
        registered = list(self.admin.models.lora_requests.values())
        tensor_parallel_size = self.admin.state.vllm_config.parallel_config.tensor_parallel_size
        sizes = {}
        for lora in registered:
            try:
                facts = adapter_facts(lora.lora_path, self.spec, tensor_parallel_size=tensor_parallel_size)
            except Exception:
                continue
            sizes[lora.lora_int_id] = (facts.nbytes, facts.worker_bytes)
        RESIDENT.labels("registered").set(len(registered))
        RESIDENT.labels("worker_cache").set(len(resident))
        RESIDENT_BYTES.labels("registered").set(sum(own for own, _ in sizes.values()))
        # native: the adapter's slot-table row; convert: its converted LoRA factors
        RESIDENT_BYTES.labels("worker_cache").set(sum(sizes[i][1] for i in resident if i in sizes))
