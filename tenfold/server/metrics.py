"""Per-adapter and per-family Prometheus metrics, exported on vLLM's /metrics beside vLLM's own.

Request metrics are observed around the engine client's `generate` (so HTTP and gRPC traffic both count); load and
unload metrics around `add_lora` / `remove_lora`; residency per adapter and tier (device slot, host cache), pins,
tier entries and exits come from the workers' residency ledger, read at every /metrics scrape (`ResidencyTracker`).
Family labels and sizes are the facts recorded when this process validated an adapter's version: nothing here loads
an adapter, and what stats its files runs off the event loop. vLLM's own `vllm:lora_requests_info` is left as vLLM
exports it.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from .adapter_admin import PENDING

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
LOAD_LATENCY = Histogram("tenfold_adapter_load_seconds", "Adapter load latency", ["family"], buckets=LATENCY_BUCKETS)
VERSIONS = Gauge("tenfold_adapter_versions", "Adapter versions the engine holds: each loaded adapter's current one, "
                 "plus retired ones (unloaded or rewritten) that requests in flight still use")


def family_of(lora_request, facts_of, failed: bool = False) -> str:
    """The family label: `facts_of(path)` gives the facts recorded when this process validated the adapter's current
    version (None when it has not: `pending`, or `invalid` for a request that failed). Never loads an adapter."""
    if lora_request is None:
        return BASE
    facts = facts_of(lora_request.lora_path)
    return facts.family if facts is not None else "invalid" if failed else PENDING


class RequestTracker:
    """One generation request: counts it and its tokens, times first token and completion. Its labels are settled
    (`settle`, a stat of the adapter's files: off the event loop) at its first output or failure, once admission has
    validated its adapter; a request cancelled before either is labelled `pending`."""

    def __init__(self, lora_request, facts_of, delta_outputs: bool):
        self.lora_request = lora_request
        self.facts_of = facts_of
        self.labels: tuple[str, str] | None = None
        self.delta = delta_outputs
        self.start = time.perf_counter()
        self.first_token_seen = False
        self.prompt_tokens = 0
        self.generated = 0

    def settle(self, failed: bool = False) -> None:
        self._count(family_of(self.lora_request, self.facts_of, failed))

    def _count(self, family: str) -> None:
        if self.labels is None:
            self.labels = (self.lora_request.lora_name if self.lora_request else BASE, family)
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
        self._count(BASE if self.lora_request is None else PENDING)  # cancelled before its first output
        PROMPT_TOKENS.labels(*self.labels).inc(self.prompt_tokens)
        GENERATED_TOKENS.labels(*self.labels).inc(self.generated)
        E2E.labels(*self.labels).observe(time.perf_counter() - self.start)


class LoadTracker:
    def __init__(self, lora_request, facts_of):
        self.lora_request = lora_request
        self.facts_of = facts_of
        self.start = time.perf_counter()

    def done(self, ok: bool) -> None:
        """After the load: its family is recorded by then (a stat; call it off the event loop)."""
        if ok:
            family = family_of(self.lora_request, self.facts_of)
            LOADS.labels(family).inc()
            LOAD_LATENCY.labels(family).observe(time.perf_counter() - self.start)
        else:
            LOAD_FAILURES.inc()


def note_unload(lora_id: int) -> None:
    UNLOADS.inc()


class ResidencyTracker:
    """Reads the workers' residency ledger (`engine/residency.py`) at every /metrics scrape and exports it per adapter:
    the ledger is updated by the workers as adapters move, so the scrape sees the state at that moment and the
    cumulative tier entries and exits in between (an adapter loaded and evicted between two scrapes is counted)."""

    def __init__(self, admin):
        self.admin = admin  # the engine's AdapterAdmin: the workers' ledger, the registered names, their facts
        self.snapshot: dict | None = None
        self.facts: dict[str, tuple[str, int, int]] = {}  # name -> (family, own bytes, worker bytes)
        for previous in _collectors:  # one exporter per process: the newest engine's
            REGISTRY.unregister(previous)
        REGISTRY.register(self)
        _collectors[:] = [self]

    def _facts(self, names: set[str], registered: dict) -> dict[str, tuple[str, int, int]]:
        """Each name's recorded facts (a stat per adapter, run off the event loop); an adapter whose current version
        is not validated yet keeps the facts it was last seen with."""
        facts = {}
        for name in names:
            lora = registered.get(name)
            recorded = self.admin.facts_of(lora.lora_path) if lora is not None else None
            if recorded is not None:
                facts[name] = (recorded.family, recorded.nbytes, recorded.worker_bytes)
            elif name in self.facts:
                facts[name] = self.facts[name]
        return facts

    async def refresh(self) -> None:
        engine_client = self.admin.state.engine_client
        snapshot = await self.admin.residency()
        versions = getattr(engine_client, "_tenfold_versions", None)
        VERSIONS.set(versions.live_versions() if versions is not None else 0)
        registered = dict(self.admin.models.lora_requests)
        self.facts = await asyncio.to_thread(self._facts, set(registered) | set(snapshot["adapters"]), registered)
        snapshot["registered"] = sorted(registered)
        self.snapshot = snapshot

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self.snapshot
        if snapshot is None:
            return
        held = snapshot["adapters"]
        resident = GaugeMetricFamily("tenfold_adapter_resident", "1 while the adapter is in the tier: device (an "
                                     "adapter slot) or host (the workers' adapter cache)",
                                     labels=["adapter", "family", "tier"])
        pinned = GaugeMetricFamily("tenfold_adapter_pinned", "1 while the adapter is pinned (never evicted)",
                                   labels=["adapter", "family"])
        nbytes = GaugeMetricFamily("tenfold_adapter_resident_bytes", "Bytes the adapter takes in the tier while "
                                   "resident: host its own factors, device its slot-table row (native) or LoRA factors "
                                   "(convert)", labels=["adapter", "family", "tier"])
        counts = {tier: 0 for tier in TIER_NAMES}
        tier_bytes = {tier: 0 for tier in TIER_NAMES}
        for name in sorted(set(snapshot["registered"]) | set(held)):
            family, own, worker = self.facts.get(name, (PENDING, 0, 0))
            tiers = held.get(name, {}).get("tiers", [])
            for tier in TIER_NAMES:
                present = tier in tiers
                resident.add_metric([name, family, tier], float(present))
                if present:
                    size = own if tier == "host" else worker
                    nbytes.add_metric([name, family, tier], size)
                    counts[tier] += 1
                    tier_bytes[tier] += size
            pinned.add_metric([name, family], float(name in snapshot["pinned"]))
        entries = CounterMetricFamily("tenfold_adapter_tier_entries", "Times the adapter entered the tier (a load into "
                                      "the host cache, an activation into a device slot)", labels=["adapter", "tier"])
        for name, tier, n in snapshot["entries"]:
            entries.add_metric([name, tier], n)
        exits = CounterMetricFamily("tenfold_adapter_tier_exits", "Times the adapter left the tier, by reason: evicted "
                                    "(to make room) or unloaded", labels=["adapter", "tier", "reason"])
        evicted = 0
        for name, tier, reason, n in snapshot["exits"]:
            exits.add_metric([name, tier, reason], n)
            evicted += n if (tier, reason) == ("host", "evicted") else 0
        evictions = CounterMetricFamily("tenfold_adapter_evictions", "Adapters evicted from the workers' adapter cache "
                                        "(host tier) to make room")
        evictions.add_metric([], evicted)
        totals = GaugeMetricFamily("tenfold_resident_adapters", "Adapters per tier: registered names, the workers' "
                                   "adapter cache (worker_cache), adapter slots (device)", labels=["tier"])
        totals.add_metric(["registered"], len(snapshot["registered"]))
        totals.add_metric(["worker_cache"], counts["host"])
        totals.add_metric(["device"], counts["device"])
        total_bytes = GaugeMetricFamily("tenfold_resident_adapter_bytes", "Bytes of adapter weights per tier",
                                        labels=["tier"])
        total_bytes.add_metric(["registered"], sum(self.facts.get(n, ("", 0, 0))[1] for n in snapshot["registered"]))
        total_bytes.add_metric(["worker_cache"], tier_bytes["host"])
        total_bytes.add_metric(["device"], tier_bytes["device"])
        yield from (resident, pinned, nbytes, entries, exits, evictions, totals, total_bytes)
        yield from _adapter_memory(snapshot.get("adapter_memory"))


def _adapter_memory(memory: dict | None):
    """The native adapter memory of rank 0's worker: its budget, what is placed in it, and what a step placed beyond
    it (served rather than refused, given back at the next steps)."""
    if memory is None:  # convert mode: vLLM's own LoRA buffers
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    gauge = GaugeMetricFamily("tenfold_adapter_memory_bytes", "Native adapter memory: the budget (--adapter-memory), "
                              "the bytes placed in it, and the bytes placed beyond it now", labels=["kind"])
    for kind in ("budget", "used", "beyond"):
        gauge.add_metric([kind], memory[kind])
    yield gauge
    beyond = CounterMetricFamily("tenfold_adapter_memory_beyond_budget_bytes", "Every byte a step placed beyond the "
                                 "adapter memory budget (given back when it fits again or is no longer needed)")
    beyond.add_metric([], memory["beyond_total"])
    yield beyond


TIER_NAMES = ("device", "host")
_collectors: list[ResidencyTracker] = []
