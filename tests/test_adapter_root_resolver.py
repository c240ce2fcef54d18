"""The adapter-root resolver: names map to directories inside the root and nothing outside it."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("vllm", reason="the resolver implements vLLM's LoRAResolver")

from tenfold.engine.resolver import AdapterRootResolver, InvalidAdapterName, adapter_path  # noqa: E402


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", ".hidden", "", "x" * 129, "a..b", "na me", "a\x00",
                                  "good\n", "good-1.v2\n"])
def test_malformed_or_escaping_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidAdapterName):
        adapter_path(tmp_path, name)


def test_a_name_with_a_trailing_newline_is_not_the_name_without_it(tmp_path):
    """`$` matches before a final newline: the whole name must match (a directory may have such a name)."""
    (tmp_path / "good").mkdir()
    (tmp_path / "good\n").mkdir()
    assert adapter_path(tmp_path, "good") == (tmp_path / "good").resolve()
    assert asyncio.run(AdapterRootResolver(tmp_path).resolve_lora("base", "good\n")) is None


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sneaky").symlink_to(outside)
    with pytest.raises(InvalidAdapterName, match="outside"):
        adapter_path(root, "sneaky")


def test_resolves_existing_directories_only(tmp_path):
    (tmp_path / "good-1.v2").mkdir()
    resolver = AdapterRootResolver(tmp_path)
    request = asyncio.run(resolver.resolve_lora("base", "good-1.v2"))
    assert request.lora_name == "good-1.v2" and request.lora_path == str((tmp_path / "good-1.v2").resolve())
    assert asyncio.run(resolver.resolve_lora("base", "absent")) is None
    assert asyncio.run(resolver.resolve_lora("base", "../etc")) is None
