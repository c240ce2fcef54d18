"""GenerateStream against an engine whose cumulative outputs share one growing token list (as vLLM's do): every token
reaches the client once, in order, even when the list grows while the stream waits for its consumer."""

from __future__ import annotations

import asyncio
import types

import pytest

pytest.importorskip("vllm", reason="the servicer builds vLLM SamplingParams")

from tenfold.server.grpc.servicer import TenfoldServicer, pb  # noqa: E402


class SharedListEngine:
    """Yields one cumulative output per step; `tokens` is the same list object in every output."""

    def __init__(self):
        self.tokens: list[int] = []
        self.steps = 0

    async def generate(self, prompt, params, request_id, lora_request=None):
        while len(self.tokens) < params.max_tokens:
            self.steps += 1
            self.tokens.append(100 + len(self.tokens))
            completion = types.SimpleNamespace(text="", token_ids=self.tokens, finish_reason="length")
            yield types.SimpleNamespace(outputs=[completion], prompt_token_ids=list(prompt["prompt_token_ids"]),
                                        finished=len(self.tokens) >= params.max_tokens)

    async def abort(self, request_id):
        pass


def test_stream_sends_every_token_once_when_the_shared_list_grows_meanwhile():
    engine = SharedListEngine()
    admin = types.SimpleNamespace(settings=types.SimpleNamespace(api_key=None, protect_all=False),
                                  state=types.SimpleNamespace(engine_client=engine))

    async def lora_request(name):
        return None

    admin.lora_request = lora_request
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                 sampling=pb.SamplingParameters(max_tokens=8, temperature=0.0))

    async def consume():
        received = []
        async for chunk in TenfoldServicer(admin).GenerateStream(request, context=None):
            received.append(list(chunk.token_ids))
            if len(engine.tokens) < 6 and len(received) % 2:
                engine.tokens.append(100 + len(engine.tokens))  # vLLM's output handler appends meanwhile
        return received

    received = asyncio.run(consume())
    assert [t for chunk in received for t in chunk] == list(range(100, 108)), received
