"""The workers' residency ledger (engine/residency.py) on its own: tier entries and exits per adapter name, evictions
told from unloads, an adapter that came and went between two snapshots still counted, names kept only while
resident. The ledger as the workers drive it is tested through a server in test_serve.py."""

from __future__ import annotations

from tenfold.engine.residency import ResidencyLedger, pin_capacity


def counts(snapshot) -> tuple[dict, dict]:
    entries = {(name, tier): n for name, tier, n in snapshot["entries"]}
    exits = {(name, tier, reason): n for name, tier, reason, n in snapshot["exits"]}
    return entries, exits


def test_transient_residency_is_counted_between_snapshots():
    ledger = ResidencyLedger()
    for engine_id, name in ((11, "a"), (12, "b"), (13, "c")):
        ledger.named(engine_id, name)
    ledger.observe(host_ids=[11, 12], device_ids=[11])
    ledger.observe(host_ids=[12, 13], device_ids=[13])  # a evicted from both tiers, c in
    ledger.unloading([12])
    ledger.observe(host_ids=[13], device_ids=[13])  # b unloaded
    snapshot = ledger.snapshot(device_slots=4, host_capacity=8)
    entries, exits = counts(snapshot)
    assert entries == {("a", "host"): 1, ("a", "device"): 1, ("b", "host"): 1, ("c", "host"): 1, ("c", "device"): 1}
    assert exits == {("a", "host", "evicted"): 1, ("a", "device", "evicted"): 1, ("b", "host", "unloaded"): 1}
    assert snapshot["adapters"] == {"c": {"tiers": ["device", "host"], "engine_ids": [13], "pinned": False}}
    assert set(ledger.names) == {13}, "names of adapters in neither tier are dropped (a reload names them again)"


def test_versions_of_one_name_and_unnamed_warmup_adapters():
    ledger = ResidencyLedger()
    ledger.named(21, "x")
    ledger.named(22, "x")  # a rewrite: a second version of the same name
    ledger.pinned_names.add("x")
    ledger.observe(host_ids=[21, 22, 99], device_ids=[22, 99])  # 99: vLLM's warm-up dummy, never named
    snapshot = ledger.snapshot(device_slots=2, host_capacity=4)
    assert snapshot["adapters"] == {"x": {"tiers": ["device", "host"], "engine_ids": [21, 22], "pinned": True}}
    assert snapshot["pinned"] == ["x"] and ledger.is_pinned(22) and not ledger.is_pinned(99)
    entries, _ = counts(snapshot)
    assert entries == {("x", "host"): 2, ("x", "device"): 1}


def test_pins_leave_room_for_one_step():
    assert [pin_capacity(slots, cache) for slots, cache in ((2, 5), (4, 4), (16, 64), (8, 4))] == [3, 0, 48, 0]
