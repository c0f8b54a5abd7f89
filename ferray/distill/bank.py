"""The teacher bank: a teacher ensemble's fused probabilities for every face of a split on a fixed
set of views (ferray.distill.views), stored as probabilities only (half precision) beside the
prepared data, with the data's checksum and the teacher's identity. A bank is derived from FER2013:
it stays beside the data and is never committed to the project.

    DATA/teacher_banks/NAME/probs.npy       (faces, views, classes) float16, faces in the split's id order
    DATA/teacher_banks/NAME/manifest.json   format, split, data checksum, teacher, seed, views, augment"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ferray.config import AugmentConfig
from ferray.device import autocast
from ferray.distill.views import render, view_params
from ferray.errors import FerrayError

BANK_FORMAT = "ferray.teacher_bank/1"


class BankMismatch(FerrayError):
    """A bank made with another teacher, other data or other views than asked for."""


def teacher_identity(bundle: str | Path) -> dict:
    """A bundle's name and a digest of its card and weights (what its answers depend on)."""
    folder = Path(bundle)
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".pt")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return {"name": folder.name, "digest": f"blake2b64:{digest.hexdigest()}"}


def face_keys(ids) -> np.ndarray:
    """Each face id's key for ferray.distill.views (8 bytes of its blake2b digest)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in ids], np.uint64
    )


@torch.no_grad()
def teacher_probs(ensemble, faces: torch.Tensor, face_ids: np.ndarray, views: int, seed: int, augment: AugmentConfig):
    """(N, views, classes) fused probabilities of uint8 faces (N, 48, 48), view v of face face_ids[i]
    drawn by ferray.distill.views: each member sees the view at its own input (the 48x48 face, or the
    SR generator's face of it) through the same normalized affine map."""
    upscaled = ensemble.upscale(faces) if ensemble.needs_sr else None
    answers = []
    for view in range(views):
        numbers = np.full(len(faces), view)
        answers.append(fused_answers(ensemble, faces, upscaled, partial(view_params, seed, face_ids, numbers, augment)))
    return torch.stack(answers, dim=1)


@torch.no_grad()
def fused_answers(ensemble, faces: torch.Tensor, upscaled: torch.Tensor | None, params_for) -> torch.Tensor:
    """(N, classes) fused probabilities (on the CPU) of uint8 faces (N, 48, 48) seen through one view
    each, params_for(crop, size) -> (theta, gain, bias) at a member's crop of its input's size: a
    member of input "sr" sees it on `upscaled` (the generator's faces), the others on the face."""
    members = {}
    for name, member in ensemble.members.items():
        source, scale = (upscaled, 1) if member.input == "sr" else (faces, member.cfg.data.input_scale)
        crop = member.cfg.augment.crop
        params = params_for(crop, source.shape[-1] * scale)
        x = render(source.to(ensemble.device), *params, crop, scale)
        model, amp = ensemble.runner(name)
        with autocast(ensemble.device, amp):
            members[name] = model(x).float().softmax(-1).cpu()
    return ensemble.fuse(members)


def bank_manifest(split: str, data_checksum: str, teacher: dict, seed: int, views: int, augment: AugmentConfig):
    return {
        "format": BANK_FORMAT,
        "split": split,
        "data_checksum": data_checksum,
        "teacher": teacher,
        "seed": seed,
        "views": views,
        "augment": asdict(augment),
    }


def save_bank(folder: str | Path, probs: np.ndarray, manifest: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "probs.npy", np.asarray(probs, np.float16))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def load_bank(folder: str | Path, expected: dict, with_manifest: bool = False):
    """The bank's probabilities, once its manifest agrees with `expected` (fields of a bank_manifest
    of what the student trains on); a BankMismatch naming each field that differs, both values.
    With `with_manifest`, (probabilities, manifest)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise BankMismatch(f"{folder}: no readable teacher bank manifest ({error})") from None
    differ = [
        f"{key}: the bank's {manifest.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if manifest.get(key) != value
    ]
    if differ:
        raise BankMismatch(f"{folder}: the teacher bank was made for something else; " + "; ".join(differ))
    probs = np.load(folder / "probs.npy")
    if probs.shape[1] != manifest["views"]:
        raise BankMismatch(f"{folder}: probs.npy holds {probs.shape[1]} views, its manifest says {manifest['views']}")
    return (probs, manifest) if with_manifest else probs


class TeacherAnswers:
    """A table of faces (id, pixels, ...) -> (id, probs): the teacher's probabilities on every view,
    (views, classes) half precision, as bytes."""

    def __init__(self, bundle: str, views: int, seed: int, augment: dict, threads: int | None = None):
        from ferray.bundle.load import load_bundle

        if threads:
            torch.set_num_threads(threads)
        self.ensemble, _ = load_bundle(bundle)
        self.views, self.seed, self.augment = views, seed, AugmentConfig(**augment)

    def __call__(self, table):
        import pyarrow as pa

        from ferray.data.contract import pixels_to_images

        ids = table.column("id").to_pylist()
        faces = torch.from_numpy(pixels_to_images(table.column("pixels")).copy())
        probs = teacher_probs(self.ensemble, faces, face_keys(ids), self.views, self.seed, self.augment)
        rows = [row.tobytes() for row in probs.numpy().astype(np.float16)]
        return pa.table({"id": table.column("id"), "probs": pa.array(rows, pa.binary())})
