"""Time tenfold's Triton kernels (one per family apply) on a CUDA GPU at Llama-2-7B shapes, against (a) their torch
reference ops (`tenfold.kernels.reference`), (b) vLLM's Triton LoRA shrink/expand at the same rank, (c) the base GEMMs
of the layers they adapt, and (d) the floor set by the kernel's own bytes at the bandwidth measured on the same GPU.

    python benchmarks/triton_kernels.py                        # -> benchmarks/results/kernels_<gpu>.json
    python benchmarks/triton_kernels.py --vllm-src /path/to/dir/with/vllm --tokens 64 --adapters 64 --cases lorta_heads_out
    python benchmarks/triton_kernels.py --smoke                # CPU: tiny shapes, reference ops only (checks the script runs)

Every case applies the family to a whole attention (q, k, v, o) or MLP block for T tokens spread round-robin over S
distinct adapters (table rows), T in {1, 16, 64, 256}, S in {1, 16, 64}. `cold_us` is triton.testing.do_bench (the L2
cache flushed before every call, launches from Python), `graph_us` is do_bench_cudagraph (replays of a captured CUDA
graph, L2 warm: no launch cost; the capture itself checks that nothing syncs with the host). The goal of the issue:
lorta on q, k, v, o at T=64, S=64 costs <= 5 % of those four base GEMMs and beats vLLM's LoRA kernels at equal rank.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tenfold.kernels import reference  # noqa: E402
from tenfold.kernels.segments import segments_of  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096        # Llama-2-7B: d
    heads: int = 32           # H (multi-head: k and v have 32 heads too)
    head_dim: int = 128       # d_h
    intermediate: int = 11008  # d_ff
    rank: int = 16            # lora / lorta / miss rank, and vLLM's LoRA rank in the comparison
    bat_block: int = 16
    bottleneck: int = 64      # loretta_adp


LLAMA_7B = Shapes()
SMOKE = Shapes(hidden=64, heads=4, head_dim=16, intermediate=96, rank=8, bat_block=16, bottleneck=16)
CASES = ("lorta_heads_out", "lorta_heads_in", "lora", "miss", "loretta_adp", "bat")


@dataclass
class Case:
    """One family applied to one block of a layer: callables taking the ops module (kernels or reference ops)."""

    name: str
    modules: str
    run: callable                       # run(ops) -> None: the apply, in place
    outputs: list[torch.Tensor]         # what run updates
    base: callable                      # the base GEMMs of the same modules
    floor_bytes: int                    # what the kernels must read and write at least
    vllm_lora: callable | None = None   # vLLM's LoRA shrink + expand on the same modules at the same rank
    notes: list[str] = field(default_factory=list)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,16,64,256", help="comma list of T")
    parser.add_argument("--adapters", default="1,16,64", help="comma list of S (distinct adapters = table rows)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--rank", type=int, default=LLAMA_7B.rank)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--vllm-src", type=Path, default=None,
                        help="a directory holding vllm/lora/ops/triton_ops (a vLLM checkout or site-packages); "
                             "default: the installed vllm, if it imports")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels_<gpu>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, torch reference ops only, no JSON")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.adapters = [int(s) for s in args.adapters.split(",")]
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    return args


# -- inputs ------------------------------------------------------------------------------------------------------------

class Inputs:
    def __init__(self, tokens: int, adapters: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.tokens, self.adapters, self.dtype, self.device = tokens, adapters, dtype, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # round-robin over the adapters, tokens shuffled: the grouping has real work to do
        rows = torch.arange(tokens, device=device) % adapters
        self.rows = rows[torch.randperm(tokens, generator=self.generator, device=device)]
        self.seg = segments_of(self.rows, adapters)
        self.distinct = min(tokens, adapters)

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.generator, device=self.device) * scale).to(self.dtype)

    def table(self, *shape, fan_in=None):
        """[S, *shape] random factors scaled by 1/sqrt(fan_in) (default: the first axis, the one a product sums
        over), so that every update is of order one: large enough for the check against the reference ops to see it."""
        return self.randn(self.adapters, *shape, scale=(fan_in or shape[0]) ** -0.5)

    @property
    def size(self) -> int:
        return self.dtype.itemsize


def gemms(inputs: Inputs, pairs):
    """The base GEMMs: pairs of (x [T, in], W [out, in])."""
    return lambda: [torch.nn.functional.linear(x, w) for x, w in pairs]


# -- vLLM's LoRA kernels -----------------------------------------------------------------------------------------------

class VllmLoRA:
    """vLLM's Triton LoRA shrink/expand (lora_shrink_op / lora_expand_op) and its kernel metadata."""

    def __init__(self, source: Path | None):
        if source is not None:
            sys.path.insert(0, str(source))
        ops = importlib.import_module("vllm.lora.ops.triton_ops")
        self.shrink, self.expand, self.meta_class = ops.lora_shrink, ops.lora_expand, ops.LoRAKernelMeta
        self.origin = str(Path(inspect.getfile(ops)).parent)

    def block(self, inputs: Inputs, x: torch.Tensor, output: torch.Tensor, out_widths: list[int], rank: int):
        """A callable applying LoRA to `output` [T, sum(out_widths)] for q|k|v-like slices reading x."""
        meta = self.meta_class.make(max_loras=inputs.adapters, max_num_tokens=inputs.tokens, device=inputs.device)
        meta.prepare_tensors(inputs.rows.to(torch.int32))
        meta_args = meta.meta_args(inputs.tokens, True) if len(inspect.signature(meta.meta_args).parameters) > 1 \
            else meta.meta_args(inputs.tokens)
        a = [inputs.table(rank, x.shape[1], fan_in=x.shape[1]) for _ in out_widths]      # [S, r, in] per slice
        b = [inputs.table(width, rank, fan_in=rank) for width in out_widths]              # [S, out, r] per slice
        shrunk = torch.zeros(len(out_widths), inputs.tokens, rank, dtype=torch.float32, device=inputs.device)

        def run():
            self.shrink(x, a, shrunk, *meta_args, 1.0)
            self.expand(shrunk, b, output, *meta_args, offset_start=0, add_inputs=True)
        return run


def load_vllm(source: Path | None):
    try:
        return VllmLoRA(source), None
    except Exception as error:  # noqa: BLE001 - any failure means: no vLLM baseline
        where = f"from {source}" if source else "from the installed vllm"
        return None, f"vLLM's LoRA kernels did not import {where} ({type(error).__name__}: {error}); pass --vllm-src"


# -- cases -------------------------------------------------------------------------------------------------------------

def attention_case(name: str, inputs: Inputs, shapes: Shapes, vllm: VllmLoRA | None) -> Case:
    """q, k, v (fused output [T, 3d]) and o ([T, d]) of one layer."""
    d, r, heads, head_dim = shapes.hidden, shapes.rank, shapes.heads, shapes.head_dim
    x, x_o = inputs.randn(inputs.tokens, d), inputs.randn(inputs.tokens, d)
    out_qkv, out_o = inputs.randn(inputs.tokens, 3 * d), inputs.randn(inputs.tokens, d)
    w_qkv, w_o = inputs.randn(3 * d, d, scale=0.02), inputs.randn(d, d, scale=0.02)
    t, k, e = inputs.tokens, inputs.distinct, inputs.size
    activations = e * (2 * t * d + 2 * t * 4 * d)  # x and x_o read, both outputs read and written
    slices = [slice(i * d, (i + 1) * d) for i in range(3)]
    if name == "lorta_heads_out":
        a, b = inputs.table(d, r), inputs.table(r, head_dim)
        hw_qkv, hw_o = inputs.table(3 * heads, r, fan_in=1), inputs.table(heads, r, fan_in=1)

        def run(ops):
            ops.lorta_heads_out_apply(x, a, hw_qkv, b, inputs.seg, out_qkv)
            ops.lorta_heads_out_apply(x_o, a, hw_o, b, inputs.seg, out_o)
        tables = k * e * (2 * d * r + 2 * r * head_dim + 4 * heads * r)  # A and B read for each input
    elif name == "lorta_heads_in":
        b_t, c_h = inputs.table(head_dim, r), inputs.table(heads, r, fan_in=heads)
        c_lm = [inputs.table(r, fan_in=1) for _ in range(4)]
        a_t = [inputs.table(r, d) for _ in range(4)]

        def run(ops):
            u = ops.lorta_heads_in_shrink(x, b_t, c_h, inputs.seg)
            for i, cols in enumerate(slices):
                ops.lorta_heads_in_expand(u, c_lm[i], a_t[i], inputs.seg, out_qkv[:, cols])
            ops.lorta_heads_in_apply(x_o, b_t, c_h, c_lm[3], a_t[3], inputs.seg, out_o)
        tables = k * e * (2 * (head_dim * r + heads * r) + 4 * (r + r * d))
    elif name == "lora":
        a, b = [inputs.table(d, r) for _ in range(4)], [inputs.table(r, d) for _ in range(4)]

        def run(ops):
            for i, cols in enumerate(slices):
                ops.lowrank_apply(x, a[i], b[i], inputs.seg, out_qkv[:, cols])
            ops.lowrank_apply(x_o, a[3], b[3], inputs.seg, out_o)
        tables = k * e * 4 * (d * r + r * d)
    else:  # miss: one block-sum shrink per input, a block D [r, d] per module
        blocks = [inputs.table(r, d) for _ in range(4)]

        def run(ops):
            u = ops.miss_shrink(x, r, inputs.seg)
            for i, cols in enumerate(slices):
                ops.miss_expand(u, blocks[i], inputs.seg, out_qkv[:, cols])
            ops.miss_apply(x_o, blocks[3], inputs.seg, out_o)
        tables = k * e * 4 * r * d
    vllm_run = None
    if vllm is not None:
        qkv = vllm.block(inputs, x, out_qkv, [d, d, d], r)
        o = vllm.block(inputs, x_o, out_o, [d], r)
        vllm_run = lambda: (qkv(), o())  # noqa: E731
    return Case(name, "q,k,v,o", run, [out_qkv, out_o], gemms(inputs, [(x, w_qkv), (x_o, w_o)]),
                activations + tables, vllm_run)


def mlp_case(name: str, inputs: Inputs, shapes: Shapes) -> Case:
    d, ff, t, k, e = shapes.hidden, shapes.intermediate, inputs.tokens, inputs.distinct, inputs.size
    x, hidden = inputs.randn(t, d), inputs.randn(t, ff)
    w_gate_up, w_down = inputs.randn(2 * ff, d, scale=0.02), inputs.randn(d, ff, scale=0.02)
    base = gemms(inputs, [(x, w_gate_up), (hidden, w_down)])
    if name == "loretta_adp":
        b = shapes.bottleneck
        parts = [(inputs.table(d, b), inputs.table(b), inputs.table(b, d), inputs.table(d), inputs.table(1)[:, 0])
                 for _ in range(3)]
        pre = [inputs.randn(t, d) for _ in range(2)]  # the pre-adapters' outputs, multiplied by W0 afterwards
        post = inputs.randn(t, d)                    # down_proj's output, the post-adapter's input and output

        def run(ops):
            for out, (w_d, b_d, w_u, b_u, s) in zip((*pre, post), parts):
                z = x if out is not post else post
                ops.bottleneck_apply(z, w_d, b_d, w_u, b_u, s, inputs.seg, out, act="silu")
        floor = e * (3 * t * d + 3 * 2 * t * d) + k * e * 3 * (2 * d * b + b + d)
        return Case(name, "gate,up (adapter only; W0 a(x) is a dense GEMM) and down", run, [*pre, post], base, floor,
                    notes=["the pre-adapters' W0_gate a, W0_up a products are not included"])
    block = shapes.bat_block  # bat on gate and up (the fused output), W0 = the frozen gate_up rows
    d_gate, d_up = (inputs.table(ff // block, block, block, fan_in=block) for _ in range(2))
    out = inputs.randn(t, 2 * ff)

    def run(ops):
        ops.bat_apply(x, d_gate, w_gate_up[:ff], inputs.seg, out[:, :ff])
        ops.bat_apply(x, d_up, w_gate_up[ff:], inputs.seg, out[:, ff:])
    floor = e * (t * d + 2 * t * 2 * ff) + k * e * 2 * ff * block + e * 2 * ff * d
    return Case(name, "gate,up", run, [out], gemms(inputs, [(x, w_gate_up)]), floor,
                notes=["base: the gate_up GEMM only"])


def build_case(name, inputs, shapes, vllm) -> Case:
    if name in ("loretta_adp", "bat"):
        return mlp_case(name, inputs, shapes)
    return attention_case(name, inputs, shapes, vllm)


def error_vs_reference(case: Case, kernels) -> float:
    """The kernels' largest deviation from the reference ops on this case, relative to the references' largest
    update."""
    before = [o.clone() for o in case.outputs]
    results = []
    for ops in (kernels, reference):
        case.run(ops)
        results.append([(o.float() - b.float()) for o, b in zip(case.outputs, before)])
        for o, b in zip(case.outputs, before):
            o.copy_(b)
    got, want = results
    scale = max(float(w.abs().max()) for w in want) or 1.0
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


# -- timing ------------------------------------------------------------------------------------------------------------

def gpu_timings(fn) -> dict:
    import triton.testing

    result = {"cold_us": 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")}
    try:
        result["graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as error:  # noqa: BLE001 - a failed capture is a finding (a host sync), not a crash
        result["graph_error"] = f"{type(error).__name__}: {error}"[:300]
        torch.cuda.synchronize()
    return result


def measured_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    import triton.testing

    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def run_gpu(args) -> None:
    from tenfold.kernels import triton as kernels

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    shapes = Shapes(rank=args.rank)
    vllm, vllm_missing = load_vllm(args.vllm_src)
    if vllm_missing:
        print(f"note: {vllm_missing}; the vLLM column is skipped", file=sys.stderr)
    bandwidth = measured_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    results = []
    for name in args.cases:
        for tokens in args.tokens:
            for adapters in args.adapters:
                inputs = Inputs(tokens, adapters, dtype, device)
                case = build_case(name, inputs, shapes, vllm)
                row = {"case": name, "modules": case.modules, "tokens": tokens, "adapters": adapters,
                       "distinct_adapters": inputs.distinct, "rank": shapes.rank, "floor_bytes": case.floor_bytes,
                       "floor_us": 1e6 * case.floor_bytes / bandwidth, "notes": case.notes}
                with torch.inference_mode():
                    # the first GPU run is a test too
                    row["max_rel_error_vs_reference"] = error_vs_reference(case, kernels)
                    row["kernel"] = gpu_timings(lambda: case.run(kernels))
                    row["reference"] = gpu_timings(lambda: case.run(reference))
                    row["base_gemms"] = gpu_timings(case.base)
                    row["segments"] = gpu_timings(lambda: segments_of(inputs.rows, adapters))
                    if case.vllm_lora is not None:
                        row["vllm_lora"] = gpu_timings(case.vllm_lora)
                for baseline in ("base_gemms", "reference", "vllm_lora"):
                    if baseline in row:
                        row[f"kernel_vs_{baseline}"] = row["kernel"]["cold_us"] / row[baseline]["cold_us"]
                results.append(row)
                print(summary_line(row), file=sys.stderr)
                del case, inputs
                torch.cuda.empty_cache()
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__, "dtype": args.dtype,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shapes": shapes.__dict__,
        "copy_bandwidth_GBps": bandwidth / 1e9, "vllm_lora": vllm.origin if vllm else vllm_missing,
        "goal": goal(results), "results": results,
    }
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"kernels_{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}\ngoal: {report['goal']}", file=sys.stderr)


def summary_line(row: dict) -> str:
    def us(key):
        timing = row.get(key)
        return f"{timing['cold_us']:8.1f}" if timing else "       -"
    return (f"{row['case']:16} T={row['tokens']:<4} S={row['adapters']:<3} kernel {us('kernel')} us"
            f"  reference {us('reference')}"
            f"  vllm {us('vllm_lora')}  base {us('base_gemms')}  floor {row['floor_us']:7.1f}"
            f"  err {row['max_rel_error_vs_reference']:.1e}")


def goal(results: list[dict]) -> dict:
    """The issue's target: lorta (heads_out) on q, k, v, o at T=64, S=64."""
    row = next((r for r in results if r["case"] == "lorta_heads_out" and r["tokens"] == 64 and r["adapters"] == 64),
               None)
    if row is None:
        return {"measured": False, "why": "run with --cases lorta_heads_out --tokens 64 --adapters 64 (the defaults)"}
    verdict = {"measured": True, "kernel_vs_base_gemms": row["kernel_vs_base_gemms"],
               "within_5_percent_of_base": row["kernel_vs_base_gemms"] <= 0.05}
    if "vllm_lora" in row:
        verdict.update(kernel_vs_vllm_lora=row["kernel_vs_vllm_lora"], beats_vllm_lora=row["kernel_vs_vllm_lora"] < 1)
    return verdict


# -- smoke (CPU) -------------------------------------------------------------------------------------------------------

def run_smoke(args) -> None:
    """Every case at tiny shapes through the torch reference ops on CPU: the script's plumbing, not a measurement. Under
    TRITON_INTERPRET=1 the interpreted kernels are checked against the reference ops on every case as well."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    checked = importlib.import_module("tenfold.kernels.triton") if interpreted else reference
    for name in args.cases:
        for tokens in (1, 16):
            for adapters in (1, 4):
                inputs = Inputs(tokens, adapters, torch.float32, torch.device("cpu"))
                case = build_case(name, inputs, SMOKE, None)
                with torch.inference_mode():
                    start = time.perf_counter()
                    case.run(reference)
                    case.base()
                    elapsed = time.perf_counter() - start
                    error = error_vs_reference(case, checked)
                print(f"smoke {name:16} T={tokens:<3} S={adapters:<2} reference + base ran in {1e3 * elapsed:6.1f} ms"
                      f" (floor {case.floor_bytes} bytes; {'kernel' if interpreted else 'reference op'} vs reference "
                      f"op {error:.1g})")
    print("smoke run complete: the reference ops ran on every case; time the kernels on a CUDA GPU without --smoke")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        run_smoke(args)
        return 0
    if not torch.cuda.is_available():
        print(f"benchmarks/triton_kernels.py times Triton kernels and needs a CUDA GPU; none is visible here (torch "
              f"{torch.__version__}, {platform.machine()}). Use --smoke to check the script on CPU.", file=sys.stderr)
        return 2
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
