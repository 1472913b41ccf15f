"""AsyncClient: the same operations as Client, awaited, over REST and gRPC."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from amserve_client import AsyncClient, Client, InvalidArgument, NotFound, Stored
from tests.client.conftest import address

pytestmark = pytest.mark.parametrize("server", ["embedded"], indirect=True)  # the API suite's server

PROMPT = "The capital of France is"


def test_async_operations_answer_as_the_blocking_client(server, transport, bank_name):
    patterns = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    queries = (patterns + np.float32(0.3)).astype(np.float32)
    mask = np.arange(8) < 4

    async def scenario():
        async with AsyncClient(address(server, transport), transport=transport) as sdk:
            created = await sdk.create_bank(bank_name, "modern", 8, {"beta": 2.0})
            stored = await sdk.store(bank_name, patterns, ids=[f"p{i}" for i in range(5)])
            listed = await sdk.list_banks()
            info = await sdk.get_bank(bank_name)
            # concurrent calls share the client
            retrieved = await asyncio.gather(*(sdk.retrieve(bank_name, q, steps=4, trace=True) for q in queries))
            completed = await sdk.complete(bank_name, queries, np.tile(mask, (5, 1)))
            image = await sdk.complete_image(np.full((8, 8), 0.5), np.eye(8, dtype=bool), steps=2)
            models = await sdk.models()
            generation = await sdk.generate(PROMPT, max_tokens=5, temperature=0)
            stream = await sdk.generate(PROMPT, stream=True, max_tokens=5, temperature=0)
            chunks = [chunk async for chunk in stream]
            with pytest.raises(InvalidArgument):
                await sdk.generate(PROMPT, stream=True, max_tokens=0)
            version = await sdk.delete_pattern(bank_name, "p0")
            await sdk.delete_bank(bank_name)
            with pytest.raises(NotFound):
                await sdk.get_bank(bank_name)
            return (created, stored, listed, info, retrieved, completed, image, models, generation, chunks, version)

    created, stored, listed, info, retrieved, completed, image, models, generation, chunks, version = (
        asyncio.run(scenario()))
    assert created.name == bank_name and created.count == 0
    assert stored == Stored(ids=[f"p{i}" for i in range(5)], count=5, version=1)
    assert info in listed and info.count == 5
    assert version == 2

    with Client(address(server, transport), transport=transport) as blocking:
        blocking.create_bank(bank_name, "modern", 8, {"beta": 2.0})
        blocking.store(bank_name, patterns, ids=[f"p{i}" for i in range(5)])
        expected = blocking.retrieve(bank_name, queries, steps=4, trace=True)
        expected_completed = blocking.complete(bank_name, queries, np.tile(mask, (5, 1)))
        expected_image = blocking.complete_image(np.full((8, 8), 0.5), np.eye(8, dtype=bool), steps=2)
        assert [(m.id, m.task) for m in models] == [(m.id, m.task) for m in blocking.models()]
        assert generation == blocking.generate(PROMPT, max_tokens=5, temperature=0)
        blocking.delete_bank(bank_name)
    # the concurrent retrieves ran batched together: equal up to float32 rounding
    for [got], want in zip(retrieved, expected, strict=True):
        np.testing.assert_allclose(got.state, want.state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.trace, want.trace, rtol=1e-5)
        assert (got.steps, got.nearest.id) == (want.steps, want.nearest.id)
    for got, want in zip(completed, expected_completed, strict=True):
        np.testing.assert_array_equal(got.state, want.state)
    np.testing.assert_array_equal(image.image, expected_image.image)
    assert "".join(c.text for c in chunks) == generation.text
    assert [c.token_id for c in chunks[:-1]] == generation.tokens and chunks[-1].usage == generation.usage
