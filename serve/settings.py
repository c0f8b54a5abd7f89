"""Typed settings of the Serve application, read from the `args` of serve/config.yaml.

`serve run serve/config.yaml` and `ferray serve` both pass that mapping to `ferray.serve_app.app:build`, so the
replica resources, batching and autoscaling come from the YAML (or `--set` overrides), never from
literals in the code. Unknown keys are errors, named with their path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ferray.config import ConfigError, build_typed, read_yaml

CONFIG_FILE = Path(__file__).with_name("config.yaml")


def check_queue_bound(max_queued_requests: int, where: str) -> None:
    if max_queued_requests < -1 or max_queued_requests == 0:
        raise ConfigError(f"{where}: max_queued_requests must be >= 1, or -1 for unbounded")


@dataclass
class ReplicaSettings:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1  # torch threads per replica: replicas, not threads, should fill the cores
    max_batch_size: int = 16  # 1 turns batching off
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 32
    # requests waiting for a replica beyond max_ongoing_requests; past it a request is answered 503
    # at once (Retry-After) instead of queueing until the HTTP timeout. -1: unbounded (Ray's default)
    max_queued_requests: int = 64
    chunk_faces: int = 64  # a batch is forwarded in chunks of at most this many faces (bounded memory)
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    # int8 on the CPU (a bundle calibrated by `ferray quantize`; torchao installed): more faces per second
    # than bf16 on CPUs with VNNI (bench/cpu_infer.py); each replica compiles its batch shapes when it
    # starts, before it takes a request
    int8: bool = False

    def check(self, where: str, merged_upstream: bool = False) -> None:
        """merged_upstream: the fused layout's deployment, whose calls are groups the ingress merged
        (max_batch_size is the group size there, and max_ongoing_requests counts calls, not requests)."""
        if self.max_batch_size < 1 or self.threads < 1 or self.chunk_faces < 1:
            raise ConfigError(f"{where}: max_batch_size, threads and chunk_faces must be >= 1")
        check_queue_bound(self.max_queued_requests, where)
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"{where}: max_ongoing_requests must be >= 1")
        if not merged_upstream and self.max_ongoing_requests < self.max_batch_size:
            # a batch never exceeds the requests a replica may hold, so a larger batch size would be a lie
            raise ConfigError(
                f"{where}: max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"max_batch_size ({self.max_batch_size})"
            )
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"{where}: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})"
            )
        if self.max_replicas > self.min_replicas and self.target_ongoing_requests >= self.max_ongoing_requests:
            raise ConfigError(
                f"{where}: target_ongoing_requests ({self.target_ongoing_requests}) must be below "
                f"max_ongoing_requests ({self.max_ongoing_requests}) or autoscaling never triggers"
            )

    def deployment_options(self) -> dict:
        options = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.max_replicas > self.min_replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 2.0,
                "downscale_delay_s": 60.0,
            }
        else:
            options["num_replicas"] = self.min_replicas
        return options


@dataclass
class IngressSettings:
    num_cpus: float = 0.5
    replicas: int = 1
    max_ongoing_requests: int = 64
    # requests waiting for the ingress beyond max_ongoing_requests; past it Serve refuses them itself
    # (503, Retry-After, a plain-text body). Below it the ingress answers overload with its own JSON
    # 503 as soon as the models' waiting bound is reached (ensemble.max_queued_requests), so keep
    # max_ongoing_requests well above that bound.
    max_queued_requests: int = 64


@dataclass
class IntakeSettings:
    """What requests may hold in the ingress before the models see them (serve/intake.py)."""

    # bytes of request bodies held at once, each counted from its declared length (a chunked body
    # as max_body_bytes) until it is answered: with the defaults, 6 bodies at the size limit, or
    # hundreds of photos
    max_held_body_bytes: int = 64 * 1024 * 1024
    decode_slots: int = 0  # images decoded (and faces found) at once; 0: the machine's cores
    wait_s: float = 1.0  # how long a request waits for room before its 503 (Retry-After)
    # the ingress's resident memory past which new requests get a 503 until it falls; 0: its bound by
    # construction (its memory at start, the bodies above, every decode slot at max_image_pixels)
    max_memory_mb: int = 0


@dataclass
class ServeSettings:
    bundle: str = "default"  # a bundle folder, or "default": the model that ships with ferray
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # one image's declared size, checked before decoding
    max_request_pixels: int = 60_000_000  # all images of one request together, before decoding any
    max_faces_per_request: int = 64  # faces detected in a request's images, or pixel rows sent
    max_batch_images: int = 32  # images in one /predict/batch request
    # a body not received whole within this many seconds is answered 408 (a slow upload holds an
    # ingress slot and its memory meanwhile); ferray's Ray gives HAProxy's client timeout the same
    body_timeout_s: float = 30.0
    # the face detector for photos: haar (OpenCV's cascade) or mtcnn (learned, levels each face by its
    # eyes; needs `pip install 'ferray[mtcnn]'`)
    detector: str = "haar"
    # a call that no replica ran (none available) is retried on another; never one whose replica died running it
    member_retries: int = 2
    member_timeout_s: float = 30.0
    ready_timeout_s: float = 5.0  # /readyz: how long a member's tiny forward may take
    # fused: one deployment ("ensemble") holds every member and answers a face in one hop; split: A and
    # B (with the SR generator) in deployments of their own ("model_a", "model_b"), for clusters whose
    # members want different hardware (B on a GPU, A on CPUs).
    layout: str = "fused"
    # the members that answer: a set the bundle declares ("all": every member; "fast": a cheaper
    # one), or member names as a comma list ("a": Model A alone, at its own temperature)
    members: str = "all"
    ingress: IngressSettings = field(default_factory=IngressSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    ensemble: ReplicaSettings = field(default_factory=ReplicaSettings)
    model_a: ReplicaSettings = field(default_factory=ReplicaSettings)
    model_b: ReplicaSettings = field(default_factory=ReplicaSettings)

    def check(self) -> ServeSettings:
        if self.layout not in ("fused", "split"):
            raise ConfigError(f"layout is {self.layout!r}; choose fused or split")
        if not self.members.strip():
            raise ConfigError("members is empty; name a set of the bundle (all, fast, ...) or members (a,b)")
        check_queue_bound(self.ingress.max_queued_requests, "ingress")
        self.ensemble.check("ensemble", merged_upstream=True)
        self.model_a.check("model_a")
        self.model_b.check("model_b")
        limits = (
            "max_body_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_faces_per_request",
            "max_batch_images",
        )
        if any(getattr(self, name) < 1 for name in limits):
            raise ConfigError(f"{', '.join(limits)} must be >= 1")
        if self.intake.max_held_body_bytes < self.max_body_bytes:
            raise ConfigError(
                f"intake.max_held_body_bytes ({self.intake.max_held_body_bytes:,}) is below max_body_bytes "
                f"({self.max_body_bytes:,}): a body at the limit could never be held"
            )
        if self.intake.decode_slots < 0 or not self.intake.wait_s > 0:
            raise ConfigError("intake.decode_slots must be >= 0 (0: the cores) and intake.wait_s > 0 seconds")
        if self.intake.max_memory_mb < 0:
            raise ConfigError(
                f"intake.max_memory_mb is {self.intake.max_memory_mb}; it must be >= 0 (0: sized at start)"
            )
        from ferray.faces import DETECTORS

        if self.detector not in DETECTORS:
            raise ConfigError(f"detector is {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"body_timeout_s is {self.body_timeout_s}; it must be > 0 seconds")
        return self


def parse_settings(args: dict | None) -> ServeSettings:
    return build_typed(ServeSettings, dict(args or {}), "args").check()


def load_config(path: str | Path = CONFIG_FILE) -> dict:
    """The Serve config file (a `serve run`/`serve deploy` config) as a dict."""
    path = Path(path)
    config = read_yaml(path, "Serve config")
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application, found {len(apps)}")
    return config
