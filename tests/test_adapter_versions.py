"""The version table behind safe unload/reload/rewrite (tenfold/engine/versions.py), without an engine: admission
pins a version in an immutable snapshot, a rewrite makes a new version, retired versions are freed exactly when
their last request ends, concurrent first admissions snapshot once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="admission builds vLLM LoRARequests")

from vllm.lora.request import LoRARequest  # noqa: E402

from adapter_cases import make  # noqa: E402
from tenfold.adapters import AdapterError, load_adapter, save_adapter  # noqa: E402
from tenfold.engine.versions import ENGINE_ID_BASE, AdapterVersions  # noqa: E402


@pytest.fixture
def table(specs):
    freed, validated = [], []

    def validate(path):
        validated.append(path)
        load_adapter(path, specs["mha"]).validate(specs["mha"])

    versions = AdapterVersions(validate, freed.extend)
    yield versions, freed, validated
    versions.close()


def request(path, user_id=7, name="a"):
    return LoRARequest(name, user_id, str(path))


def test_admission_pins_a_snapshot_that_survives_rewrite_and_deletion(table, specs, tmp_path):
    versions, freed, _ = table
    old, new = make("lora", specs["mha"], seed=1), make("lora", specs["mha"], seed=2)
    save_adapter(old, tmp_path / "a")
    (tmp_path / "a" / "optimizer.pt").write_bytes(b"\0" * 4096)  # training leftovers are not copied
    first = versions.admit(request(tmp_path / "a"))
    assert first.lora_int_id >= ENGINE_ID_BASE and first.lora_name == "a"
    assert first.lora_path != str(tmp_path / "a")
    assert sorted(p.name for p in Path(first.lora_path).iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    import shutil

    shutil.rmtree(tmp_path / "a")
    save_adapter(new, tmp_path / "a")
    second = versions.admit(request(tmp_path / "a"))
    assert second.lora_int_id != first.lora_int_id, "a rewrite is a new version"
    # each snapshot holds exactly the weights it was admitted with
    for bound, adapter in ((first, old), (second, new)):
        served = load_adapter(bound.lora_path, specs["mha"])
        for key in adapter.targets:
            a, b = adapter.lora_factors(key)
            sa, sb = served.lora_factors(key)
            assert (a == sa).all() and (b == sb).all()
    assert freed == [], "the old version still has its admission reserved"
    versions.release(first.lora_int_id)
    assert [v.engine_id for v in freed] == [first.lora_int_id], "retired by the rewrite, freed when idle"
    shutil.rmtree(tmp_path / "a")
    assert load_adapter(second.lora_path, specs["mha"]) is not None, "the user's files are gone, the snapshot is not"


def test_unload_frees_each_version_when_its_last_request_ends(table, specs, tmp_path):
    versions, freed, _ = table
    save_adapter(make("miss", specs["mha"], seed=3), tmp_path / "a")
    bound = versions.admit(request(tmp_path / "a"), reserve=False)
    versions.started("r1", bound.lora_int_id)
    versions.started("r2", bound.lora_int_id)
    had, free_now = versions.retire_user(7)
    assert had and free_now == [], "two requests still run on it"
    late = versions.admit(request(tmp_path / "a"))  # resolved before the unload, admitted after it
    assert late.lora_int_id == bound.lora_int_id, "same version: served, not reloaded"
    versions.ended("r1")
    versions.release(late.lora_int_id)
    assert freed == []
    versions.ended("r2")
    assert [v.engine_id for v in freed] == [bound.lora_int_id]
    versions.ended("r2")  # a second report of the same end changes nothing
    assert len(freed) == 1
    snapshot = freed[0].snapshot
    versions.discard(freed[0])
    assert not snapshot.exists() and versions.live_versions() == 0


def test_idle_version_is_freed_at_once_and_reload_binds_anew(table, specs, tmp_path):
    versions, freed, _ = table
    save_adapter(make("lorta_qv", specs["mha"], seed=4), tmp_path / "a")
    bound = versions.admit(request(tmp_path / "a"), reserve=False)  # a load (preload): nobody uses it yet
    _, free_now = versions.retire_user(7)
    assert [v.engine_id for v in free_now] == [bound.lora_int_id]
    versions.discard(free_now[0])
    reloaded = versions.admit(request(tmp_path / "a", user_id=8), reserve=False)
    assert reloaded.lora_int_id != bound.lora_int_id and versions.user_of(reloaded.lora_int_id) == 8


def test_concurrent_first_requests_snapshot_once(table, specs, tmp_path):
    versions, _, validated = table
    save_adapter(make("bat", specs["mha"], seed=5), tmp_path / "a")
    results, barrier = [], threading.Barrier(8)

    def admit():
        barrier.wait()
        results.append(versions.admit(request(tmp_path / "a")).lora_int_id)

    threads = [threading.Thread(target=admit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(validated) == 1 and versions.live_versions() == 1


def test_bad_adapters_are_refused_naming_the_users_directory(table, specs, tmp_path):
    versions, _, _ = table
    save_adapter(make("lora", specs["mha"], seed=6), tmp_path / "bad")
    tensors = tmp_path / "bad" / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:64])
    with pytest.raises(AdapterError) as info:
        versions.admit(request(tmp_path / "bad"))
    assert str(tmp_path / "bad") in str(info.value) and str(versions.root) not in str(info.value)
    with pytest.raises(FileNotFoundError):
        versions.admit(request(tmp_path / "absent"))
    assert versions.live_versions() == 0 and not [p for p in versions.root.iterdir()], "nothing left behind"


def test_admission_reads_and_validates_off_the_event_loop(specs, tmp_path):
    """A slow adapter read/validation (here 1.5 s) must not stall the API process's event loop: other streams keep
    flowing while it runs. Drives the patched AsyncLLM.add_request with an engine stand-in whose validation is slow
    and finally refuses the adapter, so the original add_request is never reached."""
    import asyncio
    import time

    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM

    from tenfold.engine import vllm_compat

    vllm_compat.install()
    save_adapter(make("lora", specs["mha"], seed=9), tmp_path / "slow")

    def slow_refusal(path):
        time.sleep(1.5)
        raise AdapterError(f"{path}: refused after a slow read")

    class Stand:
        input_processor = type("P", (), {"_tenfold_check_path": staticmethod(slow_refusal)})()
        output_processor = type("O", (), {})()

    engine = AsyncLLM.__new__(AsyncLLM)
    engine.__dict__.update(input_processor=Stand.input_processor, output_processor=Stand.output_processor)

    async def scenario():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with pytest.raises(VLLMValidationError, match="refused after a slow read"):
            await engine.add_request("r", "prompt", None, lora_request=LoRARequest("slow", 3, str(tmp_path / "slow")))
        stop.set()
        await tick
        return gaps

    gaps = asyncio.run(scenario())
    assert sum(gaps) > 1.4 and max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
    engine._tenfold_versions.close()


def _engine_stand_in(validate, fail_loads: bool = False):
    """An AsyncLLM with the plugin's patches and an engine core that records which engine ids it was asked to
    load and free (and refuses loads when `fail_loads`, like a worker that cannot read a snapshot)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from tenfold.engine import vllm_compat

    vllm_compat.install()

    class Core:
        added, removed = [], []

        async def add_lora_async(self, lora_request):
            if fail_loads:
                raise RuntimeError("worker refused the adapter")
            self.added.append(lora_request.lora_int_id)
            return True

        async def remove_lora_async(self, lora_id):
            self.removed.append(lora_id)
            return True

        async def collective_rpc_async(self, method, timeout=None, args=(), kwargs=None):
            return [None]  # the workers' calls (an unload unpins the name): no worker here

        def shutdown(self, timeout=None):
            pass

    engine = AsyncLLM.__new__(AsyncLLM)
    engine.__dict__.update(input_processor=type("P", (), {"_tenfold_check_path": staticmethod(validate)})(),
                           output_processor=type("O", (), {})(), engine_core=Core())
    return engine


def test_unload_frees_the_id_it_deleted_when_a_load_raced_it(specs, tmp_path):
    """vLLM's unload waits on the name's lock; a load or resolution holding it may register the name under a new
    id meanwhile. The id the unload deleted must be the one freed, and an id the load replaced is freed too:
    afterwards no version of the name is left in the engine (found as 2 leaked versions by the soak test)."""
    import asyncio

    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    from tenfold.engine.patches.unload import _NameRegistry

    save_adapter(make("lora", specs["mha"], seed=11), tmp_path / "a")
    engine = _engine_stand_in(lambda path: load_adapter(path, specs["mha"]).validate(specs["mha"]))

    async def scenario(registered_at_start):
        models = OpenAIServingModels.__new__(OpenAIServingModels)
        models.__dict__.update(engine_client=engine, lora_resolver_lock={"a": asyncio.Lock()})
        models.lora_requests = _NameRegistry(engine, {})
        if registered_at_start is not None:  # registered by a request's resolution, outside the lock
            await engine.add_lora(LoRARequest("a", registered_at_start, str(tmp_path / "a")))
            models.lora_requests["a"] = LoRARequest("a", registered_at_start, str(tmp_path / "a"))
        lock = models.lora_resolver_lock["a"]
        await lock.acquire()  # a load of "a" holds the name's lock ...
        unload = asyncio.create_task(models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name="a")))
        await asyncio.sleep(0.05)  # ... while the unload starts and waits on it
        loaded = LoRARequest("a", 20 + (registered_at_start or 0), str(tmp_path / "a"))
        await engine.add_lora(loaded)
        models.lora_requests["a"] = loaded  # the load registers its id and releases the lock
        lock.release()
        result = await unload
        await asyncio.gather(*models.lora_requests._tasks)
        return result, loaded.lora_int_id

    for registered_at_start in (None, 4):
        result, loaded_id = asyncio.run(scenario(registered_at_start))
        assert "removed successfully" in result
        versions = engine._tenfold_versions
        assert versions.engine_ids_of(loaded_id) == [], "the id the unload deleted was never freed"
        if registered_at_start is not None:
            assert versions.engine_ids_of(registered_at_start) == [], "the id the load replaced was never freed"
    assert versions.live_versions() == 0
    assert sorted(engine.engine_core.removed) == sorted(engine.engine_core.added)
    versions.close()


def test_a_failed_load_leaves_no_version_behind(specs, tmp_path):
    """A load the workers refuse registers no name, so nothing would ever unload its id: the version admitted for
    it is freed with the failure, and the error reaches the caller."""
    import asyncio

    save_adapter(make("lora", specs["mha"], seed=12), tmp_path / "a")
    engine = _engine_stand_in(lambda path: load_adapter(path, specs["mha"]).validate(specs["mha"]), fail_loads=True)
    with pytest.raises(RuntimeError, match="worker refused"):
        asyncio.run(engine.add_lora(LoRARequest("a", 5, str(tmp_path / "a"))))
    versions = engine._tenfold_versions
    assert versions.live_versions() == 0 and not list(versions.root.iterdir())
    versions.close()


def test_a_refused_version_is_copied_and_checked_once(table, specs, tmp_path):
    """A flood of requests for one bad adapter: the first admission copies and checks it, the rest are refused from
    memory with the same message (and leave nothing on disk); a rewrite is a new version, checked anew."""
    versions, _, validated = table
    adapter = make("miss", specs["mha"], seed=13)
    next(iter(adapter.tensors().values())).data[0, 0] = float("inf")
    save_adapter(adapter, tmp_path / "bad")
    messages = set()
    for _ in range(20):
        with pytest.raises(AdapterError) as refused:
            versions.admit(request(tmp_path / "bad"))
        messages.add(str(refused.value))
    assert len(validated) == 1 and len(messages) == 1 and str(tmp_path / "bad") in messages.pop()
    assert not list(versions.root.iterdir()) and versions.live_versions() == 0
    import shutil

    shutil.rmtree(tmp_path / "bad")
    save_adapter(make("miss", specs["mha"], seed=14), tmp_path / "bad")
    assert versions.admit(request(tmp_path / "bad")).lora_int_id >= ENGINE_ID_BASE
    assert len(validated) == 2


def test_snapshots_are_removed_at_exit_and_stale_ones_at_start(specs, tmp_path):
    """A process that exits normally leaves no snapshot behind; one killed before it could clean up leaves its
    directory, which the next table removes (a live process's directory is left alone)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    save_adapter(make("lora", specs["mha"], seed=15), tmp_path / "a")
    script = (
        "import sys, time\n"
        "from vllm.lora.request import LoRARequest\n"
        "from tenfold.engine.versions import AdapterVersions\n"
        "versions = AdapterVersions(lambda path: None, lambda freed: None)\n"
        f"bound = versions.admit(LoRARequest('a', 1, {str(tmp_path / 'a')!r}))\n"
        "print(versions.root, flush=True)\n"
        "if sys.argv[1] == 'wait':\n"
        "    time.sleep(600)\n")
    normal = subprocess.run([sys.executable, "-c", script, "exit"], capture_output=True, text=True, check=True)
    assert not Path(normal.stdout.strip()).exists(), "removed at interpreter exit"
    killed = subprocess.Popen([sys.executable, "-c", script, "wait"], stdout=subprocess.PIPE, text=True)
    root = Path(killed.stdout.readline().strip())
    assert root.is_dir() and any(root.iterdir())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert root.is_dir(), "a killed process cannot clean up"
    mine = Path(tempfile.mkdtemp(prefix=f"tenfold-adapter-versions-{os.getpid()}-"))
    versions = AdapterVersions(lambda path: None, lambda freed: None)
    try:
        assert not root.exists(), "the dead process's snapshots are removed when the next table starts"
        assert mine.is_dir(), "a live process's directory is not touched"
    finally:
        versions.close()
        mine.rmdir()
    assert not versions.root.exists()


def test_a_file_linked_outside_the_adapter_is_refused_before_any_copy(table, specs, tmp_path):
    """A tensor file that links to a file elsewhere is never copied into a snapshot (nor validated, nor served)."""
    versions, _, validated = table
    elsewhere = save_adapter(make("miss", specs["mha"], seed=16), tmp_path / "elsewhere")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((elsewhere / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(elsewhere / "adapter_model.safetensors")
    for _ in range(3):
        with pytest.raises(AdapterError, match="outside the adapter's directory"):
            versions.admit(request(linked))
    assert validated == [] and not list(versions.root.iterdir()) and versions.live_versions() == 0
