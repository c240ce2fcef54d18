"""tenfold's CPU kernels: C++ ops that apply per-token adapter updates straight from a bucket's tables.

    from tenfold.kernels import cpu
    cpu.lowrank_apply(x, tokens, rows, [a_q, a_v], [b_q, b_v], [out[:, q], out[:, v]])   # lora, loretta_rep
    cpu.lowrank_expand(h, tokens, rows, [d_q, d_v], [out[:, q], out[:, v]])               # miss: h = block sums
    cpu.lowrank_shrink(x, tokens, rows, [wd_gate, wd_up], [h_gate, h_up])                # then other math, an expand
    cpu.bat_apply(x, tokens, rows, [dt_q, dt_v], [w0t_q, w0t_v], [out[:, q], out[:, v]])  # bat
    cpu.lorta_apply(x, tokens, rows, a_t, b, [head_weights_qkv[:, layer]], [out])        # lorta heads_out
    cpu.lorta_in_apply(x, tokens, rows, a_in, [c_lm_q, c_lm_k], [a_t, a_t_kv], [out[:, q], out[:, k]])  # heads_in
    cpu.bottleneck_apply(x, tokens, rows, [wd_t], [bd], [wu], "relu", [out])             # loretta_adp post-adapter
    cpu.bottleneck_pre(x, tokens, rows, [wd_g, wd_u], [bd_g, bd_u], [wu_g, wu_u], "relu", inputs, difference)
                                                                                        # loretta_adp pre-adapters

`tokens` [n] are the bucket's tokens sorted by table row, `rows` [n] their rows (int64, CPU); one table per module
(of one layer), fp32 or bf16, read in place (no gather, no copy to fp32) and summed in fp32; each module's output is
its column slice of the layer's output (bf16 or fp32), rounded once; `lowrank_shrink` alone writes fp32 h instead, for
families with other math between the shrink and the expand (loretta_adp: bias and activation). One call per layer
replaces the torch path's gather, batched matmuls, concatenation and index_add, whose per-op costs and fp32 copies of
the tables dominate a decode step on CPU. While one work item (an adapter's tokens) computes, the next item's table
row is prefetched: a row is read in strided passes that the hardware prefetchers do not follow.

The sources (`*.cpp` beside this file, `common.h`) are compiled on first use for this machine's CPU (`-march=native`: AVX-512 and
AVX512-BF16 where present) into ~/.cache/tenfold/kernels (or $TENFOLD_KERNEL_CACHE), keyed by the sources, the CPU's
features and torch's version, so a cache shared by different machines never loads a build made for another CPU.
Each build runs in a private directory renamed into place when complete, so a build that was killed never blocks a
later start.
The compiler is the one torch's inductor uses already (vLLM compiles the model with it on CPU). TENFOLD_CPU_KERNELS
selects: `native` (default) builds and uses them, and a build that fails stops the engine with the compiler's
message; `torch` keeps the torch ops (then every family computes in fp32 on CPU, as before these kernels).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

ENV = "TENFOLD_CPU_KERNELS"
CHOICES = ("native", "torch")
FOLDER = Path(__file__).parent


def sources() -> list[Path]:
    """The kernels' C++ sources (one file per family of ops) and their shared header."""
    return sorted(FOLDER.glob("*.cpp"))


def _source_bytes() -> bytes:
    return b"".join(path.read_bytes() for path in [*sources(), *sorted(FOLDER.glob("*.h"))])
_log = logging.getLogger("vllm.tenfold")


def enabled() -> bool:
    """Whether the native path on CPU uses these kernels (TENFOLD_CPU_KERNELS, default native)."""
    choice = os.environ.get(ENV, "native")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice == "native"


def cache_dir() -> Path:
    return Path(os.environ.get("TENFOLD_KERNEL_CACHE") or "~/.cache/tenfold/kernels").expanduser()


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp")


def build_name(namespace: str = "tenfold_cpu", flags: tuple[str, ...] = NATIVE_FLAGS) -> str:
    key = [_source_bytes(), _cpu_features().encode(), torch.__version__.encode(), " ".join(flags).encode()]
    return f"{namespace}_{hashlib.sha256(b'|'.join(key)).hexdigest()[:16]}"


@functools.cache
def ops():
    """torch.ops.tenfold_cpu, built and loaded once per process (the build itself once per machine)."""
    return build("tenfold_cpu", NATIVE_FLAGS)


def build(namespace: str, flags: tuple[str, ...]):
    """Build (or find built) and load the kernels with compiler `flags`, their ops under torch.ops.<namespace>."""
    from torch.utils.cpp_extension import load

    name = build_name(namespace, flags)
    directory = cache_dir() / name

    def compile_into(private: Path) -> None:
        _log.info("tenfold: building the CPU kernels for this machine into %s (once; a minute or two on a few "
                  "cores)", directory)
        start = time.perf_counter()
        try:
            load(name, [str(path) for path in sources()], extra_cflags=[*flags, f"-DTENFOLD_CPU_OPS={namespace}"],
                 extra_ldflags=["-fopenmp"], build_directory=str(private), is_python_module=False, verbose=False)
        except Exception as error:  # the compiler's own message is in the error
            raise RuntimeError(f"tenfold could not build its CPU kernels ({FOLDER}) in {private}: {error}\n"
                               f"They need the C++ compiler torch's inductor uses (g++); or set {ENV}=torch to serve "
                               f"with the slower torch ops") from error
        _log.info("tenfold: CPU kernels built in %.1f s", time.perf_counter() - start)

    library = directory / f"{name}.so"
    if not publish_build(directory, library.name, compile_into):
        torch.ops.load_library(str(library))  # built before (compile_into loads what it builds)
    return getattr(torch.ops, namespace)


def publish_build(directory: Path, library: str, compile_into: Callable[[Path], None]) -> bool:
    """Make `directory/library` exist; True when this process compiled it (`compile_into` builds and loads it).

    Every build runs in a directory of its own, renamed to `directory` once complete, so a build that dies (killed,
    out of memory) leaves no lock or half-written library behind for the next start to wait on: torch's own build
    lock has no timeout. Concurrent first starts each build; the first rename wins, the others keep theirs loaded."""
    if (directory / library).exists():
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(directory)
    private = directory.with_name(f".{directory.name}.building.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    private.mkdir()
    try:
        compile_into(private)
        if not (private / library).exists():
            raise RuntimeError(f"tenfold's CPU kernel build finished without {library} in {private}")
        if directory.exists() and not (directory / library).exists():
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete build by an older tenfold (a stale lock)
        try:
            private.rename(directory)
        except OSError:  # another process published first: its library is the same build
            pass
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the loaded library stays mapped after its file is gone
    return True


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete private build directories of `directory` whose process is gone."""
    for private in directory.parent.glob(f".{directory.name}.building.*"):
        try:
            pid = int(private.name.split(".")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(private, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def lowrank_apply(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, a_t: list[torch.Tensor],
                  b: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out[m][tokens[i]] += (x[tokens[i]] @ a_t[m][rows[i]].T) @ b[m][rows[i]] for every module m, in place; x [T, in],
    a_t[m] [R, r, in], b[m] [R, r, p], out[m] [T, p] in x's dtype (column slices of one layer output are fine)."""
    ops().lowrank_apply(x, tokens, rows, a_t, b, out)


def lowrank_expand(h: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, b: list[torch.Tensor],
                   out: list[torch.Tensor]) -> None:
    """out[m][tokens[i]] += h[i] @ b[m][rows[i]] for every module m, in place; h [n, r] fp32 (shared), b[m] [R, r, p]
    with p = out[m]'s width or a period that repeats along it (MiSS mini blocks)."""
    ops().lowrank_expand(h, tokens, rows, b, out)


def lowrank_shrink(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, a_t: list[torch.Tensor],
                   h: list[torch.Tensor]) -> None:
    """h[m][i] = x[tokens[i]] @ a_t[m][rows[i]].T for every module m, written in place (a token whose row is < 0 keeps
    its h); x [T, in], a_t[m] [R, r, in], h[m] [n, r] fp32 with contiguous rows (column slices of a wider buffer are
    fine). The shrink of `lowrank_apply` alone, for updates with other math before their expand (LoRETTA adp)."""
    ops().lowrank_shrink(x, tokens, rows, a_t, h)


def bat_apply(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, d_t: list[torch.Tensor],
              w0_t: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out[m][tokens[i]] += sum_j W0_ij D_i x_j + D_i sum_j x_j (Bat, r x r blocks) for every module m, in place;
    x [T, in], d_t[m] [R, r, p] (`kernels.bat.bat_table` per row), w0_t[m] the frozen weight transposed [in, p] in the
    tables' dtype, out[m] [T, p] in x's dtype."""
    ops().bat_apply(x, tokens, rows, d_t, w0_t, out)


def lorta_apply(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor,
                hw: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """LoRTA heads_out: out[m][tokens[i], head h] += ((x[tokens[i]] @ a_t[rows[i]].T) * hw[m][rows[i], h]) @ b[rows[i]]
    for every module m, in place; a_t [R, r, in], b [R, r, d_h], hw[m] [R, heads_m, r] (one layer's head weights,
    a strided view is fine), out[m] [T, heads_m * d_h] in x's dtype."""
    ops().lorta_apply(x, tokens, rows, a_t, b, hw, out)


def lorta_in_apply(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, a_in: torch.Tensor,
                   w: list[torch.Tensor], a_t: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """LoRTA heads_in: with u = a_in[rows[i]] @ x[tokens[i]] (a_in [R, r, in]: C_h[h, k] * B^T[c, k] at column
    h * d_h + c, the sum over the input's heads as one matrix), out[m][tokens[i]] += (u * w[m][rows[i]]) @
    a_t[m][rows[i]] for every module m, in place; w[m] [R, r] (c_lm of one layer and module, a strided view is
    fine), a_t[m] [R, r, out_m], out[m] [T, out_m] in x's dtype."""
    ops().lorta_in_apply(x, tokens, rows, a_in, w, a_t, out)


# the activations (transformers' ACT2FN names) that `bottleneck_apply` and `bottleneck_pre` compute
BOTTLENECK_ACTIVATIONS = frozenset({"linear", "relu", "tanh", "sigmoid", "silu", "swish", "gelu", "gelu_new",
                                    "gelu_pytorch_tanh"})


def bottleneck_apply(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, wd_t: list[torch.Tensor],
                     bd: list[torch.Tensor], wu: list[torch.Tensor], activation: str, out: list[torch.Tensor]) -> None:
    """LoRETTA adp's bottleneck: out[m][tokens[i]] += [act(x[tokens[i]] @ wd_t[m][r].T + bd[m][r]), 1] @ wu[m][r] with
    r = rows[i], for every module m, in place (out[m] [T, out_m] in x's dtype; x may be out itself); wd_t[m]
    [R, b, d], bd[m] [R, b], wu[m] [R, b + 1, out_m] (the scaled W_up with s * b_up as its last row)."""
    ops().bottleneck_apply(x, tokens, rows, wd_t, bd, wu, activation, out)


def bottleneck_pre(x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, wd_t: list[torch.Tensor],
                   bd: list[torch.Tensor], wu: list[torch.Tensor], activation: str, inputs: torch.Tensor,
                   difference: torch.Tensor) -> None:
    """LoRETTA adp's pre-adapters of a fused GEMM: with a_m as in `bottleneck_apply` (modules: the carrier, then the
    other one where the adapter targets it), inputs[tokens[i]] = x[tokens[i]] + a_0 (rounded once; inputs [T, d]
    in x's dtype, not x itself) and difference[tokens[i]] = a_1 - a_0 (a_1 = 0 for one module; [T, d], fp32 or bf16).
    Rows of other tokens are left as they are."""
    ops().bottleneck_pre(x, tokens, rows, wd_t, bd, wu, activation, inputs, difference)
