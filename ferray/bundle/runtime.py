"""The ensemble at inference: any number of named members, those that read SR faces behind one
shared SR generator, fused by the bundle's rule; forwarded on the CPU through frozen (bf16 or fp32)
or int8 copies (Ray-free).

    P = sum_i w_i P_i(view of its input) / sum_i w_i, then the temperature (ferray.bundle.fusion)

A member reads the 48x48 face ("face"; its own data.input_scale may upscale it bicubically) or the
face upscaled 2x by the SR generator ("sr"), each with the bundle's views (ten-crop TTA or the center
crop). A Serve replica or a set loads only the members it answers with.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ferray.augment import predict_proba
from ferray.bundle.fusion import FusionRule
from ferray.config import ExperimentConfig
from ferray.data.contract import FER_SIZE
from ferray.device import use_bf16
from ferray.engine import CheckpointError, model_from_checkpoint
from ferray.models.folding import fold_batch_norms
from ferray.models.frozen import freeze_for_cpu
from ferray.sr.nets import generated_faces


@dataclass
class LoadedMember:
    model: torch.nn.Module
    cfg: ExperimentConfig
    input: str = "face"  # "face": the 48x48 face; "sr": the SR generator's 96x96 face


@dataclass
class Ensemble:
    """The loaded members, by name in the bundle's order, and their fusion rule."""

    members: dict[str, LoadedMember]
    generator: torch.nn.Module | None = None  # feeds the members of input "sr"
    rule: FusionRule = field(default_factory=FusionRule)
    tta: bool = True
    # members answered from the center crop alone even where `tta` is on (the bundle's `center_only`,
    # chosen by `ferray ensemble --center-only`: ferray.bundle.views)
    center_only: frozenset = frozenset()
    device: torch.device = torch.device("cpu")
    bf16: bool | None = None  # None: where it is fast (ferray.device.use_bf16); False forces fp32
    # int8 CPU inference (ferray.models.quantized) for the members calibrated in `int8_ranges`
    # (member name -> its activation ranges, from the bundle's `ferray quantize`); off unless asked for
    int8: bool = False
    int8_ranges: dict = field(default_factory=dict, repr=False, compare=False)
    # CPU inference forwards frozen copies (ferray.models.frozen) where they pay: the members' in bf16
    # where the CPU has it natively, the SR generator's in fp32 on every CPU (in fp32 the classifiers
    # gained too little for the seconds freezing takes: docs/benchmarks.md); False: the modules, eager
    freeze: bool = True
    # the copies, made on first use: (member name or "sr", "int8" / dtype) -> (the module it was made from, its copy)
    _frozen: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _freezing: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def names(self) -> tuple[str, ...]:
        return tuple(self.members)

    @property
    def needs_sr(self) -> bool:
        return any(member.input == "sr" for member in self.members.values())

    @torch.no_grad()
    def probs(self, name: str, faces: torch.Tensor, upscaled: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 48x48 faces (N, 48, 48) -> member `name`'s probabilities (N, 7) on the CPU; `upscaled`:
        the generator's faces of the same batch, when already made (members of input "sr" share them)."""
        member = self.members[name]
        faces = self._check(faces).to(self.device)
        scale = member.cfg.data.input_scale
        if member.input == "sr":
            faces, scale = (upscaled if upscaled is not None else self.upscale(faces)), 1
        model, autocast = self.runner(name)
        return predict_proba(model, faces, member.cfg.augment.crop, self.member_tta(name), autocast, scale).cpu()

    def member_tta(self, name: str) -> bool:
        """Whether member `name` answers with ten crops (else the center crop alone)."""
        return self.tta and name not in self.center_only

    @torch.no_grad()
    def upscale(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 faces (N, 48, 48) on self.device -> the generator's uint8 (N, 96, 96), rounded as
        `sr upscale` writes them (on the CPU both run the generator's frozen fp32 copy)."""
        if self.generator is None:
            raise CheckpointError("a member reads SR faces, but the ensemble has no SR generator")
        generator = self.generator
        if self.freeze and self.device.type == "cpu":  # fp32 whatever the CPU: its pixels are what B was trained on
            generator = self._copy("sr", generator, FER_SIZE, "float32")
        return generated_faces(generator, self._check(faces).to(self.device))

    def runner(self, name: str) -> tuple[torch.nn.Module, bool]:
        """(the module that forwards member `name`, whether it needs bf16 autocast). In bf16 on a CPU,
        a frozen bf16 copy of the member (made once, on first use; it runs in bf16 by itself), or its
        int8 copy; else the member itself, under autocast where bf16 is used (CUDA)."""
        member = self.members[name]
        int8 = self.int8 and name in self.int8_ranges  # a member that was not calibrated runs as it would
        if not int8 and (not self._amp or not self.freeze or self.device.type != "cpu"):
            return member.model, self._amp
        how = "int8" if int8 else "bfloat16"
        return self._copy(name, member.model, member.cfg.augment.crop, how), False  # crop x crop views

    def _copy(self, which: str, module: torch.nn.Module, size: int, how: str) -> torch.nn.Module:
        """The CPU copy `how` (int8, or a frozen dtype) of `module`, made on first use."""
        with self._freezing:  # Serve replicas forward from executor threads
            source, copy = self._frozen.get((which, how), (None, None))
            if source is not module:  # first use, or the module was replaced since
                copy = (
                    self._int8_copy(which, module, size)
                    if how == "int8"
                    else freeze_for_cpu(module, size, getattr(torch, how))
                )
                self._frozen[which, how] = (module, copy)
        return copy

    def _int8_copy(self, which: str, model: torch.nn.Module, crop: int) -> torch.nn.Module:
        from ferray.models.quantized import Int8Unavailable, quantize_for_cpu

        if self.device.type != "cpu":
            raise Int8Unavailable(f"int8 inference runs on the CPU, not on {self.device}")
        ranges, where = self.int8_ranges[which], f"member {which.upper()}'s int8 calibration"
        if ranges.get("crop") != crop:
            raise CheckpointError(
                f"{where}: made for {ranges.get('crop')}x{ranges.get('crop')} crops, but the member "
                f"is given {crop}x{crop}: calibrate again with `ferray quantize`"
            )
        return quantize_for_cpu(model, ranges, where=where)

    def warm_up(self, name: str) -> None:
        """Make now what member `name` forwards (a frozen or int8 copy; int8 compiles each batch
        shape it uses), so that no request pays for it."""
        runner, _ = self.runner(name)
        if hasattr(runner, "warm_up"):
            runner.warm_up()
        self.probs(name, torch.zeros(1, FER_SIZE, FER_SIZE, dtype=torch.uint8))

    def member_probs(
        self, faces: torch.Tensor, batch: int = 256, progress=None, names: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every member's probabilities (or those `names`) of (N, 48, 48) uint8 faces, in chunks of
        `batch` (the SR generator runs once per chunk for all the members that read its faces);
        `progress`: a ferray.logs.FaceProgress told of each chunk (a split takes minutes on a CPU)."""
        names = list(self.members) if names is None else names
        needs_sr = any(self.members[name].input == "sr" for name in names)
        answers: dict[str, list] = {name: [] for name in names}
        for chunk in self._check(faces).split(batch):
            upscaled = self.upscale(chunk) if needs_sr else None
            for name in names:
                answers[name].append(self.probs(name, chunk, upscaled))
            if progress is not None:
                progress.update(len(chunk))
        return {name: torch.cat(parts) for name, parts in answers.items()}

    def fuse(self, probs: dict) -> torch.Tensor:
        return self.rule(probs)

    def fold_batch_norms(self) -> None:
        """Fold the classifiers' batch norms into their convolutions (same answers, a faster forward;
        ferray.models.folding). Not the SR generator: its output is rounded to uint8 pixels, and
        the classifiers were trained on exactly those pixels."""
        for member in self.members.values():
            fold_batch_norms(member.model)

    def predict(self, faces: torch.Tensor) -> dict:
        """{"probs": the served probabilities, "members": each member's}."""
        probs = self.member_probs(faces)
        return {"probs": self.fuse(probs), "members": probs}

    @property
    def _amp(self) -> bool:
        return use_bf16(self.device) if self.bf16 is None else self.bf16

    @staticmethod
    def _check(faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 3 or tuple(faces.shape[1:]) != (FER_SIZE, FER_SIZE) or faces.dtype != torch.uint8:
            raise ValueError(f"the ensemble takes (N, 48, 48) uint8 faces, got {tuple(faces.shape)} {faces.dtype}")
        return faces


# ------------------------------------------------------------------------------------------ loading
def load_members(
    members: dict[str, tuple[str | Path, str]], sr: str | Path | None, device, fold: bool = True
) -> Ensemble:
    """The members named ({name: (checkpoint, input)}, input "face" or "sr"), each checked to fit
    what it reads, and the SR generator if any member reads its faces; with `fold`, ready for
    inference (batch norms folded: Ensemble.fold_batch_norms)."""
    loaded = {}
    for name, (checkpoint, kind) in members.items():
        model, cfg, _ = model_from_checkpoint(checkpoint, device)
        check_member_input(name, checkpoint, cfg, kind, sr)
        loaded[name] = LoadedMember(model, cfg, kind)
    generator = None
    if any(member.input == "sr" for member in loaded.values()):
        from ferray.sr.engine import generator_from_checkpoint

        generator = generator_from_checkpoint(sr, device)[0]
    ensemble = Ensemble(loaded, generator, device=torch.device(device))
    if fold:
        ensemble.fold_batch_norms()
    return ensemble


INPUTS = ("face", "sr")


def check_member_input(name: str, checkpoint, cfg: ExperimentConfig, kind: str, sr) -> None:
    """A member reads what it was trained on: 48x48 faces (crop at most 48 after its own bicubic
    input_scale), or the SR generator's 96x96 faces (input_scale 1, and a generator given)."""
    if kind not in INPUTS:
        raise CheckpointError(f"member {name} ({checkpoint}): input {kind!r}; choose one of {', '.join(INPUTS)}")
    if kind == "sr":
        if sr is None:
            raise CheckpointError(f"member {name} ({checkpoint}) reads SR faces: give the SR generator (--sr)")
        if cfg.data.input_scale != 1:
            raise CheckpointError(
                f"member {name} ({checkpoint}) takes bicubic input (data.input_scale {cfg.data.input_scale}); "
                "it reads the 48x48 faces, not the SR generator's"
            )
    elif cfg.augment.crop > FER_SIZE * cfg.data.input_scale:
        raise CheckpointError(
            f"member {name} ({checkpoint}) was trained on larger faces (crop {cfg.augment.crop}): it reads the SR "
            "generator's faces; give it as an SR member (and the generator with --sr)"
        )


def member_input(cfg: ExperimentConfig, sr) -> str:
    """What a member trained with `cfg` reads, when its builder does not say: SR faces where its crop
    is larger than the 48x48 face it would otherwise get and a generator is given."""
    return "sr" if sr is not None and cfg.data.input_scale == 1 and cfg.augment.crop > FER_SIZE else "face"
