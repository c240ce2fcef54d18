"""Where each adapter lives inside one worker, kept as it changes, and which adapter names are pinned there.

Two tiers: `device` (a slot the forward reads: vLLM's active adapters) and `host` (the worker's adapter cache:
vLLM's registered adapters). The worker calls `observe` after every change it makes (a step's activations, a load,
an unload, a pin), so an adapter loaded and evicted between two scrapes of /metrics is still counted: the ledger
keeps cumulative entries and exits per adapter name and tier, and the server reads a `snapshot` at scrape time
(`collective_rpc`, `engine/patches/worker_residency.py`).

Pins are by adapter name, not engine id: every version of a pinned name (a rewrite makes a new one) is pinned when it
arrives, and an unpin releases them all. A pin holds an adapter in the host cache: it never has to be read from disk
again. Device slots stay LRU: vLLM's scheduler gives a step up to max_loras distinct adapters and expects them all to
find a slot, so a slot held by an adapter the step does not use could make it fail.
"""

from __future__ import annotations

from collections import Counter

TIERS = ("device", "host")
EVICTED, UNLOADED = "evicted", "unloaded"


class PinError(ValueError):
    """A pin that cannot hold: more pinned names than the workers' cache leaves room for."""


def pin_capacity(device_slots: int, host_capacity: int) -> int:
    """Pinned names one engine accepts: beside them, the host cache must still take every adapter of one step (up
    to device_slots of them), or loading a step's adapters would have to evict one of its own."""
    return max(0, host_capacity - device_slots)


class ResidencyLedger:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # engine id -> adapter name, for every id the worker has seen
        self.pinned_names: set[str] = set()
        self._resident: dict[str, set[int]] = {tier: set() for tier in TIERS}
        self._unloading: set[int] = set()
        self.entries: Counter[tuple[str, str]] = Counter()  # (name, tier) -> times it entered the tier
        self.exits: Counter[tuple[str, str, str]] = Counter()  # (name, tier, evicted|unloaded) -> times it left

    def named(self, engine_id: int, name: str) -> None:
        self.names[engine_id] = name

    def is_pinned(self, engine_id: int) -> bool:
        return self.names.get(engine_id) in self.pinned_names

    def unloading(self, engine_ids) -> None:
        """The next `observe` counts these ids' exits as unloads, not evictions."""
        self._unloading.update(engine_ids)

    def observe(self, host_ids, device_ids) -> None:
        was_resident = self._resident["host"] | self._resident["device"]
        for tier, now in (("host", set(host_ids)), ("device", set(device_ids))):
            before = self._resident[tier]
            for engine_id in now - before:
                self.entries[self._name(engine_id), tier] += 1
            for engine_id in before - now:
                reason = UNLOADED if engine_id in self._unloading else EVICTED
                self.exits[self._name(engine_id), tier, reason] += 1
            self._resident[tier] = now
        resident = self._resident["host"] | self._resident["device"]
        self._unloading &= resident
        for engine_id in was_resident - resident:  # the load that brings it back names it again
            self.names.pop(engine_id, None)

    def _name(self, engine_id: int) -> str:
        return self.names.get(engine_id, f"#{engine_id}")  # vLLM's warm-up dummies have no name

    def snapshot(self, device_slots: int, host_capacity: int) -> dict:
        """Plain data (it crosses process boundaries): per resident adapter its tiers and pin, plus the counters."""
        adapters: dict[str, dict] = {}
        for tier in TIERS:
            for engine_id in self._resident[tier]:
                if engine_id not in self.names:
                    continue
                name = self.names[engine_id]
                entry = adapters.setdefault(name, {"tiers": set(), "engine_ids": set()})
                entry["tiers"].add(tier)
                entry["engine_ids"].add(engine_id)
        return {
            "adapters": {name: {"tiers": sorted(e["tiers"]), "engine_ids": sorted(e["engine_ids"]),
                                "pinned": name in self.pinned_names} for name, e in adapters.items()},
            "pinned": sorted(self.pinned_names),
            "entries": [[name, tier, n] for (name, tier), n in self.entries.items() if not name.startswith("#")],
            "exits": [[name, tier, reason, n] for (name, tier, reason), n in self.exits.items()
                      if not name.startswith("#")],
            "device_slots": device_slots,
            "host_capacity": host_capacity,
        }
