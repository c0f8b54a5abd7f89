"""Untrained but real checkpoints and bundles, for tests and benchmarks whose result does not depend
on the weights (plumbing, shapes, speed), and the HTTP client helpers that tests, benches and the
demo talk to a served bundle with. Never used by a training or serving path."""

from __future__ import annotations

from pathlib import Path


def untrained_members(
    folder: str | Path,
    model_a: str = "xception_a_tiny",
    model_b: str = "xception_a_tiny",
    sr_channels: int = 16,
    sr_blocks: int = 2,
    model_c: str | None = None,
) -> dict[str, Path]:
    """Checkpoints of an A (48x48 faces, 44x44 crops), a B on SR faces (88x88 crops) and an SR generator;
    with `model_c`, a third member "c" on the 48x48 faces (another seed).

    The defaults are the smallest members that exercise every code path (B on Model A's layout at
    1/8 width: milliseconds per face); benchmarks pass the real architectures."""
    import torch

    from ferray.config import load_config
    from ferray.engine import build_state, save_checkpoint
    from ferray.resources import recipe
    from ferray.sr.engine import build_sr_state, save_sr_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_a = load_config(recipe("debug_a.yaml"), [f"model.name={model_a}", "train.seed=1"])
    cfg_b = load_config(recipe("debug_b.yaml"), [f"model.name={model_b}", "train.seed=2"])
    cfg_sr = load_config(
        recipe("debug_srgan.yaml"),
        ["sr.content=mse", f"sr.generator_channels={sr_channels}", f"sr.generator_blocks={sr_blocks}"],
    )
    cpu = torch.device("cpu")
    paths = {
        "a": save_checkpoint(folder / "a.pt", build_state(cfg_a, cpu), {"eval_acc": 0.0}),
        "b": save_checkpoint(folder / "b.pt", build_state(cfg_b, cpu), {"eval_acc": 0.0}),
        "sr": save_sr_checkpoint(folder / "sr.pt", build_sr_state(cfg_sr, cpu), {"eval_psnr": 0.0}),
    }
    if model_c is not None:
        cfg_c = load_config(recipe("debug_a.yaml"), [f"model.name={model_c}", "train.seed=3"])
        paths["c"] = save_checkpoint(folder / "c.pt", build_state(cfg_c, cpu), {"eval_acc": 0.0})
    return paths


def untrained_bundle(folder: str | Path, data: str | Path, tta: bool = True, **members) -> Path:
    """A serving bundle of `untrained_members` (a, b behind the SR generator, and c where `model_c` is
    given), its fusion fitted on `data`'s PublicTest."""
    from ferray.bundle import build_bundle

    folder = Path(folder)
    paths = untrained_members(folder / "members", **members)
    classifiers = {name: path for name, path in paths.items() if name != "sr"}
    build_bundle(classifiers, paths["sr"], data, folder / "bundle", tta=tta)
    return folder / "bundle"


# ------------------------------------------------------------------------------ HTTP helpers
def wait_for_dashboard(address: str, process, timeout: float) -> None:
    """Until a Ray head started as `process` answers on its dashboard `address` (a 401 without the
    token counts: it is up); RuntimeError if the process ends or `timeout` seconds pass first."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the Ray head at {address} did not start") from None
            time.sleep(1)


def free_port() -> int:
    from ferray.distributed.runtime import free_local_port

    return free_local_port()


def post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict]:
    """(status, JSON) of a POST; 4xx/5xx answers are returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def png_bytes(gray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()
