"""What the server says about adapters (listings, /metrics, request labels) comes from facts recorded when the
adapter was validated, looked up off the event loop, never by loading it; without the key no server path is shown.
In-process, on stand-ins for the engine client and vLLM's name registry."""

from __future__ import annotations

import asyncio
import random
import threading
import types

import pytest

pytest.importorskip("prometheus_client")

from tenfold.engine.loader import AdapterFacts  # noqa: E402
from tenfold.server.adapter_admin import PENDING, AdapterAdmin, ServeSettings  # noqa: E402


class Recorded:
    """facts_of: the recorded facts of some paths (None for the others), and which threads asked."""

    def __init__(self, facts: dict):
        self.facts = facts
        self.threads: list[int] = []

    def __call__(self, path):
        self.threads.append(threading.get_ident())
        return self.facts.get(path)


def random_registry(rng):
    """Three adapters under random names and paths: two validated (recorded facts), one not yet."""
    names = [f"tenant{rng.randrange(10**6)}-{i}" for i in range(3)]
    loras = {n: types.SimpleNamespace(lora_name=n, lora_path=f"/srv/adapters/{n}", lora_int_id=i + 1)
             for i, n in enumerate(names)}
    facts = {loras[n].lora_path: AdapterFacts(family=family, rank=rng.randrange(1, 64), params=rng.randrange(10**6),
                                               nbytes=rng.randrange(10**7), worker_bytes=rng.randrange(10**7))
             for n, family in zip(names[:2], ("lorta", "miss"))}
    return names, loras, facts


def admin_with(loras, facts_of, pinned=()):
    residency = {"adapters": {name: {"tiers": ["host"]} for name in list(loras)[:1]}, "pinned": list(pinned),
                 "entries": [], "exits": [], "device_slots": 4, "host_capacity": 8}

    async def collective_rpc(method, args=()):
        assert method == "tenfold_residency"
        return [residency]

    state = types.SimpleNamespace(openai_serving_models=types.SimpleNamespace(lora_requests=loras),
                                  engine_client=types.SimpleNamespace(collective_rpc=collective_rpc))
    return AdapterAdmin(state, ServeSettings(api_key="k", protect_all=False, adapter_root=None), facts_of)


def test_listing_reads_recorded_facts_off_the_event_loop_and_paths_only_for_admins():
    rng = random.Random()
    names, loras, facts = random_registry(rng)
    facts_of = Recorded(facts)
    admin = admin_with(loras, facts_of)

    async def both():
        return threading.get_ident(), await admin.list(with_paths=False), await admin.list(with_paths=True)

    loop_thread, anonymous, keyed = asyncio.run(both())
    assert facts_of.threads and loop_thread not in facts_of.threads
    for cards, with_paths in ((anonymous, False), (keyed, True)):
        by_name = {c["name"]: c for c in cards}
        assert set(by_name) == set(names)
        for name in names:
            recorded = facts.get(loras[name].lora_path)
            card = by_name[name]
            assert card["family"] == (recorded.family if recorded else PENDING)
            if recorded:
                assert (card["rank"], card["params"], card["bytes"]) == (recorded.rank, recorded.params,
                                                                         recorded.nbytes)
            else:
                assert "rank" not in card
            assert ("path" in card) == with_paths
    assert "/srv/" not in repr(anonymous)


def test_scrape_labels_come_from_recorded_facts_off_the_event_loop():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tenfold.server import metrics

    rng = random.Random()
    names, loras, facts = random_registry(rng)
    facts_of = Recorded(facts)
    tracker = metrics.ResidencyTracker(admin_with(loras, facts_of))

    async def refresh():
        await tracker.refresh()
        return threading.get_ident()

    loop_thread = asyncio.run(refresh())
    assert facts_of.threads and loop_thread not in facts_of.threads
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest().decode()) for s in family.samples}
    held = names[0]
    family = facts[loras[held].lora_path].family
    assert samples[("tenfold_adapter_resident", (("adapter", held), ("family", family), ("tier", "host")))] == 1
    assert samples[("tenfold_adapter_resident_bytes", (("adapter", held), ("family", family), ("tier", "host")))] == (
        facts[loras[held].lora_path].nbytes)
    assert samples[("tenfold_adapter_pinned", (("adapter", names[2]), ("family", PENDING)))] == 0
    registered_bytes = sum(f.nbytes for f in facts.values())
    assert samples[("tenfold_resident_adapter_bytes", (("tier", "registered"),))] == registered_bytes


@pytest.mark.parametrize("fails", [False, True])
def test_request_labels_are_settled_after_admission_off_the_event_loop(fails):
    """The label is read once the engine has answered (admission validated the adapter by then): facts_of is not
    asked before generate began, nor on the event loop. A request whose adapter has no recorded facts and failed is
    labelled `invalid`."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from tenfold.server import metrics
    from tenfold.server.instrument import instrument_engine_client

    rng = random.Random()
    names, loras, facts = random_registry(rng)
    lora = loras[names[2] if fails else names[1]]
    events = []

    def facts_of(path):
        events.append(("facts", threading.get_ident()))
        return facts.get(path)

    class Client:
        async def generate(self, prompt, params, request_id, lora_request=None):
            events.append(("generate", threading.get_ident()))
            if fails:
                raise ValueError("refused at admission")
            completion = types.SimpleNamespace(token_ids=[rng.randrange(100)])
            yield types.SimpleNamespace(prompt_token_ids=[1, 2], outputs=[completion], finished=True)

        async def add_lora(self, lora_request):
            return True

        async def remove_lora(self, lora_id):
            return True

    client = Client()
    instrument_engine_client(client, on_request=lambda lr, p: metrics.RequestTracker(lr, facts_of, True),
                             on_load=lambda lr: metrics.LoadTracker(lr, facts_of), on_unload=metrics.note_unload)
    family = "invalid" if fails else facts[lora.lora_path].family
    before = metrics.REQUESTS.labels(lora.lora_name, family)._value.get()

    async def run():
        try:
            async for _ in client.generate({"prompt": "x"}, SamplingParams(output_kind=RequestOutputKind.DELTA),
                                           "r1", lora_request=lora):
                pass
        except ValueError:
            assert fails
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert [kind for kind, _ in events] == ["generate", "facts"]
    assert events[1][1] != loop_thread
    assert metrics.REQUESTS.labels(lora.lora_name, family)._value.get() == before + 1
    assert metrics.ERRORS.labels(lora.lora_name, family)._value.get() == (1 if fails else 0)
