"""The servicer's read-ahead: every message in order, the next read under way while one is handled."""

from __future__ import annotations

import asyncio
import contextlib

from canvaswatch.server.transport.servicer import _read_ahead


def test_the_next_read_starts_before_the_current_message_is_handled_and_order_is_kept():
    events: list[str] = []

    async def source():
        for number in range(3):
            events.append(f"read {number}")
            await asyncio.sleep(0)
            yield number

    async def consume():
        got = []
        async with contextlib.aclosing(_read_ahead(source())) as messages:
            async for message in messages:
                events.append(f"handle {message}")  # synchronous, as a top-k step is
                got.append(message)
        return got

    assert asyncio.run(consume()) == [0, 1, 2]
    assert events.index("read 1") < events.index("handle 0")
    assert events.index("read 2") < events.index("handle 1")


def test_a_consumer_that_stops_early_cancels_the_read_it_no_longer_needs():
    state = {"cancelled": False}

    async def source():
        yield "first"
        try:
            await asyncio.sleep(3600)  # a client that sends nothing more
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        yield "never"

    async def consume():
        async with contextlib.aclosing(_read_ahead(source())) as messages:
            async for message in messages:
                assert message == "first"
                break  # e.g. the handler refused the message and the stream is aborted
        await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(consume(), 5))
    assert state["cancelled"]
