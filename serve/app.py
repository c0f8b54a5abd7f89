"""The ferray ensemble as a Ray Serve application.

    HTTP -> Ingress (FastAPI: limits, decoding, face detection, fusion)
              '-> Ensemble (Member: every answering member of the set, the SR generator x2 if one
                  reads SR faces)   fused layout (the default): the ingress merges concurrent
                  requests (@serve.batch) into one call
              |-> ModelA  (Member "a": Model A on the 48x48 faces, @serve.batch)     split layout
              '-> ModelB  (Member "b": SR generator x2 then Model B, @serve.batch)   (members a, b)

The fused layout serves any set of any bundle. In the split layout A and B run concurrently for every
request. The fusion is a weighted mean of 7-vectors, so it runs in the ingress: a deployment of its
own would add a hop and compute nothing. The SR generator and the members that read its faces share
one deployment: the generator is a small fraction of their time per face (bench/serve_load.py prints
both), and a split would ship every 96x96 face between replicas.

Entry point for `serve run serve/config.yaml` / `serve deploy` and for `ferray serve`: `build(args)`,
args being the application's `args` mapping of serve/config.yaml (see serve/settings.py).
"""

# No `from __future__ import annotations`: Serve rebuilds the ingress's methods with only the globals
# their code names, so FastAPI could not resolve an annotation such as `request: Request` given as a
# string (the parameter was then read as a query field). Annotations are objects here.
import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from .intake import (
    Busy,
    Intake,
    content_type_of,
    decode_threads,
    images_of,
    memory_limit,
    raw_image_body,
    received,
    resident_bytes,
)
from .settings import ReplicaSettings, ServeSettings, parse_settings

logger = logging.getLogger("ferray.serve")
PAGE = Path(__file__).with_name("static") / "index.html"
READY_CACHE_S = 2.0  # /readyz answers from a probe at most this old
GROUPS_IN_FLIGHT = 2  # fused layout: merged groups being answered at once (each in one part per replica)
# A call that found no replica to run it is retried on another; one whose replica died running it is
# not (a request that kills replicas, by memory say, must not take two more down with it).
NOT_RUN = (ActorUnavailableError, DeploymentUnavailableError, ReplicaUnavailableError)


class MemberUnavailable(Exception):
    pass


# ------------------------------------------------------------------------------------------ members
@serve.deployment
class Member:
    """Members of the ensemble behind a batching queue: one ("a"; "b": the SR generator, then Model B)
    in the split layout, or in the fused layout every answering member in one replica, whose answer
    per face is their probabilities side by side, in `members`' order (7 values each)."""

    def __init__(self, bundle: str, members: list[str], settings: dict):
        import torch

        from ferray.bundle import load_bundle

        replica = ReplicaSettings(**settings)
        torch.set_num_threads(replica.threads)
        ensemble, _ = load_bundle(bundle, members=tuple(members), int8=replica.int8)
        self._forward = lambda faces: torch.cat(list(ensemble.member_probs(faces).values()), 1)
        # Make what inference runs (a frozen bf16 copy on bf16 CPUs; int8: every batch shape compiled)
        # here, not in a request.
        for name in members:
            ensemble.warm_up(name)
        which = "+".join(members)
        self.predict.set_max_batch_size(replica.max_batch_size)
        self.predict.set_batch_wait_timeout_s(replica.batch_wait_timeout_s)
        self.which, self.chunk_faces = which, replica.chunk_faces
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"ferray-{which}")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # replaced from config in __init__
    async def predict(self, requests: list[np.ndarray]) -> list[np.ndarray | str]:
        """Each request is (n_i, 48, 48) uint8 faces; all are run as one batch and split back."""
        return await self.predict_group(requests)

    async def predict_group(self, requests: list[np.ndarray]) -> list[np.ndarray | str]:
        """Requests already merged (by predict's batching, or by the fused layout's ingress), run as one batch."""
        # torch releases the GIL: run it off the event loop so the next batch queues meanwhile, one
        # batch at a time: two at once on a replica's one thread only made each slower (the fused
        # ingress keeps two groups in flight, so the next one is here, waiting, when a batch ends)
        return await asyncio.get_running_loop().run_in_executor(self._compute, self.run_requests, requests)

    def run_requests(self, requests: list[np.ndarray]) -> list[np.ndarray | str]:
        """Every request's probabilities, in one forward; if that fails, each request alone, so that a
        request the model cannot take fails by itself (its entry is then the error, as text) and the
        others of its batch are answered."""
        sizes = [len(faces) for faces in requests]
        try:
            return np.split(self._run(np.concatenate(requests)), np.cumsum(sizes)[:-1])
        except Exception:  # noqa: BLE001 - which request it was is found below
            answers = []
            for faces in requests:
                try:
                    answers.append(self._run(faces))
                except Exception:  # noqa: BLE001 - answered as that request's failure
                    # the client gets an id to quote, never the exception's text (which can name the
                    # server's files and code); the log has both
                    error_id = uuid.uuid4().hex[:12]
                    logger.exception("member(s) %s failed on one request (error id %s)", self.which, error_id)
                    answers.append(f"error id {error_id}")
            return answers

    def _run(self, faces: np.ndarray) -> np.ndarray:
        """The batch in chunks of at most chunk_faces faces: the memory a batch takes stays bounded
        whatever the requests it merged (the SR generator upscales every face of a chunk at once)."""
        import torch

        chunks = [faces[i : i + self.chunk_faces] for i in range(0, len(faces), self.chunk_faces)]
        return np.concatenate([self._forward(torch.from_numpy(chunk)).numpy() for chunk in chunks])

    async def ready(self) -> bool:
        """A tiny forward: loaded and answering."""
        await asyncio.get_running_loop().run_in_executor(None, self._run, np.zeros((1, 48, 48), np.uint8))
        return True


async def _awaited(response):
    return await response


# ------------------------------------------------------------------------------------------ ingress
api = FastAPI(
    title="ferray",
    description="Facial-expression recognition: an ensemble of CNNs (Model A: an Xception-style CNN on 48x48 "
    "faces; Model B: a ResNet on faces super-resolved 2x; ...), fused by a weighted mean of probabilities.",
    version="1",
)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, model_a, model_b, settings: dict):
        from ferray.bundle import read_bundle_card
        from ferray.bundle.load import answering_members, fusion_rule
        from ferray.faces import Limits

        self.settings = parse_settings(settings)
        self.card = read_bundle_card(self.settings.bundle)
        # the members that answer, in the fused replica's order, and the weights and temperature of their set
        self.answering = answering_members(self.card, self.settings.members)
        self.rule = fusion_rule(self.card, self.answering)
        self.limits = Limits(
            self.settings.max_body_bytes,
            self.settings.max_image_pixels,
            self.settings.max_request_pixels,
            self.settings.max_faces_per_request,
        )
        # fused layout: one deployment answers for every member; split: A and B apart (B None: A alone)
        self.members = {"ensemble": model_a} if self.settings.layout == "fused" else {"a": model_a, "b": model_b}
        # The fused layout merges requests here, before the hop: Serve's router hands a busy replica
        # about one request at a time, so batches formed at the replica held 1-2 requests, and one
        # call per merged group also pays one hop for many requests (docs/benchmarks.md). A group is
        # sent in one part per replica (_group_call), and two groups are in flight: each replica has
        # its next part waiting while it computes. The router spreads the parts only because a replica
        # admits two calls (ensemble.max_ongoing_requests: 2); admitting 32, one replica often held
        # both groups while the other idled (their CPU per request unequal: docs/benchmarks.md).
        fused = self.settings.ensemble
        self._replicas = fused.max_replicas
        in_flight = GROUPS_IN_FLIGHT * fused.max_batch_size
        self._waiting = 0
        self._waiting_limit = float("inf") if fused.max_queued_requests == -1 else in_flight + fused.max_queued_requests
        self._grouped = serve.batch(
            max_batch_size=fused.max_batch_size,
            batch_wait_timeout_s=fused.batch_wait_timeout_s,
            max_concurrent_batches=GROUPS_IN_FLIGHT,
        )(self._group_call)
        self.page = PAGE.read_text()
        intake = self.settings.intake
        slots = decode_threads(intake.decode_slots)
        limit = intake.max_memory_mb * 2**20 or memory_limit(
            resident_bytes(), intake.max_held_body_bytes, slots, self.settings.max_image_pixels
        )
        self.intake = Intake(intake.max_held_body_bytes, slots, intake.wait_s, memory_bytes=limit)
        self._ready_answer: tuple[float, bool, dict] | None = None  # (when, ready, each member's state)
        self._ready_probe: asyncio.Future | None = None

    # -------------------------------------------------------------------------------- plumbing
    async def _member(self, which: str, faces, method: str = "predict"):
        """One member's probabilities (predict_group: a list of them, one per merged request); a
        call that lost its replica is retried on another, and one that gets no answer within
        member_timeout_s is answered 503 rather than left hanging."""
        delay, timeout = 0.25, self.settings.member_timeout_s
        model = "the models" if which == "ensemble" else f"model {which.upper()}"
        for attempt in range(self.settings.member_retries + 1):
            response = getattr(self.members[which], method).remote(faces)
            try:
                answer = await asyncio.wait_for(_awaited(response), timeout)
            except asyncio.TimeoutError:
                response.cancel()  # not retried elsewhere: a request that stalls one replica must not stall the next
                raise MemberUnavailable(f"{model}: no answer within {timeout:g} s; retry shortly") from None
            except BackPressureError:  # the member's queue is full: overload is answered at once, not queued
                raise MemberUnavailable(
                    f"{model} are at capacity; retry shortly"
                    if which == "ensemble"
                    else f"{model} is at capacity; retry shortly"
                ) from None
            except ActorDiedError:
                error_id = uuid.uuid4().hex[:12]
                logger.exception("the replica of member %s died running a request (error id %s)", which, error_id)
                raise MemberUnavailable(
                    f"{model}: the replica stopped while answering this request (error id {error_id}); "
                    "it was not retried"
                ) from None
            except NOT_RUN as error:
                logger.warning("member %s unavailable (attempt %d): %s", which, attempt + 1, type(error).__name__)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if isinstance(answer, str):  # the model failed on this request alone
                raise MemberUnavailable(f"{model}: could not answer this request ({answer})")
            return answer
        raise MemberUnavailable(f"{model}: unavailable (its replicas are restarting); retry shortly")

    async def _fused(self, faces: np.ndarray):
        """The fused member's answer to one request, merged with others into a group (see __init__).
        The requests the groups in flight hold plus ensemble.max_queued_requests more may wait here;
        past that a request is refused at once (503, Retry-After) instead of queueing for seconds:
        in this layout the replicas' own queues never fill, the ingress holds the waiting requests."""
        if self._waiting >= self._waiting_limit:
            raise MemberUnavailable("the models are at capacity; retry shortly")
        self._waiting += 1
        try:
            return await self._grouped(faces)
        finally:
            self._waiting -= 1

    async def _group_call(self, requests: list[np.ndarray]) -> list:
        """The fused member's answers to requests merged here: per request its probabilities, the
        error text of a request the models could not take, or the MemberUnavailable of its part.

        A group is sent as one call per replica, in parts of near-equal size: a group sent whole
        keeps one replica busy while the others idle (under a steady load of as many clients as
        max_batch_size, every request fell into one group and the ensemble ran at one core's speed)."""
        parts = [part for part in np.array_split(np.arange(len(requests)), self._replicas) if len(part)]
        answers = await asyncio.gather(*(self._part_call([requests[i] for i in part]) for part in parts))
        return [answer for part in answers for answer in part]

    async def _part_call(self, requests: list[np.ndarray]) -> list:
        try:
            return await self._member("ensemble", requests, method="predict_group")
        except MemberUnavailable as error:
            return [error] * len(requests)

    async def _members(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        """Each answering member's probabilities of the faces."""
        if "ensemble" in self.members:
            joined = await self._fused(faces)
            if isinstance(joined, MemberUnavailable):
                raise MemberUnavailable(str(joined))
            if isinstance(joined, str):  # the models failed on this request alone
                raise MemberUnavailable(f"the models: could not answer this request ({joined})")
            classes = len(self.card.labels)
            return {name: joined[:, i * classes : (i + 1) * classes] for i, name in enumerate(self.answering)}
        names = [name for name in ("a", "b") if self.members.get(name) is not None]
        answers = await asyncio.gather(*(self._member(name, faces) for name in names))
        return dict(zip(names, answers))

    def _received(self, request: Request, images: bool = False):
        """The request's body, read within its limits while the ingress has room to hold it. For
        `images`, a content type that is neither an image nor a form is refused before the body is
        read, and a raw body that does not start like an image as soon as its first bytes arrive."""
        from ferray.faces import check_image_start

        check = check_image_start if images and raw_image_body(request) else None
        return received(self.intake, request, self.settings.max_body_bytes, self.settings.body_timeout_s, check)

    async def _answer(self, images: list[tuple[str, bytes]], detect: bool) -> list[dict]:
        from ferray.faces import declared_pixels
        from ferray.predict import all_faces, assemble, find_faces

        # decoding and detection are CPU work: in the decode stage's threads, off the event loop, in
        # the large images' lane where the headers declare many pixels
        pixels = sum(declared_pixels(data) for _, data in images)
        found = await self.intake.decode(find_faces, images, detect, self.limits, self.settings.detector, pixels=pixels)
        return assemble(found, await self._members(all_faces(found)), self.rule)

    async def _guarded(self, work):
        """Every answer is JSON: 4xx naming what was wrong with the request, 503 (Retry-After) when a
        member cannot answer now, and 503 too for a failure inside the models, logged with its trace."""
        from ferray.errors import LimitExceeded
        from ferray.faces import InputError

        try:
            return await work
        except LimitExceeded as error:
            return JSONResponse(error.body(), status_code=413)
        except InputError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except (MemberUnavailable, Busy) as error:
            return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": "1"})
        except Exception:  # noqa: BLE001 - a bug or a model failure must still answer JSON
            error_id = uuid.uuid4().hex[:12]
            logger.exception("request failed (error id %s)", error_id)
            return JSONResponse(
                {"error": f"the server could not answer this request (error id {error_id}); retry shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )

    # ---------------------------------------------------------------------------------- routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(self.page)

    @api.post("/predict", summary="Classify the faces in one image")
    async def predict(
        self,
        request: Request,
        detect: bool = Query(
            True, description="find faces in photos larger than 48x48; false classifies the whole image as one face"
        ),
    ):
        """The image is the raw body (image/png, image/jpeg, image/bmp, image/webp) or one multipart file."""

        async def work():
            async with self._received(request, images=True) as body:
                images = await images_of(request, body, False, self.settings.max_batch_images)
                return (await self._answer(images, detect))[0]

        return await self._guarded(work())

    @api.post("/predict/batch", summary="Classify the faces in several images (multipart files)")
    async def predict_batch(self, request: Request, detect: bool = Query(True)):
        async def work():
            async with self._received(request, images=True) as body:
                images = await images_of(request, body, True, self.settings.max_batch_images)
                return {"results": await self._answer(images, detect)}

        return await self._guarded(work())

    @api.post("/predict/pixels", summary="Classify FER2013 pixel rows")
    async def predict_pixels(self, request: Request):
        """JSON {"pixels": [2304 ints 0..255]} or {"pixels": [[...], [...]]}, row-major 48x48 as in FER2013."""
        from ferray.faces import Face, InputError, faces_from_pixels
        from ferray.predict import describe

        def parse(body: bytes):
            try:
                payload = json.loads(body)
            except RecursionError:
                raise InputError("JSON body nested too deep") from None
            except ValueError as error:  # also an integer of more digits than Python converts (4,300)
                raise InputError(f"malformed JSON body ({str(error)[:200]})") from None
            return faces_from_pixels(payload, limits=self.limits)

        async def work():
            content_type = content_type_of(request)
            if content_type != "application/json":
                # not a form's or a cross-site page's "simple" POST (text/plain, forms): those may not
                # spend the server's compute
                raise InputError(
                    f"content type {content_type or '(none)'!r} is not accepted: send the rows as application/json",
                    status=415,
                )
            async with self._received(request) as body:
                faces = await self.intake.decode(parse, body)  # parsing a large body is CPU work too
            probs = await self._members(faces)
            boxes = [Face((0, 0, 48, 48), pixels) for pixels in faces]
            return {"faces": describe(boxes, probs, self.rule)}

        return await self._guarded(work())

    @api.get("/healthz")
    async def healthz(self):
        """The ingress is up (liveness); /readyz says whether the models answer."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        """200 only when every member of the bundle is loaded and answers a tiny forward; else 503
        naming what is not ready. One probe runs at a time and its answer serves every GET of the
        next READY_CACHE_S seconds (`checked_s_ago` says how old it is): a probe is a forward of every
        member, and anonymous polling must not take the slots of real predictions."""
        answer = self._ready_answer
        if answer is None or time.monotonic() - answer[0] > READY_CACHE_S:
            if self._ready_probe is None or self._ready_probe.done():
                self._ready_probe = asyncio.ensure_future(self._probe_members())
            answer = await asyncio.shield(self._ready_probe)
        checked, ready, states = answer
        body = {"status": "ready" if ready else "not ready", "members": states}
        body["checked_s_ago"] = round(time.monotonic() - checked, 2)
        # a ready answer may be repeated for a second (by HAProxy's cache in the fast mode:
        # ferray.distributed.ray_internals.HAPROXY_REWRITES); a 503 never is
        headers = {"Cache-Control": "max-age=1"} if ready else {"Retry-After": "2", "Cache-Control": "no-store"}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    async def _probe_members(self) -> tuple[float, bool, dict]:
        members = {which: handle for which, handle in self.members.items() if handle is not None}
        results = await asyncio.gather(*(self._ready(which, handle) for which, handle in members.items()))
        states = dict(zip(members, results))
        self._ready_answer = (time.monotonic(), all(state == "ready" for state in states.values()), states)
        return self._ready_answer

    async def _ready(self, which: str, handle) -> str:
        try:
            await asyncio.wait_for(_awaited(handle.ready.remote()), self.settings.ready_timeout_s)
            return "ready"
        except asyncio.TimeoutError:
            return f"no answer within {self.settings.ready_timeout_s:g} s (loading, or busy)"
        except Exception as error:  # noqa: BLE001 - whatever it is, the member is not ready
            return f"unavailable ({type(error).__name__})"

    @api.get("/labels")
    async def labels(self):
        return {"labels": self.card.labels}

    @api.get("/model", summary="The model card of the served bundle")
    async def model(self):
        from ferray.bundle.card import public_card

        return public_card(self.card) | {"bundle": Path(self.settings.bundle).name}


# -------------------------------------------------------------------------------------------- build
def build(args: dict | None = None):
    """The Serve application for the `args` of serve/config.yaml (an application builder)."""
    settings: ServeSettings = parse_settings(args)
    from ferray.bundle import read_bundle_card, resolve_bundle
    from ferray.bundle.load import answering_members
    from ferray.config import ConfigError

    bundle = str(resolve_bundle(settings.bundle).absolute())
    card = read_bundle_card(bundle)  # fail here, before any replica starts, if the bundle is not there
    if settings.detector == "mtcnn":
        from ferray.mtcnn import networks

        networks()  # and here if the learned detector's networks are not installed
    plain = {key: value for key, value in (args or {}).items()} | {"bundle": bundle}
    ingress = Ingress.options(
        num_replicas=settings.ingress.replicas,
        max_ongoing_requests=settings.ingress.max_ongoing_requests,
        max_queued_requests=settings.ingress.max_queued_requests,
        # past the ingress's own bound Serve refuses for it: 503 with Retry-After as well
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        ray_actor_options={"num_cpus": settings.ingress.num_cpus},
    )
    try:
        answering = answering_members(card, settings.members)
    except ValueError as error:
        raise ConfigError(f"args.members: {error}") from None
    if settings.layout == "fused":
        replica = settings.ensemble
        fused = Member.options(name="Ensemble", **replica.deployment_options()).bind(
            bundle, list(answering), replica.__dict__
        )
        return ingress.bind(fused, None, plain)
    if not set(answering) <= {"a", "b"}:
        raise ConfigError(
            f"layout split deploys members a and b apart; the set {settings.members!r} answers with "
            f"{', '.join(answering)}: serve it with layout fused"
        )
    members = {"b": None}
    for which, replica in (("a", settings.model_a), ("b", settings.model_b)):
        if which not in answering:
            continue  # Model A alone (the bundle's only member, or members: a): no ModelB deployment
        name = f"Model{which.upper()}"
        members[which] = Member.options(name=name, **replica.deployment_options()).bind(
            bundle, [which], replica.__dict__
        )
    return ingress.bind(members["a"], members["b"], plain)
