"""The native path inside a compiled model: each wrapped layer's adapter work as opaque custom ops around vLLM's
own base GEMM.

The set of adapters, their buckets and the step's token grouping change between steps, while vLLM traces the
model once (CPU: `CompilationMode.DYNAMO_TRACE_ONCE`). So what depends on them never enters the graph: a wrapped
layer's forward keeps the base GEMM in the graph (as vLLM compiles it without adapters) and calls
`tenfold::add_updates` on its output (every bucket's update for the current step, in place); layers whose GEMM input
some family may change (loretta_adp's pre-adapters on gate/up) first call `tenfold::adapted_input`; row-parallel
layers whose output is reduced add `tenfold::reduced_updates` (updates that read the all-reduced output). Dynamo
holds each as one node with a fake implementation that only states the output; at run time the node runs the eager
native path on the step's plan (built on the host once per step and shared by every layer). Eager execution calls
the same functions directly, without the dispatcher.

Layers are addressed by their module name (a constant of the traced graph, so a graph that vLLM loads from its
compile cache in another process finds the same layers): one registry per process, the latest engine's layers.
"""

from __future__ import annotations

import weakref

import torch

_layers: dict[str, weakref.ReferenceType] = {}


def register(layer, name: str) -> None:
    """`layer` (a tenfold wrapper) serves module `name`."""
    _layers[name] = weakref.ref(layer)


def _layer(name: str):
    layer = _layers[name]()
    if layer is None:
        raise RuntimeError(f"tenfold: the wrapped layer {name} no longer exists")
    return layer


# Registered straight on a Library rather than with torch.library.custom_op, whose Python wrappers cost ~10 us per
# call against ~2 us here (measured on CPU), paid by every wrapped layer in every step; vLLM registers its own ops
# the same way (`direct_register_custom_op`). CompositeExplicitAutograd: one implementation for every device.
_library = torch.library.Library("tenfold", "FRAGMENT")


def _define(function, fake, mutates_args: tuple[str, ...] = ()):
    name = function.__name__
    _library.define(name + torch.library.infer_schema(function, mutates_args=mutates_args))
    _library.impl(name, function, dispatch_key="CompositeExplicitAutograd")
    torch.library.register_fake(f"tenfold::{name}", fake, lib=_library)
    return function


def adapted_input(x: torch.Tensor, layer: str) -> torch.Tensor:
    """The base GEMM's input for the wrapped layer's x [T, in] under the step's adapters (a new tensor)."""
    inputs = _layer(layer).adapted_input(x)
    return x.clone() if inputs is x else inputs  # an op's output may not alias its input


def add_updates(output: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    """Adds, in place, the step's adapter updates of the wrapped layer's input x [T, in] to its base output."""
    _layer(layer).add_updates(output, x)


def reduced_updates(output: torch.Tensor, bias: torch.Tensor | None, layer: str) -> None:
    """Adds, in place, the step's updates that read a row-parallel layer's all-reduced output [T, out]."""
    _layer(layer).add_reduced_updates(output, bias)


_define(adapted_input, lambda x, layer: torch.empty_like(x))
_define(add_updates, lambda output, x, layer: None, mutates_args=("output",))
_define(reduced_updates, lambda output, bias, layer: None, mutates_args=("output",))
