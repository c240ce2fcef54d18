"""The native path inside a compiled model: each wrapped layer's adapter work as one opaque custom op.

The set of adapters, their buckets and the step's token grouping change between steps, while vLLM traces the
model once (CPU: `CompilationMode.DYNAMO_TRACE_ONCE`). So what depends on them never enters the graph: a wrapped
layer's forward calls `tenfold::adapted_linear` (base GEMM plus every bucket's update for the current step) and, for
row-parallel layers, `tenfold::reduced_updates` (updates that read the all-reduced output). Dynamo holds each as one
node with a fake implementation that only states the output shape; at run time the node runs the eager native path
on the step's plan (built on the host once per step and shared by every layer). Eager execution calls the same
functions directly, without the dispatcher.

Layers are addressed by their module name (a constant of the traced graph, so a graph that vLLM loads from its
compile cache in another process finds the same layers): one registry per process, the latest engine's layers.
"""

from __future__ import annotations

import weakref

import torch

_layers: dict[str, weakref.ReferenceType] = {}
_output_features: dict[str, int] = {}


def register(layer, name: str, output_features: int) -> None:
    """`layer` (a tenfold wrapper) serves module `name`; its adapted output has `output_features` columns."""
    _layers[name] = weakref.ref(layer)
    _output_features[name] = output_features


def _layer(name: str):
    layer = _layers[name]()
    if layer is None:
        raise RuntimeError(f"tenfold: the wrapped layer {name} no longer exists")
    return layer


@torch.library.custom_op("tenfold::adapted_linear", mutates_args=())
def adapted_linear(x: torch.Tensor, bias: torch.Tensor | None, layer: str) -> torch.Tensor:
    """The wrapped layer's output for x [T, in]: base GEMM and the step's adapter updates."""
    return _layer(layer).adapted_apply(x, bias)


@adapted_linear.register_fake
def _(x, bias, layer):
    return x.new_empty((x.shape[0], _output_features[layer]))


@torch.library.custom_op("tenfold::reduced_updates", mutates_args=("output",))
def reduced_updates(output: torch.Tensor, bias: torch.Tensor | None, layer: str) -> None:
    """Adds, in place, the step's updates that read a row-parallel layer's all-reduced output [T, out]."""
    _layer(layer).add_reduced_updates(output, bias)


@reduced_updates.register_fake
def _(output, bias, layer):
    return None
