"""The loader's verdicts (tenfold/engine/loader.py): each adapter version is read and checked once per process,
however many adapters rotate and however often a bad one is asked for; facts for metrics and listings never load."""

from __future__ import annotations

import os

import pytest

from adapter_cases import make
from tenfold.adapters import AdapterError, AdapterValueError, save_adapter
from tenfold.engine import loader


@pytest.fixture
def reads(monkeypatch):
    """The directories the loader reads adapter files from, in order."""
    seen = []
    original = loader.load_adapter

    def counting(directory, *args, **kwargs):
        seen.append(str(directory))
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(loader, "load_adapter", counting)
    return seen


def test_a_refused_version_is_read_once(specs, tmp_path, reads):
    spec = specs["mha"]
    adapter = make("lora", spec, seed=41)
    next(iter(adapter.tensors().values())).data[0, 1] = float("nan")
    directory = save_adapter(adapter, tmp_path / "bad")
    messages = set()
    for _ in range(50):
        with pytest.raises(AdapterError) as refused:
            loader.check_for_native(directory, spec)
        messages.add((type(refused.value), str(refused.value)))
    assert len(reads) == 1, "a flood of checks of one bad version reads it once"
    assert len(messages) == 1 and str(directory) in next(iter(messages))[1]
    # a rewrite is a new version: checked again (and this one passes)
    before = loader.version_of(directory)
    save_adapter(make("lora", spec, seed=42), tmp_path / "good")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.replace(tmp_path / "good" / name, directory / name)
    assert loader.version_of(directory) != before
    assert loader.check_for_native(directory, spec).family == "lora"
    assert len(reads) == 2


def test_many_adapters_in_rotation_are_each_read_once(specs, tmp_path, reads):
    """Far more adapters than the old 64-entry cache held, requested round-robin: one read per version."""
    spec = specs["gqa"]
    paths = [save_adapter(make("lorta_qv", spec, seed=i), tmp_path / f"a{i}") for i in range(80)]
    for _ in range(3):
        for path in paths:
            loader.load_for_mode(path, spec, max_rank=16, budget_slots=4)
    assert sorted(reads) == sorted(str(p.resolve()) for p in paths)


def test_facts_come_from_the_check_and_never_load(specs, tmp_path, reads):
    spec = specs["mha"]
    path = save_adapter(make("miss", spec, seed=43), tmp_path / "m")
    assert loader.recorded_facts(path, spec) is None, "nothing checked yet: no facts, and no load to find them"
    assert reads == []
    checked = loader.check_for_native(path, spec)
    facts = loader.recorded_facts(path, spec)
    assert (facts.family, facts.rank, facts.params) == ("miss", checked.rank, checked.params)
    assert reads == [str(path.resolve())]
    assert loader.recorded_facts(path, spec, tensor_parallel_size=2) is None, "another sharding: not checked"


def test_a_snapshot_files_its_facts_under_the_users_directory(specs, tmp_path, reads):
    """What versions.py does: the served copy is checked on its own bytes, and the user's directory (which metrics
    labels and listings name) finds its facts without a read."""
    import shutil

    spec = specs["mha"]
    source = save_adapter(make("loretta_rep", spec, seed=44), tmp_path / "user")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(source, snapshot)
    loader.note_snapshot(snapshot, source, loader.version_of(source)[1])
    loader.check_for_native(snapshot, spec)
    assert reads == [str(snapshot.resolve())]
    assert loader.recorded_facts(source, spec).family == "loretta_rep"
    loader.forget(snapshot)
    assert loader.recorded_facts(snapshot, spec) is None
    assert loader.recorded_facts(source, spec) is not None, "the user's version keeps its facts"


def test_the_worker_load_reuses_the_refusal(specs, tmp_path, reads):
    """A worker asked for a version the front end refused does not read it again."""
    spec = specs["mha"]
    directory = save_adapter(make("lorta_heads_out", spec, seed=45), tmp_path / "x")
    adapter = make("lorta_heads_out", spec, seed=45)
    adapter.tensor("lora_C_h").data[0, 0] = float("inf")
    save_adapter(adapter, directory)
    with pytest.raises(AdapterValueError):
        loader.check_for_native(directory, spec)
    with pytest.raises(AdapterValueError):
        loader.load_for_mode(directory, spec, tensors=True)
    assert len(reads) == 1
