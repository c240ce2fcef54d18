"""One entry point per family apply: the Triton kernel for CUDA tensors, its torch reference op elsewhere.

    from tenfold.kernels import dispatch
    seg = dispatch.segments_of(row_of_token, bucket.capacity)     # once per bucket and step
    dispatch.lowrank_apply(x, a_table, b_table, seg, output)     # output [T, out] updated in place

Every op takes the token rows x [T, in], the bucket's tables indexed by row ([R, ...], as the families store them:
whole tables, or per-layer slices such as HW[:, layer]), the step's `Segments`, and updates `output [T, out]` in
place for the tokens whose row is >= 0 (any column slice of a wider output works); other rows keep their bits.
Shrinks return u [P, T, r] fp32 partial sums (the shrink is u.sum(0)) for the matching expand, so one shrink can
serve several expands (LoRTA's q, k and v; MiSS's sub-modules reading one input). Ops:

    lowrank_shrink(x, a, seg) -> u           lowrank_expand(u, b, seg, output)       lowrank_apply(x, a, b, seg, output)
    lorta_heads_out_shrink(x, a, seg) -> u   lorta_heads_out_expand(u, head_weights, b, seg, output)
    lorta_heads_out_apply(x, a, head_weights, b, seg, output)
    lorta_heads_in_shrink(x, b_t, c_h, seg) -> u   lorta_heads_in_expand(u, c_lm, a_t, seg, output)
    lorta_heads_in_apply(x, b_t, c_h, c_lm, a_t, seg, output)
    miss_shrink(x, rank, seg) -> u           miss_expand(u, d, seg, output)          miss_apply(x, d, seg, output)
    bottleneck_apply(z, w_down, b_down, w_up, b_up, scaling, seg, output, act=name)
    bat_apply(x, d, w0, seg, output)

Each also takes `config=LaunchConfig(...)` (block sizes, splits; the reference ops ignore it). Neither the kernels
nor the reference ops sync with the host or branch on data, so they run inside torch.compile and CUDA-graph capture.
The wrappers below choose by the device of their first argument on every call; code that is compiled should resolve
its ops once at setup with `pick(name, device)` and call the result, so no dispatch logic is traced. `forced("triton")` runs the
kernels on CPU tensors too, which works when the kernels were imported under TRITON_INTERPRET=1: tests use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable, Iterator

import torch

from . import reference
from .launch import LaunchConfig
from .segments import Segments, rows_for_bucket, segments_of

__all__ = ["OPS", "LaunchConfig", "Segments", "forced", "pick", "rows_for_bucket", "segments_of", *reference.__all__]

OPS = tuple(reference.__all__)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenfold_kernel_backend", default=None)


@contextlib.contextmanager
def forced(backend: str | None) -> Iterator[None]:
    """Within the block, every op runs on `backend` ("triton" or "torch") whatever the device; None: by device."""
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}: 'triton', 'torch' or None")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_for(device: torch.device) -> str:
    return _forced.get() or ("triton" if device.type == "cuda" else "torch")


def pick(name: str, device: torch.device) -> Callable:
    """The implementation of op `name` for tensors on `device`."""
    if name not in OPS:
        raise KeyError(f"no kernel op {name!r}; the ops are {list(OPS)}")
    if backend_for(device) == "torch":
        return getattr(reference, name)
    if name == "bottleneck_apply":
        return _bottleneck_kernel_or_reference
    return getattr(_triton_ops(), name)


def _triton_ops():
    # import_module is a sys.modules lookup once imported (a test may swap in a copy built in interpreter mode)
    try:
        return importlib.import_module("tenfold.kernels.triton")
    except ImportError as error:  # a CUDA build of torch normally brings triton
        raise RuntimeError(f"tenfold's CUDA kernels need triton, which does not import here: {error}") from error


def _dispatching(name: str) -> Callable:
    reference_op = getattr(reference, name)

    @functools.wraps(reference_op)
    def op(*args, **kwargs):
        return pick(name, args[0].device)(*args, **kwargs)

    return op


def _bottleneck_kernel_or_reference(z, w_down, b_down, w_up, b_up, scaling, seg, output, *, act, config=None):
    # the kernel computes a fixed set of activations; any other transformers activation runs on the reference op
    kernels = _triton_ops()
    apply = kernels.bottleneck_apply if kernels.supports_activation(act) else reference.bottleneck_apply
    return apply(z, w_down, b_down, w_up, b_up, scaling, seg, output, act=act, config=config)


lowrank_shrink = _dispatching("lowrank_shrink")
lowrank_expand = _dispatching("lowrank_expand")
lowrank_apply = _dispatching("lowrank_apply")
lorta_heads_out_shrink = _dispatching("lorta_heads_out_shrink")
lorta_heads_out_expand = _dispatching("lorta_heads_out_expand")
lorta_heads_out_apply = _dispatching("lorta_heads_out_apply")
lorta_heads_in_shrink = _dispatching("lorta_heads_in_shrink")
lorta_heads_in_expand = _dispatching("lorta_heads_in_expand")
lorta_heads_in_apply = _dispatching("lorta_heads_in_apply")
miss_shrink = _dispatching("miss_shrink")
miss_expand = _dispatching("miss_expand")
miss_apply = _dispatching("miss_apply")
bat_apply = _dispatching("bat_apply")
bottleneck_apply = _dispatching("bottleneck_apply")
