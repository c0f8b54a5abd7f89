"""The ingress's bounds before the models (serve/intake.py): bytes of bodies held, decode slots."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ferray.serve_app.intake import Busy, Intake


def test_bodies_beyond_the_held_bytes_wait_briefly_then_get_busy():
    async def scenario():
        intake = Intake(held_bytes=100, decode_slots=1, wait_s=0.2)
        async with intake.holding(60):
            t0 = time.monotonic()
            with pytest.raises(Busy, match="holds 60 bytes of request bodies"):
                async with intake.holding(60):
                    pass
            waited = time.monotonic() - t0
            async with intake.holding(40):  # what still fits is let in at once
                pass

        async def release_soon(held):
            await asyncio.sleep(0.05)
            held.set()

        # a body that waits for room gets it when another request is answered within wait_s
        first_done = asyncio.Event()

        async def first():
            async with intake.holding(80):
                await first_done.wait()

        task = asyncio.create_task(first())
        await asyncio.sleep(0.01)
        asyncio.create_task(release_soon(first_done))
        async with intake.holding(80):
            pass
        await task
        return waited

    assert 0.15 < asyncio.run(scenario()) < 2


def test_decoding_beyond_its_slots_waits_briefly_then_gets_busy():
    started, go_on = threading.Event(), threading.Event()

    def slow():
        started.set()
        go_on.wait(10)
        return "decoded"

    async def scenario():
        intake = Intake(held_bytes=100, decode_slots=1, wait_s=0.2)
        running = asyncio.create_task(intake.decode(slow))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="all 1 decode slots are busy"):
            await intake.decode(lambda: "never")
        go_on.set()
        assert await running == "decoded"
        return await intake.decode(lambda x: x * 2, 21)  # the slot is free again

    assert asyncio.run(scenario()) == 42
