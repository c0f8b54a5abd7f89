"""The ingress's bounds before the models (serve/intake.py): bytes of bodies held, decode slots."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from ferray.serve_app.intake import Busy, Intake, memory_limit, resident_bytes


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


def test_large_images_decode_in_a_lane_of_their_own():
    from ferray.serve_app.intake import HEAVY_PIXELS

    started, go_on = threading.Event(), threading.Event()

    def slow():
        started.set()
        go_on.wait(10)
        return "photo"

    async def scenario():
        intake = Intake(held_bytes=100, decode_slots=2, wait_s=0.2)  # large images: 1 slot
        photo = asyncio.create_task(intake.decode(slow, pixels=HEAVY_PIXELS + 1))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Busy, match=r"all 1 decode slots for large images \(over 4,000,000 pixels\) are busy"):
            await intake.decode(lambda: "never", pixels=24_000_000)
        # the small faces most clients send are decoded at once meanwhile, in both of their slots
        faces = await asyncio.gather(*(intake.decode(lambda i=i: i, pixels=48 * 48) for i in range(4)))
        go_on.set()
        return faces, await photo

    assert asyncio.run(scenario()) == ([0, 1, 2, 3], "photo")


def test_large_images_decode_at_the_lowest_cpu_priority_and_faces_do_not():
    """The large images' lane runs its work in threads Linux schedules last (SCHED_IDLE, else nice
    19): the model replicas come first on a busy server. The small faces' lane is left as it was."""
    from ferray.serve_app.intake import HEAVY_PIXELS

    def priority():
        thread = threading.get_native_id()
        return os.sched_getscheduler(thread), os.getpriority(os.PRIO_PROCESS, thread)

    async def scenario():
        intake = Intake(held_bytes=100, decode_slots=2, wait_s=1)
        return await intake.decode(priority, pixels=HEAVY_PIXELS + 1), await intake.decode(priority, pixels=48 * 48)

    (policy, nice), small = asyncio.run(scenario())
    assert policy == os.SCHED_IDLE or nice == 19, (policy, nice)
    assert small == (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))


def streamed_request(chunks: list[bytes], content_type: str):
    """A Starlette request whose body arrives in `chunks`; the list of chunks the server pulled."""
    from starlette.requests import Request

    pulled, waiting = [], list(chunks)

    async def receive():
        body = waiting.pop(0) if waiting else b""
        pulled.append(body)
        return {"type": "http.request", "body": body, "more_body": bool(waiting)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode())],
    }
    return Request(scope, receive), pulled


def test_a_body_that_is_no_image_is_refused_at_its_first_bytes():
    from ferray.errors import InputError
    from ferray.faces import check_image_start
    from ferray.serve_app.intake import read_body

    junk, pulled = streamed_request([bytes(1 << 16)] * 100, "image/png")
    with pytest.raises(InputError, match=r"not an image this API reads \(first bytes 00 00") as refused:
        asyncio.run(read_body(junk, 10 << 20, 5.0, check_image_start))
    assert refused.value.status == 415 and len(pulled) == 1  # the other 99 chunks were never read

    png = b"\x89PNG\r\n\x1a\n" + bytes(1 << 16)
    image, pulled = streamed_request([png[:5], png[5:], bytes(10)], "image/png")  # the signature split
    assert asyncio.run(read_body(image, 10 << 20, 5.0, check_image_start)) == png + bytes(10)


def test_a_content_type_that_is_no_image_is_refused_before_the_body_is_read():
    from ferray.errors import InputError
    from ferray.serve_app.intake import raw_image_body

    assert raw_image_body(streamed_request([], "image/jpeg")[0])
    assert raw_image_body(streamed_request([], "application/octet-stream")[0])
    assert not raw_image_body(streamed_request([], "multipart/form-data; boundary=x")[0])
    with pytest.raises(InputError, match="content type 'text/plain' is not accepted") as refused:
        raw_image_body(streamed_request([b"hello"], "text/plain")[0])
    assert refused.value.status == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_every_accepted_format_is_known_by_its_first_bytes_and_its_size_by_its_header(fmt):
    import io

    import numpy as np
    from PIL import Image

    from ferray.faces import SIGNATURE_BYTES, check_image_start, declared_pixels, format_of_start

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 70), np.uint8)).save(buffer, format=fmt)
    data = buffer.getvalue()
    assert format_of_start(data[:SIGNATURE_BYTES]) == fmt
    check_image_start(data[:SIGNATURE_BYTES])  # no error
    assert declared_pixels(data) == 30 * 70
    assert declared_pixels(b"GIF89a" + bytes(30)) == 0  # unreadable: the decode stage names why


def test_past_its_memory_limit_the_ingress_refuses_new_requests_until_it_falls():
    used = [900 * 2**20]

    async def scenario():
        intake = Intake(held_bytes=100, decode_slots=1, wait_s=0.2, memory_bytes=1000 * 2**20, rss=lambda: used[0])
        async with intake.holding(10):  # under the limit: let in
            pass
        used[0] = 1200 * 2**20
        with pytest.raises(Busy, match=r"uses 1,200 MB of memory, over its limit of 1,000 MB \(intake.max_memory_mb\)"):
            async with intake.holding(10):
                pass
        used[0] = 800 * 2**20
        async with intake.holding(10):  # fallen back: let in again
            pass

    asyncio.run(scenario())


def test_the_memory_limit_by_construction_counts_bodies_and_every_decode_slot():
    assert resident_bytes() > 10 * 2**20  # this interpreter, with torch imported by the app's modules
    base, held, pixels = 500 * 2**20, 64 * 2**20, 40_000_000
    two = memory_limit(base, held, 2, pixels)  # 2 light slots and 1 heavy
    assert two - base - held == 3 * pixels * 8 + 256 * 2**20
    assert memory_limit(base, held, 4, pixels) - two == 3 * pixels * 8  # 4 + 2 slots: three more


def test_a_negative_memory_limit_is_refused_naming_it():
    from ferray.errors import ConfigError
    from ferray.serve_app.settings import parse_settings

    with pytest.raises(ConfigError, match="intake.max_memory_mb is -1"):
        parse_settings({"intake": {"max_memory_mb": -1}})
    assert parse_settings({"intake": {"max_memory_mb": 512}}).intake.max_memory_mb == 512
