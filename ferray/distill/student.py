"""The student's side of distillation: a teacher bank on the training device, and a batch of faces
turned into the very views the teacher answered (ferray.distill.views), with the teacher's
probabilities on them.

Each epoch a face is shown one of the bank's views, drawn from (the run's seed, rank, epoch, face)
alone, so a resumed run shows what an uninterrupted one would. Faces travel through the loaders with
their keys (ferray.data.contract.decode_faces: a hash of the id); the bank's rows are in the split's id
order, and its views are drawn from another hash of the id (ferray.distill.bank.face_keys)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from ferray.config import AugmentConfig, ExperimentConfig
from ferray.data.contract import id_keys, read_manifest, read_split
from ferray.distill.bank import BankMismatch, face_keys, fused_answers, load_bank, teacher_identity
from ferray.distill.views import TTA_VIEWS, VIEW_DRAWS, params_of, render, uniforms, view_params

_VIEW_DRAW = 0x5EED  # keeps the student's choice of view apart from the views' own draws


def bank_folder(cfg: ExperimentConfig) -> Path:
    """distill.bank as a folder: a path, or a name under DATA/teacher_banks."""
    given = Path(cfg.distill.bank).expanduser()
    if given.is_absolute() or given.exists():
        return given
    return Path(cfg.data.path) / "teacher_banks" / cfg.distill.bank


class Teacher:
    """A bank's probabilities (faces, views, classes) on a device and how its faces are found."""

    def __init__(self, probs: torch.Tensor, ids: list, seed: int, augment: AugmentConfig, source: str = "bank"):
        if probs.shape[0] != len(ids):
            raise BankMismatch(f"{source}: {probs.shape[0]} faces in the bank, {len(ids)} in the split")
        self.probs, self.views = probs, probs.shape[1]
        self.seed, self.augment, self.source = seed, augment, source
        self.view_keys = face_keys(ids)
        # the loaders' keys (decode_faces) of the bank's rows, sorted, to find a batch's rows
        loader_keys = id_keys(ids)
        self.order = np.argsort(loader_keys, kind="stable")
        self.sorted_keys = loader_keys[self.order]

    def rows(self, keys: torch.Tensor) -> np.ndarray:
        """The bank rows of faces with these loader keys; BankMismatch for a face it lacks."""
        keys = keys.cpu().numpy().astype(np.int64)
        at = np.searchsorted(self.sorted_keys, keys).clip(max=len(self.sorted_keys) - 1)
        missing = self.sorted_keys[at] != keys
        if missing.any():
            raise BankMismatch(f"{self.source}: {int(missing.sum())} training faces are not in the bank")
        return self.order[at]

    def pick_views(self, rows: np.ndarray, seed: int) -> np.ndarray:
        """One view per face for this (seed = the rank's epoch seed), uniform over the bank's views."""
        u = uniforms(seed ^ _VIEW_DRAW, self.view_keys[rows], np.zeros(len(rows), np.int64), 1)[:, 0]
        return np.minimum((u * self.views).astype(np.int64), self.views - 1)

    def lesson(self, images: torch.Tensor, keys: torch.Tensor, seed: int, crop: int, scale: int = 1):
        """(the student's views (B, 1, crop, crop), the teacher's probabilities on them (B, classes))."""
        rows = self.rows(keys)
        views = self.pick_views(rows, seed)
        size = images.shape[-1] * scale
        params = view_params(self.seed, self.view_keys[rows], views, self.augment, crop, size)
        x = render(images, *params, crop, scale)
        index = torch.from_numpy(rows).to(self.probs.device), torch.from_numpy(views).to(self.probs.device)
        return x, self.probs[index].float()


class OnlineTeacher:
    """A teacher bundle answering the student's views as it trains (distill.online): each step's
    faces through views drawn as training augments them (ferray.distill.views, from a stream seeded
    by the epoch, so a resumed epoch draws what it drew), each member seeing the same view at its own
    input and crop, their fused probabilities the student's target."""

    def __init__(self, ensemble, augment: AugmentConfig):
        self.ensemble, self.augment = ensemble, augment
        self._seed, self._rng = None, None

    def lesson(self, images: torch.Tensor, keys, seed: int, crop: int, scale: int = 1):
        """(the student's views (B, 1, crop, crop), the teacher's probabilities on them (B, classes))."""
        if seed != self._seed:  # a new epoch: a new stream
            self._seed, self._rng = seed, np.random.default_rng(seed ^ _VIEW_DRAW)
        # the batch's views (augmented: numbered past the TTA crops), at any crop of any input size
        params_for = partial(
            params_of, self._rng.random((len(images), VIEW_DRAWS)), np.full(len(images), TTA_VIEWS), self.augment
        )
        x = render(images, *params_for(crop, images.shape[-1] * scale), crop, scale)
        faces = images.to(self.ensemble.device)
        upscaled = self.ensemble.upscale(faces) if self.ensemble.needs_sr else None
        return x, fused_answers(self.ensemble, faces, upscaled, params_for).to(images.device)


def load_online_teacher(cfg: ExperimentConfig, device) -> OnlineTeacher:
    """The bundle distill.teacher names ("": the shipped one), loaded on the training device."""
    from ferray.bundle.load import load_bundle, resolve_bundle

    folder = resolve_bundle(cfg.distill.teacher or None)
    ensemble, _ = load_bundle(folder, device)
    return OnlineTeacher(ensemble, cfg.augment)


def load_teacher(cfg: ExperimentConfig, device) -> Teacher | OnlineTeacher:
    """The bank distill.bank names, checked against the training split and data (its checksum) and,
    where distill.teacher names a bundle, against that teacher: BankMismatch naming both sides; or
    with distill.online, the teacher bundle itself."""
    if cfg.distill.online:
        return load_online_teacher(cfg, device)
    folder = bank_folder(cfg)
    manifest = read_manifest(cfg.data.path)
    expected = {"split": cfg.data.train_split, "data_checksum": manifest["checksum"]}
    if cfg.distill.teacher:
        from ferray.bundle.load import resolve_bundle

        expected["teacher"] = teacher_identity(resolve_bundle(cfg.distill.teacher))
    probs, bank = load_bank(folder, expected, with_manifest=True)
    ids = read_split(cfg.data.path, cfg.data.train_split, columns=["id"]).sort_by("id").column("id").to_pylist()
    augment = AugmentConfig(**bank["augment"])
    return Teacher(torch.from_numpy(probs).to(device), ids, int(bank["seed"]), augment, source=str(folder))
