"""What a request may hold in the ingress before the models see it: its body, read against a size
limit and a deadline; the bytes of all bodies held at once; and the slots of the decode stage
(decoding images and finding faces is CPU work, outside the models' queues).

A request that finds no room waits at most `wait_s`, then is answered 503 with Retry-After (Busy),
as overload is at the models: a burst of large or decode-heavy requests cannot hold the ingress's
memory or cores, nor keep other clients' requests waiting behind it for long.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Request

from ferray.errors import InputError, LimitExceeded
from ferray.faces import SIGNATURE_BYTES


class Busy(Exception):
    """No room in the ingress now: answered 503 with Retry-After."""


def decode_threads(configured: int) -> int:
    """The decode stage's slots: as configured, or (0) this machine's cores."""
    return configured if configured > 0 else max(1, len(os.sched_getaffinity(0)))


# Images declaring more pixels than this (12-megapixel phone photos; a 1080p frame is under it) are
# decoded in a lane of their own with half the slots: large photos, whose decoding and face search
# take seconds, cannot hold every core while the small faces most clients send wait behind them.
# That lane's threads also run at the lowest CPU priority (background_thread): on a busy server the
# model replicas come first and a large photo takes the cores they leave (or waits its wait_s and is
# answered 503); on an idle one it runs at full speed.
HEAVY_PIXELS = 4_000_000


def background_thread() -> None:
    """Put the calling thread at the lowest CPU priority: SCHED_IDLE, else nice 19 (Linux schedules
    threads, not processes; threads it starts afterwards inherit it)."""
    import threading

    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, thread, 19)
        except (AttributeError, OSError):
            pass


def heavy_slots(decode_slots: int) -> int:
    """The large images' lane: half the decode slots, at least one."""
    return max(1, decode_slots // 2)


class _Lane:
    """Slots of the decode stage: a semaphore for waiting on one, and the threads that run in them
    (`background`: at the lowest CPU priority)."""

    def __init__(self, slots: int, what: str, background: bool = False):
        self.slots, self.what = slots, what
        self.free = asyncio.Semaphore(slots)
        self.pool = ThreadPoolExecutor(
            slots, thread_name_prefix="ferray-decode", initializer=background_thread if background else None
        )


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# What decoding one image may take at most, per pixel of max_image_pixels: the file's RGB(A) decode,
# its gray copy and the detector's working copies (16-bit images are scaled with integers).
DECODE_BYTES_PER_PIXEL = 8
MEMORY_SLACK = 256 * 1024 * 1024  # allocator fragmentation, the web page, the event loop's buffers


def memory_limit(baseline: int, held_bytes: int, decode_slots: int, image_pixels: int) -> int:
    """The ingress's memory bound by construction: what it holds at rest, plus the bodies it may
    hold, plus every decode slot (light and heavy lanes) decoding an image at the pixel limit."""
    slots = decode_slots + heavy_slots(decode_slots)
    return baseline + held_bytes + slots * image_pixels * DECODE_BYTES_PER_PIXEL + MEMORY_SLACK


class Intake:
    """The ingress's bounds on bodies held and images being decoded (one per ingress replica), and
    a memory limit: past `memory_bytes` of resident memory (0: none) a new request is refused (503)
    until the memory falls, whatever grew it (the bounds above are by construction; this is the
    check that they held)."""

    def __init__(self, held_bytes: int, decode_slots: int, wait_s: float, memory_bytes: int = 0, rss=resident_bytes):
        self.held_bytes, self.wait_s = held_bytes, wait_s
        self.memory_bytes, self._rss = memory_bytes, rss
        self._held = 0
        self._room = asyncio.Condition()
        self._light = _Lane(decode_slots, "decode slots")
        self._heavy = _Lane(
            heavy_slots(decode_slots), f"decode slots for large images (over {HEAVY_PIXELS:,} pixels)", background=True
        )

    @asynccontextmanager
    async def holding(self, size: int):
        """Room for a body of `size` bytes among those held, for as long as the request is answered."""
        if self.memory_bytes and (used := self._rss()) > self.memory_bytes:
            raise Busy(
                f"the server's ingress uses {used / 2**20:,.0f} MB of memory, over its limit of "
                f"{self.memory_bytes / 2**20:,.0f} MB (intake.max_memory_mb); retry shortly"
            )
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self._held + size <= self.held_bytes), self.wait_s)
            except TimeoutError:
                raise Busy(
                    f"the server holds {self._held:,} bytes of request bodies (its limit: {self.held_bytes:,}); "
                    "retry shortly"
                ) from None
            self._held += size
        try:
            yield
        finally:
            async with self._room:
                self._held -= size
                self._room.notify_all()

    async def decode(self, work: Callable, *args, pixels: int = 0):
        """`work(*args)` (decoding, detection, parsing) in one of the decode stage's threads: in the
        large images' lane where the request's images declare over HEAVY_PIXELS in all."""
        lane = self._heavy if pixels > HEAVY_PIXELS else self._light
        try:
            await asyncio.wait_for(lane.free.acquire(), self.wait_s)
        except TimeoutError:
            raise Busy(f"all {lane.slots} {lane.what} are busy; retry shortly") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(lane.pool, work, *args)
        finally:
            lane.free.release()


def content_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def body_size_to_hold(request: Request, limit: int) -> int:
    """The bytes a request's body may take: its declared length, or (chunked) the limit."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() and int(declared) <= limit else limit


async def read_body(
    request: Request, limit: int, deadline: float, check_start: Callable[[bytes], None] | None = None
) -> bytes:
    """The request body, refused as soon as it passes `limit` (never buffered whole) or when it has
    not arrived whole within `deadline` seconds (408); `check_start` sees its first SIGNATURE_BYTES
    as soon as they arrive (a body that is no image is refused before the rest is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise LimitExceeded(
            f"request body of {int(declared):,} bytes is over the limit of {limit:,}",
            "max_body_bytes",
            int(declared),
            limit,
        )
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # the rest is never read: the value is what had arrived when it passed
                    raise LimitExceeded(
                        f"request body is over the limit of {limit:,} bytes ({size:,} read when refused)",
                        "max_body_bytes",
                        size,
                        limit,
                    )
                chunks.append(chunk)
                if check_start is not None and size >= SIGNATURE_BYTES:
                    check_start(b"".join(chunks)[:SIGNATURE_BYTES])
                    check_start = None
    except TimeoutError:
        raise InputError(
            f"request body not received within {deadline:g} s ({size:,} bytes had arrived); send it faster",
            status=408,
        ) from None
    return b"".join(chunks)


@asynccontextmanager
async def received(
    intake: Intake, request: Request, limit: int, deadline: float, check_start: Callable[[bytes], None] | None = None
):
    """The request's body, read within its limits while the ingress has room to hold it (until the
    request is answered)."""
    async with intake.holding(body_size_to_hold(request, limit)):
        yield await read_body(request, limit, deadline, check_start)


def raw_image_body(request: Request) -> bool:
    """Whether the body is one raw image (image/*, application/octet-stream) rather than a multipart
    form; any other content type is refused (415) before the body is read."""
    content_type = content_type_of(request)
    if content_type == "multipart/form-data":
        return False
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return True
    raise InputError(
        f"content type {content_type or '(none)'!r} is not accepted: send the image as the raw "
        "body (image/png, image/jpeg, ...) or as multipart/form-data",
        status=415,
    )


async def images_of(request: Request, body: bytes, many: bool, max_images: int) -> list[tuple[str, bytes]]:
    """Images of a raw body (image/* or application/octet-stream) or a multipart form."""
    if not raw_image_body(request):

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images + 1)
        except Exception as error:
            if "Too many files" in str(error):  # Starlette stops at the file past max_files
                raise LimitExceeded(
                    f"at least {max_images + 2} images in one request is over the limit of {max_images}",
                    "max_batch_images",
                    max_images + 2,
                    max_images,
                ) from None
            raise InputError(f"malformed multipart body ({error})") from None
        files = [(key, item) for key, item in form.multi_items() if hasattr(item, "read")]
        images = [(item.filename or key, await item.read()) for key, item in files]
        if not images:
            raise InputError("multipart body has no file part; send the image as a file field", status=422)
    else:
        images = [("body", body)]
    if not many and len(images) > 1:
        raise InputError(f"{len(images)} files sent to /predict; use /predict/batch for several", status=422)
    if len(images) > max_images:
        raise LimitExceeded(
            f"{len(images)} images in one request is over the limit of {max_images}",
            "max_batch_images",
            len(images),
            max_images,
        )
    return images
