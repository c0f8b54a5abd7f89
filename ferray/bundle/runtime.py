"""The ensemble at inference: Model A and Model B (behind its SR generator) with their fusion weight,
forwarded on the CPU through frozen (bf16 or fp32) or int8 copies (Ray-free).

    fused = w * P_A(face) + (1 - w) * P_B(SR(face))

P_A: Model A on the 48x48 face (ten-crop TTA); P_B: Model B on the face upscaled 2x by the SR
generator (ten-crop TTA at 96/88). Either member may be absent: a Serve replica loads one.
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
class Ensemble:
    """A and B with their fusion weight. Either member may be absent: a Serve replica loads one."""

    model_a: torch.nn.Module | None
    cfg_a: ExperimentConfig | None
    model_b: torch.nn.Module | None
    cfg_b: ExperimentConfig | None
    generator: torch.nn.Module | None  # None: B takes bicubic input (data.input_scale 2) or 96x96 faces as given
    weight_a: float = 0.5
    temperature: float = 1.0  # of the fused output (ferray.bundle.fusion.fit_temperature)
    tta: bool = True
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

    @torch.no_grad()
    def probs_a(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 48x48 faces (N, 48, 48) -> P_A (N, 7) on the CPU."""
        faces = self._check(faces).to(self.device)
        model, autocast = self.runner("a")
        return predict_proba(
            model, faces, self.cfg_a.augment.crop, self.tta, autocast, self.cfg_a.data.input_scale
        ).cpu()

    @torch.no_grad()
    def probs_b(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 48x48 faces (N, 48, 48) -> P_B (N, 7) on the CPU, through the SR generator if any."""
        faces = self._check(faces).to(self.device)
        crop, scale = self.cfg_b.augment.crop, self.cfg_b.data.input_scale
        if self.generator is not None:
            faces, scale = self.upscale(faces), 1
        model, autocast = self.runner("b")
        return predict_proba(model, faces, crop, self.tta, autocast, scale).cpu()

    @torch.no_grad()
    def upscale(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 faces (N, 48, 48) on self.device -> the generator's uint8 (N, 96, 96), rounded as
        `sr upscale` writes them (on the CPU both run the generator's frozen fp32 copy)."""
        generator = self.generator
        if self.freeze and self.device.type == "cpu":  # fp32 whatever the CPU: its pixels are what B was trained on
            generator = self._copy("sr", generator, FER_SIZE, "float32")
        return generated_faces(generator, faces)

    def runner(self, which: str) -> tuple[torch.nn.Module, bool]:
        """(the module that forwards member `which`, whether it needs bf16 autocast). In bf16 on a CPU,
        a frozen bf16 copy of the member (made once, on first use; it runs in bf16 by itself), or its
        int8 copy; else the member itself, under autocast where bf16 is used (CUDA)."""
        model, cfg = (self.model_a, self.cfg_a) if which == "a" else (self.model_b, self.cfg_b)
        int8 = self.int8 and which in self.int8_ranges  # a member that was not calibrated runs as it would
        if not int8 and (not self._amp or not self.freeze or self.device.type != "cpu"):
            return model, self._amp
        return self._copy(which, model, cfg.augment.crop, "int8" if int8 else "bfloat16"), False  # crop x crop views

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

    def warm_up(self, which: str) -> None:
        """Make now what member `which` forwards (a frozen or int8 copy; int8 compiles each batch
        shape it uses), so that no request pays for it."""
        runner, _ = self.runner(which)
        if hasattr(runner, "warm_up"):
            runner.warm_up()
        (self.probs_a if which == "a" else self.probs_b)(torch.zeros(1, FER_SIZE, FER_SIZE, dtype=torch.uint8))

    def member_probs(self, faces: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P_A, P_B) of (N, 48, 48) uint8 faces, in chunks of `batch`; P_B is None in a bundle of A alone."""
        chunks = self._check(faces).split(batch)
        pa = torch.cat([self.probs_a(c) for c in chunks])
        return pa, (torch.cat([self.probs_b(c) for c in chunks]) if self.model_b is not None else None)

    @property
    def rule(self) -> FusionRule:
        """The fusion weight and temperature that make the served probabilities."""
        return FusionRule(self.weight_a, self.temperature)

    def fuse(self, pa: torch.Tensor, pb: torch.Tensor | None) -> torch.Tensor:
        return self.rule(pa, pb)

    def fold_batch_norms(self) -> None:
        """Fold the classifiers' batch norms into their convolutions (same answers, a faster forward;
        ferray.models.folding). Not the SR generator: its output is rounded to uint8 pixels, and
        the classifiers were trained on exactly those pixels."""
        for model in (self.model_a, self.model_b):
            if model is not None:
                fold_batch_norms(model)

    def predict(self, faces: torch.Tensor) -> dict:
        pa, pb = self.member_probs(faces)
        return {"probs": self.fuse(pa, pb), "a": pa, "b": pb}

    @property
    def _amp(self) -> bool:
        return use_bf16(self.device) if self.bf16 is None else self.bf16

    @staticmethod
    def _check(faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 3 or tuple(faces.shape[1:]) != (FER_SIZE, FER_SIZE) or faces.dtype != torch.uint8:
            raise ValueError(f"the ensemble takes (N, 48, 48) uint8 faces, got {tuple(faces.shape)} {faces.dtype}")
        return faces


# ------------------------------------------------------------------------------------------ fusion


def load_members(
    a: str | Path | None, b: str | Path | None, sr: str | Path | None, device, fold: bool = True
) -> Ensemble:
    """The members named (None skips one), each checked to fit its place in the ensemble; with
    `fold`, ready for inference (batch norms folded: Ensemble.fold_batch_norms)."""
    model_a = cfg_a = model_b = cfg_b = generator = None
    if a is not None:
        model_a, cfg_a, _ = model_from_checkpoint(a, device)
        if cfg_a.data.input_scale != 1 or cfg_a.augment.crop > FER_SIZE:
            raise CheckpointError(
                f"{a}: member A must take the 48x48 faces directly (it was trained with "
                f"input_scale {cfg_a.data.input_scale}, crop {cfg_a.augment.crop})"
            )
    if b is not None:
        model_b, cfg_b, _ = model_from_checkpoint(b, device)
        if sr is not None:
            if cfg_b.data.input_scale != 1:
                raise CheckpointError(
                    f"{b} takes bicubic input (data.input_scale {cfg_b.data.input_scale}); no SR generator with it"
                )
            from ferray.sr.engine import generator_from_checkpoint

            generator = generator_from_checkpoint(sr, device)[0]
        elif cfg_b.data.input_scale == 1 and cfg_b.augment.crop > FER_SIZE:
            raise CheckpointError(
                f"{b} was trained on upscaled faces (crop {cfg_b.augment.crop}): give its SR checkpoint (--sr)"
            )
    elif sr is not None:
        raise CheckpointError(f"{sr}: an SR generator feeds Model B; give B's checkpoint too (--b)")
    ensemble = Ensemble(model_a, cfg_a, model_b, cfg_b, generator, device=torch.device(device))
    if fold:
        ensemble.fold_batch_norms()
    return ensemble
