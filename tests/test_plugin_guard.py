"""The plugin is idempotent, installed as a vLLM general plugin, and refuses vLLM versions it was not built for."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="the plugin patches vllm")

from tenfold.engine import plugin, vllm_compat  # noqa: E402
from tenfold.engine.patches import Replacement  # noqa: E402
from tenfold.kernels import lora_cpu_ops  # noqa: E402


def test_entry_point_is_installed():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("tenfold") == "tenfold.engine.plugin:register"


def test_register_is_idempotent():
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.worker_manager import WorkerLoRAManager

    plugin.register()
    patched = (WorkerLoRAManager._load_adapter, lora_ops.bgmv_shrink)
    plugin.register()
    vllm_compat.install()
    assert (WorkerLoRAManager._load_adapter, lora_ops.bgmv_shrink) == patched
    assert lora_ops.bgmv_shrink is lora_cpu_ops.bgmv_shrink


def test_every_replaced_vllm_symbol_is_documented_with_its_patch():
    """The module's docstring lists, per patch, the vLLM symbols it replaces: a patch that replaces one more must say
    so there (the owner's name and the attribute's, as words)."""
    import re

    plugin.register()
    assert len(vllm_compat.REPLACED) > 30  # every patch recorded what it replaced
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", vllm_compat.__doc__))
    missing = [symbol for symbol in vllm_compat.REPLACED
               if not {symbol.rsplit(".", 2)[-2], symbol.rsplit(".", 1)[-1]} <= words]
    assert not missing, f"replaced but not documented in vllm_compat's docstring: {missing}"


def test_a_vllm_without_a_patched_symbol_is_refused_by_name():
    class Upstream:  # stands for a vLLM class whose layout changed
        pass

    with pytest.raises(vllm_compat.UnsupportedVLLMVersion, match=r"Upstream\._load_adapter, which this vLLM"):
        vllm_compat._install(Replacement(Upstream, "_load_adapter", lambda self: None))


def test_unsupported_vllm_version_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(vllm_compat.UnsupportedVLLMVersion, match="supports vLLM 0.32.0 only, found 0.33.1"):
        vllm_compat.check_version()


def test_cpu_ops_leave_rows_without_adapter_untouched():
    """Direct check of the fixed op: index -1 rows get nothing, even when every slot holds weights."""
    import torch

    slots, rank, width = 3, 4, 8
    weights = torch.randn(slots, 1, width, rank)
    inputs = torch.randn(5, rank)
    indices = torch.tensor([0, -1, 2, -1, 1])
    out = torch.zeros(5, width)
    lora_cpu_ops.bgmv_expand(inputs, weights, out, indices, add_inputs=True)
    assert torch.equal(out[1], torch.zeros(width)) and torch.equal(out[3], torch.zeros(width))
    torch.testing.assert_close(out[2], weights[2, 0] @ inputs[2])


def test_cpu_malloc_settings_take_blocks_of_a_few_mb_from_the_heap_and_can_be_turned_off():
    """In a fresh process (the settings are process-wide), a new 4 MB tensor is mmapped by glibc's defaults (and
    page-faulted in anew on every step) but comes from the reusable heap under tenfold's settings; read from glibc's
    own accounting (mallinfo2: bytes in mmapped blocks)."""
    import subprocess
    import sys

    probe = "\n".join([
        "import ctypes, torch",
        "from tenfold.engine.cpu_malloc import tune_malloc",
        "done = tune_malloc()",
        "class Info(ctypes.Structure):",
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks '",
        "                                                'fordblks keepcost').split()]",
        "mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2",
        "mallinfo2.restype = Info",
        "before = mallinfo2().hblkhd",
        "block = torch.empty(1 << 20)  # 4 MB",
        "print(done, mallinfo2().hblkhd - before >= 4 << 20)"])
    seen = {}
    for setting in ("1", "0"):
        env = {**__import__("os").environ, "TENFOLD_CPU_MALLOC": setting}
        seen[setting] = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                                       check=True, timeout=120).stdout.split()
    assert seen == {"1": ["True", "False"], "0": ["False", "True"]}, seen
