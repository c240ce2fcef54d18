"""The native path's custom ops under torch.compile, with torch only (no vLLM): a stack of wrapped layers compiled
with `fullgraph=True` once, then run on batches whose token -> adapter mapping, slot contents and token count change
between calls. Every call must equal the adapters' own reference applies (`Adapter.apply`, as test_native_ops), and
the graph must not be traced again: the step's adapters live outside it (`tenfold/engine/compiled_ops.py`).

CUDA graphs are not covered: the native path still builds each step's plan on the host (README, "Compiled
execution"), which graph capture cannot replay.
"""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.engine import compiled_ops  # noqa: F401  (registers the tenfold:: ops)
from tenfold.engine.buckets import LayerCall, adapt_layer_input, add_layer_updates, add_output_updates
from tenfold.engine.native_state import NativeState
from tenfold.engine.slots import SlotStore
from test_native_ops import FUSED, frozen_layer, reference_forward

SLOTS = 6
LAYERS = 3


class PunicaStandIn:
    """What NativeState reads from vLLM's punica wrapper: the per-token slot index of the step (-1: base)."""

    def __init__(self, max_tokens: int):
        self.token_lora_indices = torch.full((max_tokens,), -1, dtype=torch.long)


class StackLayer:
    """A fused q/k/v layer as tenfold's vLLM wrapper runs it (`NativeAdapterMixin.apply`: the input op, the base
    GEMM in the graph, the update op), with torch only."""

    def __init__(self, name, index, state, linears, slices, weight):
        self.name, self.index, self.state = name, index, state
        self.linears, self.slices, self.weight = linears, slices, weight
        self.pending = None
        compiled_ops.register(self, name)

    def forward(self, x):
        inputs = torch.ops.tenfold.adapted_input(x, self.name)
        output = inputs @ self.weight.t()
        torch.ops.tenfold.add_updates(output, x, self.name)
        return output

    def _plan_and_call(self, x):
        plan = self.state.layer_plan(x.shape[0], self.index, tuple(self.slices))
        return plan, LayerCall(self.index, self.slices, x, None, torch.float32, lambda m: self.weight[self.slices[m]])

    def adapted_input(self, x):
        self.pending = plan, call = self._plan_and_call(x)
        return adapt_layer_input(plan, call)

    def add_updates(self, output, x):
        (plan, call), self.pending = self.pending, None
        call.output = output
        add_layer_updates(plan, call)
        add_output_updates(plan, self.index, self.slices, output, None, torch.float32, call.weight_of)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_a_compiled_stack_follows_every_change_of_adapters_and_batch(name, specs):
    spec = specs[name]
    g = torch.Generator().manual_seed(41)
    store = SlotStore(spec, SLOTS, torch.float32, torch.device("cpu"))
    punica = PunicaStandIn(64)
    state = NativeState(store, punica)
    layers, frozen = [], []
    for index in range(LAYERS):
        linears, slices, weight = frozen_layer(spec, FUSED["qkv"], g)
        frozen.append(linears)
        layers.append(StackLayer(f"test.{name}.layers.{index}.qkv_proj", index, state, linears, slices, weight))
    back = torch.randn(layers[0].weight.shape[0], spec.hidden_size, generator=g) * 0.05  # q|k|v -> hidden

    def stack(x):
        for layer in layers:
            y = layer.forward(x)
            x = x + torch.tanh(y @ back)
        return x

    def reference(x, adapters_by_slot, slot_of_token):
        for index in range(LAYERS):
            y = reference_forward(adapters_by_slot, slot_of_token, index, FUSED["qkv"], x, frozen[index])
            x = x + torch.tanh(y @ back)
        return x

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(stack, fullgraph=True, dynamic=True)
    cases = sorted(CASES)
    held: dict[int, object] = {}
    for step in range(6):
        # new adapters in some slots (families change), a new token mapping and token count every step
        for slot in torch.randperm(SLOTS, generator=g)[: 2 + step % 3].tolist():
            adapter = make(cases[int(torch.randint(len(cases), (1,), generator=g))], spec, seed=50 * step + slot)
            adapter.validate(spec)
            store.assign(slot, adapter)
            held[slot] = adapter
        tokens = 5 + 7 * step % 23
        slot_of_token = torch.randint(-1, SLOTS, (tokens,), generator=g)
        punica.token_lora_indices[:tokens] = slot_of_token
        state.mapping_changed(tokens)
        # the forward must use the hook's host copy, never read vLLM's (device) index tensor itself
        punica.token_lora_indices.fill_(SLOTS + 100)
        x = torch.randn(tokens, spec.hidden_size, generator=g)
        with torch.inference_mode():
            got = compiled(x)
        want = reference(x, held, slot_of_token)
        assert torch.allclose(got, want, atol=5e-5, rtol=1e-4), f"step {step}: {(got - want).abs().max():.2e}"
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"the stack was traced {frames} times: a step's adapters leaked into the graph's guards"
