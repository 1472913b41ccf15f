"""Who may start a generation: a keyed tenant at most `max_streams_per_tenant` at once; on an open
service (no keys, every caller the tenant None) only the backend's own bounded queue admits."""

from __future__ import annotations

import asyncio

import pytest

from service.api import schemas
from service.api.operations import Limits, Operations
from service.errors import TooManyRequests


class Streaming:
    """A backend whose generations each yield one token and then wait until released."""

    name = "fake"

    def __init__(self):
        self.release = asyncio.Event()

    async def generate(self, prompt, params, deadline):
        async def events():
            yield {"type": "token", "token_id": 1, "text": "x", "logprobs": None}
            await self.release.wait()
            yield {"type": "finish", "finish_reason": "length", "text": "", "error": None,
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return events()


def request() -> schemas.GenerateRequest:
    return schemas.GenerateRequest(prompt="hi", max_tokens=1)


@pytest.mark.parametrize("tenant, admitted", [("acme", 2), (None, 5)])
def test_keyed_tenants_are_capped_and_an_open_service_is_not(tenant, admitted):
    async def scenario():
        backend = Streaming()
        ops = Operations(backend, Limits(max_streams_per_tenant=2))
        started, refused = [], 0
        for _ in range(5):
            try:
                started.append(await ops.start_generation(tenant, request()))
            except TooManyRequests:
                refused += 1
        other = await ops.start_generation("globex", request())  # another tenant is not held back by acme
        backend.release.set()
        for stream in [*started, other]:
            async for _ in stream:
                pass
        again = await ops.start_generation(tenant, request())  # slots come back when streams end
        await again.aclose()
        return len(started), refused
    assert asyncio.run(scenario()) == (admitted, 5 - admitted)
