"""Microbenchmarks of tenfold's CPU kernels on SmolLM2-135M shapes in bf16 (64 tokens of 32 adapters, 2 each):
LoRTA heads_out per layer call (q|k|v fused, 15 heads; o, 9 heads) and one decode step of LoRETTA adp's bottleneck
kernels over 30 layers with fresh random tables (428 MB, more than the caches: the rows come from memory).

    .venv/bin/python benchmarks/cpu_kernel_speed.py

Prints the best of several repeats; run it with nothing else on the machine.
"""

from __future__ import annotations

import time

import torch

from tenfold.kernels import cpu

TOKENS, ADAPTERS, LAYERS, HIDDEN, HEAD_DIM = 64, 32, 30, 576, 64


def best_of(repeats: int, calls: int, fn) -> float:
    """Seconds per call, the best of `repeats` timings of `calls` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(TOKENS) % ADAPTERS
    order = torch.argsort(rows, stable=True)
    tokens, rows = order.contiguous(), rows[order].contiguous()  # the bucket's tokens sorted by row
    x = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16()

    r = 16
    a_t = (torch.randn(ADAPTERS, r, HIDDEN, generator=g) * 0.05).bfloat16()
    b = (torch.randn(ADAPTERS, r, HEAD_DIM, generator=g) * 0.05).bfloat16()
    for heads in (15, 9):
        hw = torch.randn(ADAPTERS, LAYERS, heads, r, generator=g).bfloat16()
        out = torch.randn(TOKENS, heads * HEAD_DIM, generator=g).bfloat16()
        seconds = best_of(5, 500, lambda i=0: cpu.lorta_apply(x, tokens, rows, a_t, b, [hw[:, i % LAYERS]], [out]))
        print(f"lorta heads_out, {heads} heads: {seconds * 1e6:.1f} us per layer call")

    bottleneck = 64

    def tables():
        return ((torch.randn(ADAPTERS, bottleneck, HIDDEN, generator=g) * 0.05).bfloat16(),
                (torch.randn(ADAPTERS, bottleneck, generator=g) * 0.1).bfloat16(),
                (torch.randn(ADAPTERS, bottleneck + 1, HIDDEN, generator=g) * 0.05).bfloat16())

    layers = [[tables() for _ in range(3)] for _ in range(LAYERS)]  # gate, up, down
    out = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16()

    def step(_=0):
        for gate, up, down in layers:
            inputs, difference = x.clone(), torch.zeros_like(x)
            cpu.bottleneck_pre(x, tokens, rows, [gate[0], up[0]], [gate[1], up[1]], [gate[2], up[2]], "relu", inputs,
                               difference)
            cpu.bottleneck_apply(out, tokens, rows, [down[0]], [down[1]], [down[2]], "relu", [out])

    seconds = best_of(5, 1, step)
    table_bytes = sum(t.numel() * t.element_size() for layer in layers for module in layer for t in module)
    print(f"loretta_adp, one step of {LAYERS} layers: {seconds * 1e3:.2f} ms for {table_bytes / 1e6:.0f} MB of tables "
          f"({table_bytes / seconds / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
