"""Members' probabilities of a split's faces kept on disk (`ferray ensemble --cache DIR`), so that
building again with another candidate, another set or another selection forwards only the members
it has not answered before: on a CPU each member's ten-crop pass over a split takes minutes (Ray-free).

An entry is found by everything its numbers depend on: the member's weights as forwarded (their bytes,
after the batch norms are folded), what it reads (the face or the SR generator's, and that
generator's weights), its crop and input scale, the views (ten-crop or the center), the precision it
runs in here (bf16, fp32, int8), and the faces (the prepared data's checksum and the split). Anything
else changed is another entry; nothing is ever reused across a change.

The entries are derived from the data (its faces' answers): keep the folder beside the data and
never publish it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

CACHE_FORMAT = "ferray.probs/1"


class ProbsCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def key(self, ensemble, name: str, data_checksum: str, split: str) -> str:
        """The entry of member `name` of `ensemble` (with its current views) on a split of the data."""
        member = ensemble.members[name]
        digest = hashlib.blake2b(digest_size=16)
        parts = [
            CACHE_FORMAT,
            data_checksum,
            split,
            member.input,
            member.cfg.augment.crop,
            member.cfg.data.input_scale,
            "tta" if ensemble.member_tta(name) else "center",
            _precision(ensemble, name),
        ]
        digest.update(repr(parts).encode())
        _hash_weights(digest, member.model)
        if member.input == "sr" and ensemble.generator is not None:
            _hash_weights(digest, ensemble.generator)
        return digest.hexdigest()

    def get(self, key: str, faces: int) -> np.ndarray | None:
        """The entry's probabilities (faces, classes), or None where there is none (or a damaged one)."""
        path = self.folder / f"{key}.npy"
        try:
            probs = np.load(path)
        except (OSError, ValueError):
            return None
        return probs if probs.ndim == 2 and probs.shape[0] == faces else None

    def put(self, key: str, probs: np.ndarray) -> None:
        """Written whole or not at all (a run stopped mid-write leaves no half entry)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"{key}.{os.getpid()}.part"
        with open(part, "wb") as out:
            np.save(out, np.asarray(probs, dtype=np.float32))
        part.replace(self.folder / f"{key}.npy")


def _hash_weights(digest, model: torch.nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _precision(ensemble, name: str) -> str:
    """What the member's forward runs in here, without making its frozen copy."""
    if ensemble.int8 and name in ensemble.int8_ranges:
        return "int8"
    return f"{ensemble.device.type}:{'bf16' if ensemble._amp else 'fp32'}"
