"""The adapter memory budget (issue 17): one arena reserved at start-up holds every slot table and frozen-weight
copy; tables never move while adapters come and go; what does not fit is refused with a clear error and what is
resident keeps serving exactly. Slot-store level, without vLLM (the engine's side: test_adapter_memory_engine.py)."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.engine.adapter_memory import ALIGNMENT, AdapterArena, AdapterMemoryError, parse_gib
from tenfold.engine.buckets import BUCKETS
from tenfold.engine.slots import SlotStore
from test_native_ops import FUSED, frozen_layer, native_forward, reference_forward

CPU = torch.device("cpu")


def test_the_arena_reuses_and_merges_freed_ranges():
    arena = AdapterArena(10 * ALIGNMENT, CPU)
    a, b, c = (arena.reserve(2 * ALIGNMENT, what) for what in "abc")
    assert (a, b, c) == (0, 2 * ALIGNMENT, 4 * ALIGNMENT) and arena.largest_free == 4 * ALIGNMENT
    arena.buffer.fill_(7)
    arena.release(b)
    arena.release(a)  # merges with b's range
    assert arena.largest_free == 4 * ALIGNMENT and arena.used == 2 * ALIGNMENT
    d = arena.reserve(3 * ALIGNMENT + 1, "d")  # rounded up to 4 lines: fits the merged range at 0
    assert d == 0 and not arena.buffer[: 4 * ALIGNMENT].any(), "a reservation starts zeroed"
    with pytest.raises(AdapterMemoryError, match="--adapter-memory"):
        arena.reserve(5 * ALIGNMENT, "too big")
    arena.release(c)
    arena.release(d)
    assert arena.used == 0 and arena.largest_free == 10 * ALIGNMENT, "all ranges merge back into one"
    view = arena.view(arena.reserve(6 * 4, "floats"), (2, 3), torch.float32)
    assert view.shape == (2, 3) and view.data_ptr() == arena.buffer.data_ptr()


def test_the_flag_takes_positive_gib():
    assert parse_gib("1.5") == 1.5
    for bad in ("0", "-1", "lots"):
        with pytest.raises(Exception, match="GiB"):
            parse_gib(bad)


def table_addresses(store):
    return {(id(b), name): t.data_ptr() for b in store.buckets.values() for name, t in b.tables.items()}


def check_exact(store, resident, spec, seed):
    """A batch over every resident adapter and base rows, on every fused layer, equals each adapter's reference."""
    g = torch.Generator().manual_seed(seed)
    slots = [-1, *resident]
    slot_of_token = torch.tensor([slots[i % len(slots)] for i in range(3 * len(slots))])
    for layer in range(spec.num_layers):
        for modules in FUSED.values():
            linears, slices, fused_weight = frozen_layer(spec, modules, g)
            x = torch.randn(len(slot_of_token), spec.module_shape(modules[0])[0], generator=g)
            got = native_forward(store, slot_of_token, layer, modules, x, linears, slices, fused_weight)
            want = reference_forward(resident, slot_of_token, layer, modules, x, linears)
            assert torch.allclose(got, want, atol=3e-5, rtol=1e-4), f"layer {layer} {modules}"


def test_loading_and_evicting_adapters_never_moves_a_table(specs):
    spec = specs["gqa"]
    store = SlotStore(spec, 4, torch.float32, CPU)
    adapters = {case: make(case, spec, seed=40 + i) for i, case in enumerate(CASES)}
    twins = {case: make(case, spec, seed=80 + i) for i, case in enumerate(CASES)}  # same shapes, other values
    for adapter in (*adapters.values(), *twins.values()):
        adapter.validate(spec)
    cases = list(CASES)
    for slot, case in enumerate(cases[:4]):
        store.assign(slot, adapters[case])
    before = table_addresses(store)
    resident = {slot: adapters[case] for slot, case in enumerate(cases[:4])}
    generator = torch.Generator().manual_seed(5)
    for step in range(12):  # evict one slot's adapter and load another (a twin of a resident one, or a new family)
        slot = int(torch.randint(4, (1,), generator=generator))
        case = cases[int(torch.randint(len(cases), (1,), generator=generator))]
        adapter = twins[case] if step % 2 else adapters[case]
        store.assign(slot, adapter)
        resident[slot] = adapter
        after = table_addresses(store)
        moved = [key for key, address in before.items() if key in after and after[key] != address]
        assert not moved, f"step {step}: tables moved: {moved}"
        before.update(after)
    check_exact(store, resident, spec, seed=6)


def reservation(spec, slots, adapter):
    store = SlotStore(spec, slots, torch.float32, CPU)
    store.assign(0, adapter)
    return store.memory.used


def test_a_bucket_over_the_budget_is_refused_and_the_resident_adapters_keep_serving(specs):
    spec = specs["mha"]
    lora, miss, bat = (make(case, spec, seed=s) for case, s in (("lora", 1), ("miss", 2), ("bat", 3)))
    for adapter in (lora, miss, bat):
        adapter.validate(spec)
    sizes = {name: reservation(spec, 3, a) for name, a in (("lora", lora), ("miss", miss), ("bat", bat))}
    assert sizes["bat"] > sum(t.numel() * 4 for t in bat.tensors().values()) * 3, "bat's frozen copies count"
    store = SlotStore(spec, 3, torch.float32, CPU, memory_bytes=sizes["lora"] + sizes["miss"] + ALIGNMENT)
    store.assign(0, lora)
    store.assign(1, miss)
    with pytest.raises(AdapterMemoryError, match=r"bat adapter.*--adapter-memory") as refused:
        store.assign(2, bat)
    assert "budget" in str(refused.value)
    assert int(store.bucket_of_slot[2]) == -1, "a refused adapter holds no slot"
    check_exact(store, {0: lora, 1: miss}, spec, seed=7)
    # once miss's bucket is idle, a new bucket takes its memory; lora's tables stay where they are
    lora_tables = {name: t.data_ptr() for name, t in store.buckets[int(store.bucket_of_slot[0])].tables.items()}
    store.release(1)
    other = make("miss", spec, seed=9, r=8)  # another shape: a bucket of its own
    other.validate(spec)
    store.assign(1, other)
    assert {store.buckets[int(b)].family for b in store.bucket_of_slot if b >= 0} == {"lowrank", "miss"}
    assert lora_tables == {n: t.data_ptr() for n, t in store.buckets[int(store.bucket_of_slot[0])].tables.items()}
    check_exact(store, {0: lora, 1: other}, spec, seed=8)


def test_make_room_evicts_until_the_new_bucket_fits(specs):
    """The engine passes make_room (evict the least recently used adapter the step does not need): it is called
    only while the bucket does not fit, after idle buckets gave their memory back."""
    spec = specs["mha"]
    lora, miss = make("lora", spec, seed=1), make("miss", spec, seed=2)
    for adapter in (lora, miss):
        adapter.validate(spec)
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=max(reservation(spec, 2, lora),
                                                                    reservation(spec, 2, miss)))
    store.assign(0, lora)
    calls = []

    def make_room():
        calls.append(len(calls))
        if int(store.bucket_of_slot[0]) < 0:
            return False
        store.release(0)
        return True

    store.assign(1, miss, make_room=make_room)
    assert calls == [0] and int(store.bucket_of_slot[0]) == -1
    check_exact(store, {1: miss}, spec, seed=9)
    with pytest.raises(AdapterMemoryError):
        store.assign(0, lora, make_room=lambda: False)  # miss is needed: nothing can go


def test_split_free_memory_is_compacted_and_moved_tables_keep_serving(specs):
    spec = specs["mha"]
    lorta, lora, miss = (make(case, spec, seed=s) for case, s in (("lorta_heads_out", 1), ("lora", 2), ("miss", 3)))
    for adapter in (lorta, lora, miss):
        adapter.validate(spec)
    sizes = {name: reservation(spec, 2, a) for name, a in (("lorta", lorta), ("lora", lora), ("miss", miss))}
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=sizes["lora"] + sizes["miss"] + ALIGNMENT)
    store.assign(0, lorta)  # at the start of the arena
    store.assign(1, lora)  # after it
    store.release(0)  # lorta's bucket idles; miss fits only in lorta's range and the tail together
    assert sizes["miss"] > store.memory.largest_free
    store.assign(0, miss)
    assert len(store.buckets) == 2 and store.memory.largest_free < sizes["lorta"]
    check_exact(store, {0: miss, 1: lora}, spec, seed=10)


def test_a_step_that_needs_more_than_the_budget_is_served_beyond_it_and_gives_it_back(specs):
    """vLLM scheduled the step already: refusing would stop the engine, so the step is served (with a warning)."""
    spec = specs["mha"]
    lora, miss = make("lora", spec, seed=1), make("miss", spec, seed=2)
    for adapter in (lora, miss):
        adapter.validate(spec)
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=reservation(spec, 2, lora))
    store.assign(0, lora)
    store.assign(1, miss, make_room=lambda: False, in_step=True)
    check_exact(store, {0: lora, 1: miss}, spec, seed=11)
    assert store.memory.used == reservation(spec, 2, lora), "the step's extra bucket lives outside the budget"
    store.release(1)
    assert len(store.buckets) == 1, "a bucket beyond the budget is given back as soon as it is idle"



def bucket_bytes(store, slot):
    return store.buckets[int(store.bucket_of_slot[slot])].packed.size


def frozen_modules_of(adapter, spec):
    """The (layer, module) pairs whose frozen weights the adapter's bucket reads."""
    bucket_cls = BUCKETS[adapter.family]
    return bucket_cls(bucket_cls.signature_of(adapter), spec, torch.float32, CPU).frozen_weights()


def validated(spec, *cases_and_seeds):
    adapters = [make(case, spec, seed=seed) for case, seed in cases_and_seeds]
    for adapter in adapters:
        adapter.validate(spec)
    return adapters


def test_what_a_step_places_beyond_the_budget_is_counted_and_given_back_with_its_frozen_copies(specs):
    """Bat's bucket and the frozen-weight copies it reads, placed beyond the budget inside a step: every byte is in
    the ledger (memory.beyond) until the bucket is idle, then the bucket and the copies no bucket reads go."""
    spec = specs["mha"]
    lora, bat = validated(spec, ("lora", 1), ("bat", 3))
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=reservation(spec, 2, lora))
    store.assign(0, lora)
    store.assign(1, bat, make_room=lambda: False, in_step=True)
    assert store.memory.used == reservation(spec, 2, lora), "nothing beyond the budget is taken from it"
    tables = bucket_bytes(store, 1)
    frozen = reservation(spec, 2, bat) - tables
    assert frozen > 0 and store.memory.beyond == tables + frozen, "the bucket and its frozen copies, all counted"
    assert store.memory.placed == store.memory.used + store.memory.beyond
    check_exact(store, {0: lora, 1: bat}, spec, seed=12)
    store.release(1)
    assert store.memory.beyond == 0 and store.memory.beyond_total == tables + frozen and len(store.buckets) == 1
    for layer, module in frozen_modules_of(bat, spec):  # given back with the bucket that read them
        with pytest.raises(RuntimeError, match="no frozen-weight copy"):
            store.frozen_weight(layer, module, lambda: None)


def test_frozen_copies_within_the_budget_go_with_the_last_bucket_that_reads_them(specs):
    spec = specs["mha"]
    bat, miss = validated(spec, ("bat", 3), ("miss", 2))
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=reservation(spec, 2, bat))
    store.assign(0, bat)
    store.release(0)  # bat's bucket idles, its frozen copies with it
    assert store.memory.used == reservation(spec, 2, bat)
    store.assign(0, miss)  # the idle bucket makes room, and the copies only it read go too
    assert store.memory.used == reservation(spec, 2, miss) and store.memory.beyond == 0
    check_exact(store, {0: miss}, spec, seed=13)


def test_settle_moves_a_placement_beyond_the_budget_back_within_it_once_it_fits(specs):
    spec = specs["mha"]
    lora, miss = validated(spec, ("lora", 1), ("miss", 2))
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=max(reservation(spec, 2, lora),
                                                                    reservation(spec, 2, miss)))
    store.assign(0, lora)
    store.assign(1, miss, make_room=lambda: False, in_step=True)
    store.settle(make_room=lambda: False, evict=lambda slot: False)  # both needed, no room: nothing moves
    assert store.memory.beyond == bucket_bytes(store, 1)
    check_exact(store, {0: lora, 1: miss}, spec, seed=14)

    def make_room():  # the engine evicts the least recently used adapter the coming step does not need
        if int(store.bucket_of_slot[0]) < 0:
            return False
        store.release(0)
        return True

    store.settle(make_room=make_room, evict=lambda slot: False)
    assert store.memory.beyond == 0 and store.memory.used == reservation(spec, 2, miss), "moved within the budget"
    check_exact(store, {1: miss}, spec, seed=15)


def test_settle_gives_back_a_bucket_beyond_the_budget_that_the_coming_step_does_not_need(specs):
    spec = specs["mha"]
    lora, bat = validated(spec, ("lora", 1), ("bat", 3))
    store = SlotStore(spec, 2, torch.float32, CPU, memory_bytes=reservation(spec, 2, lora))
    store.assign(0, lora)
    store.assign(1, bat, make_room=lambda: False, in_step=True)
    evicted = []

    def evict(slot):  # the engine deactivates the slot's adapter unless the coming step needs it
        evicted.append(slot)
        store.release(slot)
        return True

    store.settle(make_room=lambda: False, evict=evict)
    assert evicted == [1] and store.memory.beyond == 0 and len(store.buckets) == 1
    check_exact(store, {0: lora}, spec, seed=16)
