"""The native path's slot store, batch plan and per-family applies, without vLLM: a fused layer (q/k/v, gate/up,
o, down) applied to a batch mixing base rows and many adapters of every family equals each adapter's own reference
apply (`Adapter.apply`, the math the HuggingFace tests check) row by row."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.engine.batch_plan import plan_batch
from tenfold.engine.buckets import adapted_forward, add_output_updates
from tenfold.engine.slots import SlotStore

FUSED = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"], "gate_up": ["gate_proj", "up_proj"],
         "down": ["down_proj"]}


def frozen_layer(spec, modules, generator):
    """Random frozen weights of one fused layer: {module: nn.Linear}, the fused weight and each module's columns."""
    linears, slices, start = {}, {}, 0
    for m in modules:
        fan_in, fan_out = spec.module_shape(m)
        linear = torch.nn.Linear(fan_in, fan_out, bias=False)
        linear.weight.data = torch.randn(fan_out, fan_in, generator=generator) * 0.05
        linears[m], slices[m] = linear, slice(start, start + fan_out)
        start += fan_out
    return linears, slices, torch.cat([linears[m].weight for m in modules])


def native_forward(store, slot_of_token, layer, modules, x, linears, slices, fused_weight, frozen_copies=False):
    """What a tenfold wrapper does in one step: the plan's buckets that adapt the layer, around the base GEMM.
    frozen_copies: the buckets read the frozen weights from the store's copies, as in the engine (the weights of a
    (layer, module) must then stay the same across calls: a copy is filled once)."""
    plan = [(store.buckets[b], g) for b, g in plan_batch(slot_of_token, store.bucket_of_slot, store.row_of_slot)]
    plan = [(b, g) for b, g in plan if any(b.adapts(layer, m) for m in modules)]
    x_seen = x.clone()
    if frozen_copies:
        weight_of = lambda m: store.frozen_weight(layer, m, lambda: fused_weight[slices[m]])  # noqa: E731
    else:
        weight_of = lambda m: fused_weight[slices[m]]  # noqa: E731
    output = adapted_forward(plan, layer, slices, x, lambda inputs: inputs @ fused_weight.t(), store.dtype, weight_of)
    add_output_updates(plan, layer, slices, output, None, store.dtype, weight_of)
    assert torch.equal(x, x_seen), "the layer input must not be modified in place"
    return output


def reference_forward(adapters_by_slot, slot_of_token, layer, modules, x, linears):
    rows = []
    for t, slot in enumerate(slot_of_token.tolist()):
        adapter = adapters_by_slot.get(slot)
        parts = []
        for m in modules:
            if adapter is None or (layer, m) not in adapter.targets:
                parts.append(linears[m](x[t:t + 1]))
            else:
                parts.append(adapter.forward((layer, m), x[t:t + 1], linears[m]))
        rows.append(torch.cat(parts, -1))
    return torch.cat(rows)


@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "one-popular-adapter"])
def test_mixed_batch_of_every_family_equals_each_adapters_reference(model_name, specs, skewed):
    spec = specs[model_name]
    g = torch.Generator().manual_seed(11 + skewed)
    cases = sorted(CASES)
    num_slots = 2 * len(cases) + 3  # some slots stay empty
    store = SlotStore(spec, num_slots, torch.float32, torch.device("cpu"))
    adapters_by_slot = {}
    for i, case in enumerate(cases * 2):  # two adapters of every case, in scattered slots
        slot = (7 * i) % num_slots
        adapter = make(case, spec, seed=300 + i)
        adapter.validate(spec)
        store.assign(slot, adapter)
        adapters_by_slot[slot] = adapter
    tokens = 97
    slot_of_token = torch.randint(-1, num_slots, (tokens,), generator=g)
    if skewed:
        slot_of_token[: tokens // 2] = 0
    with torch.no_grad():
        for layer in range(spec.num_layers):
            for modules in FUSED.values():
                linears, slices, fused_weight = frozen_layer(spec, modules, g)
                x = torch.randn(tokens, spec.module_shape(modules[0])[0], generator=g)
                got = native_forward(store, slot_of_token, layer, modules, x, linears, slices, fused_weight)
                want = reference_forward(adapters_by_slot, slot_of_token, layer, modules, x, linears)
                assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (layer, modules, (got - want).abs().max())
                base_rows = (slot_of_token < 0) | (store.bucket_of_slot[slot_of_token.clamp(min=0)] < 0)
                # the same GEMM over the whole batch: one over fewer rows may block differently (oneDNN on AMX does)
                base_output = x @ fused_weight.t()
                assert torch.equal(got[base_rows], base_output[base_rows]), "base rows must be untouched"


@pytest.mark.parametrize("case", ["lorta_heads_out", "lorta_heads_in"])
def test_a_bucket_holding_most_tokens_beside_base_rows_equals_the_reference(model_name, specs, case):
    """Most tokens on a few adapters of one bucket (LoRTA's heads_out expand then runs over all rows in place, the
    others with exact zeros), the rest base rows or another family."""
    spec = specs[model_name]
    g = torch.Generator().manual_seed(5)
    store = SlotStore(spec, 6, torch.float32, torch.device("cpu"))
    adapters_by_slot = {}
    for slot, name in ((0, case), (2, case), (3, case), (5, "miss")):
        adapters_by_slot[slot] = make(name, spec, seed=40 + slot)
        adapters_by_slot[slot].validate(spec)
        store.assign(slot, adapters_by_slot[slot])
    slot_of_token = torch.tensor([0, 2, -1, 3, 0, 0, 5, 2, -1, 3, 3, 0, 1, 2, 0])  # slot 1: empty
    with torch.no_grad():
        for layer in (0, spec.num_layers - 1):
            for modules in (FUSED["qkv"], FUSED["o"]):
                linears, slices, fused_weight = frozen_layer(spec, modules, g)
                x = torch.randn(slot_of_token.numel(), spec.module_shape(modules[0])[0], generator=g)
                got = native_forward(store, slot_of_token, layer, modules, x, linears, slices, fused_weight)
                want = reference_forward(adapters_by_slot, slot_of_token, layer, modules, x, linears)
                assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (layer, modules, (got - want).abs().max())
                base_rows = torch.tensor([s not in adapters_by_slot for s in slot_of_token.tolist()])
                base_output = x @ fused_weight.t()  # the same GEMM over the whole batch: its rows bit for bit
                assert torch.equal(got[base_rows], base_output[base_rows]), "base rows must be untouched"


def test_a_reused_slot_serves_its_new_adapter_and_an_idle_bucket_keeps_its_tables(specs):
    spec = specs["gqa"]
    store = SlotStore(spec, 4, torch.float32, torch.device("cpu"))
    bat, miss = make("bat", spec, seed=1), make("miss", spec, seed=2)
    for adapter in (bat, miss):
        adapter.validate(spec)
    store.assign(0, bat)
    assert store.table_bytes() > 0
    bat_tables = store.table_bytes()
    store.assign(0, miss)  # the slot that held bat now holds miss: bat's bucket is idle, its tables kept
    assert {store.buckets[int(b)].family for b in store.bucket_of_slot if b >= 0} == {"miss"}
    g = torch.Generator().manual_seed(3)
    linears, slices, fused_weight = frozen_layer(spec, FUSED["qkv"], g)
    x = torch.randn(5, spec.hidden_size, generator=g)
    slot_of_token = torch.tensor([0, -1, 0, 0, -1])
    got = native_forward(store, slot_of_token, 1, FUSED["qkv"], x, linears, slices, fused_weight)
    want = reference_forward({0: miss}, slot_of_token, 1, FUSED["qkv"], x, linears)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)
    store.release(0)
    assert store.table_bytes() > bat_tables and len(store.buckets) == 2, "idle buckets keep their tables"


def test_tables_are_reserved_once_for_every_slot_and_rows_are_reused_lowest_first(specs):
    spec = specs["mha"]
    store = SlotStore(spec, 1024, torch.float32, torch.device("cpu"))
    assert store.table_bytes() == 0 and store.memory.used == 0, "nothing is taken before an adapter arrives"
    adapters = [make("lorta_heads_out", spec, seed=i) for i in range(5)]
    for slot, adapter in zip((900, 3, 500, 77, 1), adapters):
        adapter.validate(spec)
        store.assign(slot, adapter)
    (bucket,) = store.buckets.values()
    assert bucket.capacity == 1024 and sorted(store.row_of_slot[[900, 3, 500, 77, 1]].tolist()) == [0, 1, 2, 3, 4]
    row_bytes = bucket.bytes_per_row()
    assert row_bytes == sum(t.numel() * 4 for t in bucket.row_tensors(adapters[0]).values())
    assert row_bytes < 64 * 1024, "a LoRTA slot holds the adapter's factors: kilobytes"
    assert store.table_bytes() == (1024 + 1) * row_bytes <= store.memory.used  # + the zero row (`Bucket.zero_row`)
    store.release(500)
    store.assign(42, adapters[2])
    assert int(store.row_of_slot[42]) == int(2), "the released row is reused first"


def test_an_adapter_loaded_outside_a_step_joins_a_bucket_made_inside_one(specs):
    """vLLM activates adapters inside a step (under inference mode, so new tables are inference tensors) and from
    an admin load outside one: the second write into the same bucket must work (found by the soak test)."""
    spec = specs["mha"]
    store = SlotStore(spec, 4, torch.float32, torch.device("cpu"))
    first, evicted, second = (make("lora", spec, seed=s) for s in (4, 5, 6))
    with torch.inference_mode():
        store.assign(0, first)
        store.assign(1, evicted)
    store.release(1)
    store.assign(1, second)  # the load endpoint's activation, into the row freed inside the step
    (bucket,) = store.buckets.values()
    for name, table in bucket.tables.items():
        assert torch.equal(table[int(store.row_of_slot[1])], bucket.row_tensors(second)[name].to(table.dtype))
