"""One tenant's rows cannot reach another's (issue 31): NaN and +Inf planted in every table row of one adapter's slot
(written straight into its bucket's tables, past the validation that refuses such adapters) leave every other token's
layer outputs bit for bit as they are with that slot holding clean values; on the torch ops and on tenfold's CPU
kernels, for every family, in a batch where the poisoned adapter's bucket holds most of the step's tokens (so the
in-place paths that run over every row of the output run). A released slot's row is cleared, and its next tenant sees
nothing of the previous one. The Triton kernels' side: tests/triton_kernel_cases.py (under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.engine.slots import SlotStore
from tenfold.kernels import lora_cpu_ops
from test_native_ops import FUSED, frozen_layer, native_forward

CPU = torch.device("cpu")
# the store's table dtype for families with tenfold's CPU kernels (None: every family on the torch ops, in fp32)
BACKENDS = {"torch": None, "cpu_kernels": torch.float32, "cpu_kernels_bf16": torch.bfloat16}
POISONED, POPULAR, EMPTY = 0, 1, 2  # slots: the poisoned adapter (row 0 of its bucket), its bucket's popular twin


def plant_poison(store, slot: int) -> None:
    """NaN and +Inf, alternating, in every entry of the slot's row of every table of its bucket."""
    bucket = store.buckets[int(store.bucket_of_slot[slot])]
    row = int(store.row_of_slot[slot])
    with torch.inference_mode():  # the tables are inference tensors (made in the engine's steps)
        for table in bucket.tables.values():
            entries = table[row].view(-1)
            entries[0::2] = float("nan")
            entries[1::2] = float("inf")


def mixed_store(spec, kernel_dtype, poisoned_case):
    """The poisoned case's adapter in slot 0 (assigned first: row 0 of its bucket), a twin of the same bucket in
    slot 1, slot 2 empty, then one adapter of every other case."""
    store = SlotStore(spec, len(CASES) + 3, torch.float32, CPU, kernel_dtype=kernel_dtype)
    others = [case for case in sorted(CASES) if case != poisoned_case]
    adapters = {POISONED: make(poisoned_case, spec, seed=1), POPULAR: make(poisoned_case, spec, seed=2)}
    adapters.update({EMPTY + 1 + i: make(case, spec, seed=10 + i) for i, case in enumerate(others)})
    for slot, adapter in adapters.items():
        adapter.validate(spec)
        store.assign(slot, adapter)
    expected_kernels = kernel_dtype is not None
    assert all(b.cpu_kernels == expected_kernels for b in store.buckets.values())
    return store, sorted(adapters)


def skewed_batch(slots, generator, tokens=48):
    """Most tokens on the popular twin (its bucket's group is then dense: the in-place paths run), a few on the
    poisoned adapter, at least one on every other adapter, base rows and the empty slot, interleaved."""
    others = [s for s in slots if s not in (POISONED, POPULAR)] + [EMPTY, -1, -1, -1]
    slot_of_token = torch.tensor([POPULAR] * (tokens - len(others) - 3) + [POISONED] * 3 + others)
    return slot_of_token[torch.randperm(tokens, generator=generator)]


def layer_outputs(store, slot_of_token, layers, dtype):
    return {key: native_forward(store, slot_of_token, key[0], FUSED[key[1]], x.to(dtype), linears, slices,
                                fused_weight.to(dtype), frozen_copies=True)
            for key, (x, linears, slices, fused_weight) in layers.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned_case", sorted(CASES))
def test_nan_and_inf_in_one_adapters_rows_reach_no_other_token(specs, backend, poisoned_case):
    spec = specs["gqa"]
    kernel_dtype = BACKENDS[backend]
    dtype = kernel_dtype or torch.float32  # the model's dtype: the layer inputs, outputs and frozen weights
    g = torch.Generator().manual_seed(sorted(CASES).index(poisoned_case))
    store, slots = mixed_store(spec, kernel_dtype, poisoned_case)
    slot_of_token = skewed_batch(slots, g)
    layers = {}
    for layer in (0, spec.num_layers - 1):
        for group, modules in FUSED.items():
            linears, slices, fused_weight = frozen_layer(spec, modules, g)
            x = torch.randn(slot_of_token.numel(), spec.module_shape(modules[0])[0], generator=g)
            layers[layer, group] = x, linears, slices, fused_weight
    with torch.inference_mode():  # as the engine runs its forward
        clean = layer_outputs(store, slot_of_token, layers, dtype)
        plant_poison(store, POISONED)
        poisoned = layer_outputs(store, slot_of_token, layers, dtype)
    others = slot_of_token != POISONED
    reached = 0
    for key in layers:
        assert torch.equal(poisoned[key][others], clean[key][others]), (
            f"{backend}: layer {key[0]} {key[1]}: the poisoned adapter changed other tokens' rows "
            f"{sorted(set(torch.nonzero((poisoned[key] != clean[key]).any(1) & others).flatten().tolist()))}")
        reached += int((~poisoned[key][~others].isfinite()).any())
    assert reached, "the poison should reach the poisoned adapter's own tokens (else the test checks nothing)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_released_row_is_cleared_and_its_next_tenant_sees_nothing_of_the_last(specs, backend):
    spec = specs["gqa"]
    kernel_dtype = BACKENDS[backend]
    dtype = kernel_dtype or torch.float32
    store = SlotStore(spec, 4, torch.float32, CPU, kernel_dtype=kernel_dtype)
    first, second, neighbour = (make("lorta_heads_out", spec, seed=s) for s in (1, 2, 3))
    for adapter in (first, second, neighbour):
        adapter.validate(spec)
    store.assign(0, first)
    store.assign(1, neighbour)
    bucket = store.buckets[int(store.bucket_of_slot[0])]
    row = int(store.row_of_slot[0])
    plant_poison(store, 0)
    store.release(0)
    for name, table in bucket.tables.items():
        assert not table[row].any(), f"{name}: the released row still holds the last tenant's values"
    # a batch mostly on the neighbour (LoRTA's in-place expand over every row) with the released row unused
    g = torch.Generator().manual_seed(4)
    slot_of_token = torch.tensor([1, -1, 1, 1, 0, 1, -1, 1])  # slot 0 is empty now: its tokens run the base model
    linears, slices, fused_weight = frozen_layer(spec, FUSED["qkv"], g)
    x = torch.randn(slot_of_token.numel(), spec.hidden_size, generator=g).to(dtype)
    with torch.inference_mode():
        got = native_forward(store, slot_of_token, 1, FUSED["qkv"], x, linears, slices, fused_weight.to(dtype))
        assert torch.equal(got[slot_of_token != 1], (x @ fused_weight.to(dtype).t())[slot_of_token != 1])
        store.assign(2, second)  # the next tenant takes the cleared row
        assert int(store.row_of_slot[2]) == row
        for name, table in bucket.tables.items():
            assert torch.equal(table[row], bucket.row_values(second)[name]), name


def test_convert_modes_cpu_ops_read_no_slot_for_base_rows():
    """vLLM's CPU LoRA ops as tenfold serves them (convert mode): rows without an adapter (index -1) beside a slot
    full of NaN and Inf get exact zeros."""
    g = torch.Generator().manual_seed(5)
    slots, rank, fan_in, width = 3, 4, 16, 12
    lora_a, lora_b = torch.randn(slots, 1, rank, fan_in, generator=g), torch.randn(slots, 1, width, rank, generator=g)
    for weights in (lora_a, lora_b):
        weights[0].view(-1)[0::2], weights[0].view(-1)[1::2] = float("nan"), float("inf")
    indices = torch.tensor([0, -1, 2, -1, 1, -1])
    x = torch.randn(indices.numel(), fan_in, generator=g)
    shrunk = torch.empty(indices.numel(), rank)
    lora_cpu_ops.bgmv_shrink(x, lora_a, shrunk, indices)
    out = torch.randn(indices.numel(), 2 * width, generator=g)
    before = out.clone()
    lora_cpu_ops.bgmv_expand(shrunk, lora_b, out, indices)
    lora_cpu_ops.bgmv_expand_slice(shrunk, lora_b, out, indices, width, width)
    base = indices < 0
    assert torch.equal(shrunk[base], torch.zeros(int(base.sum()), rank))
    assert torch.equal(out[base], before[base]), "base rows must keep their bits"
    for t in (2, 4):
        want = lora_b[indices[t], 0] @ (lora_a[indices[t], 0] @ x[t])
        torch.testing.assert_close(out[t], before[t] + torch.cat([want, want]))
    assert not out[0].isfinite().any()
