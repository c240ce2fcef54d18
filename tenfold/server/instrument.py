"""Instrumentation of one engine client (`tenfold serve`'s own): its generate/add_lora/remove_lora wrapped as
instance attributes, nothing global, with the per-request and per-load hooks behind tenfold's metrics."""

from __future__ import annotations

import asyncio


def instrument_engine_client(engine_client, on_request, on_load, on_unload) -> None:
    """Wrap this client's generate/add_lora/remove_lora (instance attributes, nothing global) with callbacks:
    on_request(lora_request, sampling_params) -> tracker with settle(failed)/output(o)/failed()/done();
    on_load(lora_request) -> tracker with done(ok); on_unload(lora_id). The trackers' settle and done(True) read
    the adapter's recorded facts (a stat of its files): they run off the event loop."""
    generate, add_lora, remove_lora = engine_client.generate, engine_client.add_lora, engine_client.remove_lora

    async def instrumented_generate(prompt, sampling_params, request_id, *args, lora_request=None, **kwargs):
        tracker = on_request(lora_request, sampling_params)
        settled = False
        try:
            async for output in generate(prompt, sampling_params, request_id, *args, lora_request=lora_request,
                                         **kwargs):
                if not settled:  # admitted: its adapter version was validated
                    await asyncio.to_thread(tracker.settle)
                    settled = True
                tracker.output(output)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            if not settled:
                await asyncio.to_thread(tracker.settle, True)
                settled = True
            tracker.failed()
            raise
        finally:
            tracker.done()

    async def instrumented_add_lora(lora_request):
        tracker = on_load(lora_request)
        try:
            loaded = await add_lora(lora_request)
        except BaseException:
            tracker.done(False)
            raise
        await asyncio.to_thread(tracker.done, True)
        return loaded

    async def instrumented_remove_lora(lora_id):
        removed = await remove_lora(lora_id)
        on_unload(lora_id)
        return removed

    engine_client.generate = instrumented_generate
    engine_client.add_lora = instrumented_add_lora
    engine_client.remove_lora = instrumented_remove_lora
