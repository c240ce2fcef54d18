"""Tensor-parallel sharding of the native path without vLLM: two ranks' slot stores, each applied to its own shard of
a layer as vLLM's column- and row-parallel layers hold it (row-parallel parts summed as the all-reduce would, then
the updates that read the whole output), give the unsharded result for every family; factors that cannot be
sharded are refused with a message naming the module and the widths."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.adapters import AdapterMismatchError, FAMILIES
from tenfold.engine.batch_plan import plan_batch
from tenfold.engine.buckets import adapted_forward, add_output_updates
from tenfold.engine.sharding import COLUMN_PARALLEL, Shard
from tenfold.engine.slots import SlotStore

FUSED = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"], "gate_up": ["gate_proj", "up_proj"],
         "down": ["down_proj"]}
TP = 2


def layer_forward(store, slot_of_token, layer, modules, x, weights):
    """One rank's wrapped layer: weights {module: its rows [out_m, in] as this rank holds them}; returns the rank's
    output before any all-reduce, and a function adding the whole-output updates to a (reduced) output."""
    slices, start = {}, 0
    for m in modules:
        slices[m] = slice(start, start + weights[m].shape[0])
        start += weights[m].shape[0]
    fused = torch.cat([weights[m] for m in modules])
    plan = [(store.buckets[b], g) for b, g in plan_batch(slot_of_token, store.bucket_of_slot, store.row_of_slot)]
    plan = [(b, g) for b, g in plan if any(b.adapts(layer, m) for m in modules)]
    weight_of = lambda m: fused[slices[m]]  # noqa: E731
    output = adapted_forward(plan, layer, slices, x, lambda inputs: inputs @ fused.t(), torch.float32, weight_of)
    return output, lambda out: add_output_updates(plan, layer, slices, out, None, torch.float32, weight_of)


def stores(spec, adapters, num_slots):
    result = []
    for rank in range(TP):
        store = SlotStore(spec, num_slots, torch.float32, torch.device("cpu"), Shard(spec, rank, TP))
        for slot, adapter in adapters.items():
            store.assign(slot, adapter)
        result.append(store)
    return result


def test_every_family_sharded_over_two_ranks_equals_the_unsharded_layer(model_name, specs):
    spec = specs[model_name]
    g = torch.Generator().manual_seed(21)
    cases = sorted(CASES)
    adapters = {}
    for i, case in enumerate(cases):
        adapters[2 * i] = make(case, spec, seed=800 + i)  # odd slots stay empty
        adapters[2 * i].validate(spec)
    num_slots = 2 * len(cases)
    whole = SlotStore(spec, num_slots, torch.float32, torch.device("cpu"))
    for slot, adapter in adapters.items():
        whole.assign(slot, adapter)
    ranks = stores(spec, adapters, num_slots)
    slot_of_token = torch.randint(-1, num_slots, (41,), generator=g)
    with torch.no_grad():
        for layer in (0, spec.num_layers - 1):
            for modules in FUSED.values():
                fan_in = spec.module_shape(modules[0])[0]
                full = {m: torch.randn(spec.module_shape(m)[1], fan_in, generator=g) * 0.05 for m in modules}
                x = torch.randn(slot_of_token.numel(), fan_in, generator=g)
                want, finish = layer_forward(whole, slot_of_token, layer, modules, x, full)
                finish(want)
                if modules[0] in COLUMN_PARALLEL:  # each rank: its output columns of every module, from all of x
                    parts = []
                    for store in ranks:
                        shard = store.shard
                        out, finish = layer_forward(store, slot_of_token, layer, modules, x,
                                                    {m: full[m][shard.out_range(m)] for m in modules})
                        finish(out)
                        parts.append(out.split([shard.out_range(m).stop - shard.out_range(m).start
                                                for m in modules], -1))
                    got = torch.cat([torch.cat([p[i] for p in parts], -1) for i in range(len(modules))], -1)
                else:  # each rank: its input columns; partial outputs summed (the all-reduce), then the rest
                    (m,) = modules
                    got, finish = None, None
                    for store in ranks:
                        columns = store.shard.in_range(m)
                        out, rank_finish = layer_forward(store, slot_of_token, layer, modules, x[:, columns],
                                                         {m: full[m][:, columns]})
                        got = out if got is None else got + out
                        finish = finish or rank_finish
                    finish(got)
                assert torch.allclose(got, want, atol=3e-5, rtol=1e-4), (layer, modules, (got - want).abs().max())


def test_block_factors_that_straddle_a_shard_are_refused_by_module_and_width(specs):
    spec = specs["mha"]  # o_proj reads 256 columns: 128 per rank
    miss = FAMILIES["miss"].create(spec, target_modules=["o_proj"], r=48, seed=1)  # 48 does not divide 128
    miss.validate(spec)
    SlotStore(spec, 2, torch.float32, torch.device("cpu")).assign(0, miss)  # unsharded: fine (zero padding)
    with pytest.raises(AdapterMismatchError, match=r"r=48 straddle .* o_proj's input \(columns 0-128 of rank 0/2\)"):
        SlotStore(spec, 2, torch.float32, torch.device("cpu"), Shard(spec, 0, TP)).assign(0, miss)


def test_head_counts_that_do_not_divide_are_refused(specs):
    with pytest.raises(ValueError, match="num_kv_heads=2 .* tensor_parallel_size=4"):
        Shard(specs["gqa"], 0, 4)
