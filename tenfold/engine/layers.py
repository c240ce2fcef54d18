"""tenfold's layer wrappers for the native path: vLLM's own LoRA linear wrappers (their forward, bias and
tensor-parallel handling kept) with the dense per-slot buffers and punica ops replaced by the slot store.

They are prepended to `vllm.lora.utils._all_lora_classes` and claim a layer only in native mode. After vLLM built
them, the model-manager hook binds each one to the native state with its layer index and sub-modules (q/k/v of a
fused qkv_proj, gate/up of gate_up_proj).

Under tensor parallelism each wrapper holds its rank's shard (vLLM's own layers), the slot store holds the matching
shard of every adapter (`sharding.py`), and a row-parallel layer's update is added before vLLM's all-reduce, which
sums it with the other ranks' parts. Updates that read a layer's whole output (loretta_adp's post-adapter) run after
that all-reduce, on every rank alike.
"""

from __future__ import annotations

import re

import torch
from vllm.lora.layers import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                              MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA, ReplicatedLinearWithLoRA,
                              RowParallelLinearWithLoRA)

from . import compiled_ops
from .buckets import BUCKETS, LayerCall, adapt_layer_input, add_layer_updates, add_output_updates
from .mode import execution_mode

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class NativeAdapterMixin:
    """Replaces the LoRA buffers and ops of the vLLM wrapper it is mixed into."""

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None) -> bool:
        return execution_mode() == "native" and super().can_replace_layer(
            source_layer=source_layer, lora_config=lora_config, packed_modules_list=packed_modules_list,
            model_config=model_config)

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        # No per-slot buffers: adapters live in the slot store at their own size.
        self.lora_config = lora_config
        if "output_slices" not in self.__dict__:
            self.output_slices = (self.output_size,)
        self._native = None

    def reset_lora(self, index: int) -> None:
        pass  # the slot store owns slot contents

    def set_lora(self, index, lora_a, lora_b) -> None:
        raise RuntimeError("tenfold native wrappers take adapters from the slot store, not as LoRA tensors")

    def bind_native(self, state, module_name: str, sub_modules: list[str]) -> None:
        match = _LAYER.search(module_name)
        if match is None:
            raise ValueError(f"tenfold native mode: cannot tell the decoder layer of {module_name!r}")
        if len(sub_modules) != len(self.output_slices):
            raise ValueError(f"tenfold native mode: {module_name} packs {sub_modules} but has "
                             f"{len(self.output_slices)} output slices")
        shard = state.store.shard
        expected = tuple(shard.out_range(m).stop - shard.out_range(m).start for m in sub_modules)
        if (self.tp_size, self.tp_rank) != (shard.size, shard.rank) or tuple(self.output_slices) != expected:
            raise ValueError(f"tenfold native mode: {module_name} on tensor-parallel rank {self.tp_rank}/{self.tp_size} "
                             f"has output slices {tuple(self.output_slices)}, but tenfold shards {sub_modules} as "
                             f"{expected} (rank {shard.rank}/{shard.size}); serve this model with TENFOLD_MODE=convert")
        self._native, self.layer_index = state, int(match.group(1))
        # a row-parallel layer's output is whole after `apply` unless vLLM all-reduces it or returns its bias apart
        self._reduces_output = self._row_parallel and (self.tp_size > 1 or bool(self.base_layer.skip_bias_add))
        self._module_name = module_name
        compiled_ops.register(self, module_name)
        # whether some family may change this layer's GEMM input (loretta_adp's pre-adapters on gate/up): fixed, so
        # a compiled graph holds the input op only where it may be needed
        self._adapts_input = any(cls.may_adapt_input(m) for cls in set(BUCKETS.values()) for m in sub_modules)
        self._pending_call = None  # (plan, LayerCall) from `adapted_input`, taken by the next `add_updates`
        starts = [sum(self.output_slices[:i]) for i in range(len(self.output_slices))]
        self.sub_modules = {m: slice(s, s + n) for m, s, n in zip(sub_modules, starts, self.output_slices)}
        self._sub_module_names = tuple(sub_modules)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # vLLM's optional second CUDA stream for LoRA (VLLM_LORA_ENABLE_DUAL_STREAM) is not used: the native applies
        # run in the layer's own stream, and some of them change the base GEMM's input
        x2 = x.flatten(0, 1) if x.ndim == 3 else x
        compiling = torch.compiler.is_compiling()
        if compiling and self._native is None:  # the graph would silently leave every adapter out
            raise RuntimeError("tenfold: a native wrapper was traced before the native state was bound to it")
        inputs = x2
        if self._adapts_input and self._native is not None:
            inputs = torch.ops.tenfold.adapted_input(x2, self._module_name) if compiling else self.adapted_input(x2)
        # the base GEMM stays vLLM's (in a compiled model: in the graph); the step's adapters stay out of the graph,
        # in the update op (compiled_ops.py)
        output = self._get_quant_method().apply(self.base_layer, inputs, bias)
        if self._native is not None:
            if compiling:
                torch.ops.tenfold.add_updates(output, x2, self._module_name)
            else:
                self.add_updates(output, x2)
        return output.view(*x.shape[:-1], output.shape[-1])

    def _call(self, x: torch.Tensor, output: torch.Tensor | None) -> LayerCall:
        return LayerCall(self.layer_index, self.sub_modules, x, output, self._native.store.dtype, self._frozen_weight)

    def adapted_input(self, x: torch.Tensor) -> torch.Tensor:
        """The base GEMM's input for x [T, in] under the current step's plan (x itself where no bucket changes it);
        what the buckets computed on the way is kept for the `add_updates` of the same forward."""
        plan = self._native.layer_plan(x.shape[0], self.layer_index, self._sub_module_names)
        if not plan:
            self._pending_call = None
            return x
        call = self._call(x, None)
        self._pending_call = plan, call
        return adapt_layer_input(plan, call)

    def add_updates(self, output: torch.Tensor, x: torch.Tensor) -> None:
        """Adds, in place, the current step's adapter updates of x [T, in] to the base GEMM's output [T, out]
        (the eager path, and the body of the compiled update op)."""
        pending, self._pending_call = self._pending_call, None
        plan = self._native.layer_plan(x.shape[0], self.layer_index, self._sub_module_names)
        if not plan:
            return
        call = pending[1] if pending is not None and pending[0] is plan else self._call(x, None)
        call.output = output
        add_layer_updates(plan, call)
        if not self._reduces_output:  # this rank's output is complete: updates reading it can run now
            add_output_updates(plan, self.layer_index, self.sub_modules, output, None, self._native.store.dtype,
                               self._frozen_weight)

    _row_parallel = False
    _adapts_input = False
    _pending_call = None
    # whether updates that read the whole output wait until after `apply` (vLLM's all-reduce, or a bias returned
    # apart): fixed when the layer is bound, so a compiled graph holds the second op only where it is needed
    _reduces_output = False

    def add_reduced_updates(self, output: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Adds, in place, the step's updates that read this layer's whole output [T, out] (+ its separately
        returned bias): after vLLM's all-reduce for row-parallel layers."""
        if self._native is None:
            return
        plan = self._native.layer_plan(output.shape[0], self.layer_index, self._sub_module_names)
        if plan:
            add_output_updates(plan, self.layer_index, self.sub_modules, output, bias, self._native.store.dtype,
                               self._frozen_weight)

    def _frozen_weight(self, module: str) -> torch.Tensor:
        """The frozen weight rows [out_m, in] of one sub-module in the compute dtype, for bat's second pass and adp's
        pre-adapters: a copy in the adapter memory, reserved by the slot store when such an adapter arrives and
        filled on first use. vLLM's CPU backend repacks linear weights for oneDNN and drops the originals, so they are
        read back through the layer's own GEMM on an identity matrix (exact: one non-zero product per output)."""
        return self._native.store.frozen_weight(self.layer_index, module, lambda: self._read_frozen_weight(module))

    def _read_frozen_weight(self, module: str) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if weight is None or weight.dim() != 2 or weight.shape[0] != sum(self.output_slices):
            with torch.no_grad():
                eye = torch.eye(self.input_size, dtype=self.base_layer.params_dtype, device=self.device)
                weight = self._get_quant_method().apply(self.base_layer, eye, None).t()
        return weight[self.sub_modules[module]].detach()


class NativeColumnParallelLinear(NativeAdapterMixin, ColumnParallelLinearWithLoRA):
    pass


class NativeMergedColumnParallelLinear(NativeAdapterMixin, MergedColumnParallelLinearWithLoRA):
    pass


class NativeQKVParallelLinear(NativeAdapterMixin, QKVParallelLinearWithLoRA):
    pass


class NativeMergedQKVParallelLinear(NativeAdapterMixin, MergedQKVParallelLinearWithLoRA):
    pass


class NativeRowParallelLinear(NativeAdapterMixin, RowParallelLinearWithLoRA):
    _row_parallel = True

    def forward(self, input_):
        result = super().forward(input_)  # apply (the partial updates of this rank), then vLLM's all-reduce
        if not self._reduces_output:  # `apply` added every update already
            return result
        output, bias = result if isinstance(result, tuple) else (result, None)
        out2 = output.flatten(0, 1) if output.ndim == 3 else output
        if torch.compiler.is_compiling():  # bound: `apply` above checked
            torch.ops.tenfold.reduced_updates(out2, bias, self._module_name)
        else:
            self.add_reduced_updates(out2, bias)
        return result


class NativeReplicatedLinear(NativeAdapterMixin, ReplicatedLinearWithLoRA):
    pass


NATIVE_LAYER_CLASSES = (NativeColumnParallelLinear, NativeMergedColumnParallelLinear, NativeQKVParallelLinear,
                        NativeMergedQKVParallelLinear, NativeRowParallelLinear, NativeReplicatedLinear)
