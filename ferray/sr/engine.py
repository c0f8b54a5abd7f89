"""The SRGAN engine: pixel-MSE pre-training, then adversarial training; PSNR/SSIM evaluation.

Batches are HR faces (uint8 (B, 48, 48)); each step makes the LR inputs by bicubic downscaling.
Plain PyTorch: the Ray Train loop (through SRTask) and the tests call these unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ferray import __version__
from ferray.config import ExperimentConfig, from_dict, to_dict
from ferray.device import fast_cuda_math
from ferray.engine import CHECKPOINT_FORMAT, EpochProgress, epoch_seed, load_checkpoint, unwrap
from ferray.sr.losses import ContentLoss, adversarial_loss, perceptual_loss, resolve_content
from ferray.sr.nets import Discriminator, Generator, GeneratorSpec, bicubic, make_lr
from ferray.sr.quality import psnr, ssim

SR_KIND = "sr"


def generator_spec(cfg: ExperimentConfig) -> GeneratorSpec:
    return GeneratorSpec(cfg.sr.generator_channels, cfg.sr.generator_blocks, cfg.sr.bicubic_skip)


@dataclass
class SRState:
    cfg: ExperimentConfig
    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    content: ContentLoss
    device: torch.device
    rank: int = 0
    epoch: int = 0
    best_psnr: float = 0.0
    history: list = field(default_factory=list)

    @property
    def core(self) -> nn.Module:
        return unwrap(self.generator)

    def phase(self) -> str:
        return "pretrain" if self.epoch < self.cfg.sr.pretrain_epochs else "adversarial"


def build_sr_state(
    cfg: ExperimentConfig, device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0
) -> SRState:
    torch.manual_seed(cfg.train.seed)
    fast_cuda_math(device)
    generator = Generator(generator_spec(cfg)).to(device)
    discriminator = Discriminator(cfg.sr.discriminator_channels).to(device)
    content = ContentLoss(cfg.sr, resolve_content(cfg.sr)).to(device)
    if cfg.train.channels_last:  # a CPU step of srgan_cpu's nets: ~1.9x faster pre-training, ~1.4x adversarial
        generator, discriminator, content = (
            net.to(memory_format=torch.channels_last) for net in (generator, discriminator, content)
        )
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.sr.lr_g, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.sr.lr_d, betas=(0.9, 0.999))
    if wrap is not None:
        generator, discriminator = wrap(generator), wrap(discriminator)
    return SRState(cfg, generator, discriminator, opt_g, opt_d, content, device, rank)


def judged_by_fixed(discriminator: nn.Module, sr: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits for the generator's step, with its weights out of the graph: the
    generator's backward then computes no discriminator gradients, and under DDP (the discriminator
    forwarded through its bare module) does not all-reduce them a second time."""
    core = unwrap(discriminator)
    core.requires_grad_(False)
    try:
        return core(sr)
    finally:
        core.requires_grad_(True)


def train_sr_epoch(state: SRState, batches: Iterable, steps_per_epoch: int = 0) -> dict:
    """One epoch: pixel MSE while pre-training, then the SRGAN losses for G and D."""
    g, d, device = state.generator, state.discriminator, state.device
    adversarial = state.phase() == "adversarial"
    g.train()
    d.train()
    torch.manual_seed(epoch_seed(state.cfg.train.seed, state.rank, state.epoch))
    totals = torch.zeros(4, device=device)  # pixel mse, content, g adversarial, d loss (x n)
    seen, t0 = 0, time.perf_counter()
    progress = EpochProgress(
        state.epoch + 1, state.cfg.train.epochs, steps_per_epoch, state.cfg.train.progress_seconds, state.rank
    )
    for step, (images, _) in enumerate(batches, 1):
        hr = images.to(device, non_blocking=True).float().unsqueeze(1) / 255.0  # (B, 1, 48, 48)
        if state.cfg.train.channels_last:
            hr = hr.contiguous(memory_format=torch.channels_last)
        lr = make_lr(hr)  # (B, 1, 24, 24)
        sr = g(lr)
        pixel = nn.functional.mse_loss(sr, hr)
        if adversarial:
            d_loss = adversarial_loss(d(hr), True) + adversarial_loss(d(sr.detach()), False)
            state.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            state.opt_d.step()
            content = state.content(sr, hr)
            fake_logits = judged_by_fixed(d, sr)
            g_loss = perceptual_loss(content, fake_logits, state.cfg.sr.adversarial_weight)
            g_adv = adversarial_loss(fake_logits.detach(), True)
        else:
            content, g_adv, d_loss = pixel, torch.zeros((), device=device), torch.zeros((), device=device)
            g_loss = pixel
        state.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        state.opt_g.step()
        n = hr.shape[0]
        totals += torch.stack([pixel.detach(), content.detach(), g_adv.detach(), d_loss.detach()]) * n
        seen += n
        progress.update(step, seen)
    if seen == 0:
        raise RuntimeError("the training data produced no batch")
    pixel, content, g_adv, d_loss = (totals / seen).tolist()
    seconds = time.perf_counter() - t0
    return {
        "phase": state.phase(),
        "train_pixel_mse": pixel,
        "train_content": content,
        "train_g_adv": g_adv,
        "train_d_loss": d_loss,
        "train_images": seen,
        "train_seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate_sr(generator: nn.Module, batches: Iterable, device: torch.device) -> dict:
    """PSNR and SSIM of SR and of bicubic (24 -> 48) against the real faces, and the gains."""
    was_training = generator.training
    generator.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    count = 0
    for images, _ in batches:
        hr = images.to(device).float().unsqueeze(1) / 255.0
        lr = make_lr(hr)
        sr = generator(lr).clamp(0, 1)
        base = bicubic(lr, 2).clamp(0, 1)
        sums += (
            torch.stack([psnr(sr, hr).sum(), ssim(sr, hr).sum(), psnr(base, hr).sum(), ssim(base, hr).sum()])
            .double()
            .cpu()
        )
        count += hr.shape[0]
    generator.train(was_training)
    if count == 0:
        raise RuntimeError("the evaluation data produced no batch")
    p, s, bp, bs = (sums / count).tolist()
    return {
        "psnr": p,
        "ssim": s,
        "bicubic_psnr": bp,
        "bicubic_ssim": bs,
        "psnr_gain": p - bp,
        "ssim_gain": s - bs,
        "samples": count,
    }


ADVERSARIAL_RANK = 1_000_000


def sr_choice(epoch: int, adversarial: bool) -> int:
    """The score the kept generator is chosen by: the last adversarial epoch, else the last epoch.
    Not PSNR: the pixel-MSE pre-training always has the best PSNR (adversarial training trades PSNR
    for texture), so choosing by PSNR would throw the SRGAN away and keep an SRResNet."""
    return epoch + (ADVERSARIAL_RANK if adversarial else 0)


def end_sr_epoch(state: SRState, train_metrics: dict, eval_metrics: dict) -> dict:
    adversarial = state.phase() == "adversarial"  # the phase of the epoch just trained
    state.epoch += 1
    improved = eval_metrics["psnr"] > state.best_psnr
    state.best_psnr = max(state.best_psnr, eval_metrics["psnr"])
    row = {
        "epoch": state.epoch,
        **train_metrics,
        **{f"eval_{k}": v for k, v in eval_metrics.items()},
        "best_eval_psnr": state.best_psnr,
        "improved": improved,
        "content_loss": state.content.kind,
        "sr_choice": sr_choice(state.epoch, adversarial),
    }
    state.history.append(row)
    return row


def save_sr_checkpoint(path: str | Path, state: SRState, metrics: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": SR_KIND,
        "ferray_version": __version__,
        "config": to_dict(state.cfg),
        "content_loss": state.content.kind,
        "model": {k: v.detach().cpu() for k, v in state.core.state_dict().items()},
        "discriminator": {k: v.detach().cpu() for k, v in unwrap(state.discriminator).state_dict().items()},
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "epoch": state.epoch,
        "best_psnr": state.best_psnr,
        "history": state.history,
        "metrics": metrics,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def restore_sr_state(state: SRState, payload: dict) -> None:
    state.core.load_state_dict(payload["model"])
    unwrap(state.discriminator).load_state_dict(payload["discriminator"])
    state.opt_g.load_state_dict(payload["opt_g"])
    state.opt_d.load_state_dict(payload["opt_d"])
    state.epoch, state.best_psnr, state.history = payload["epoch"], payload["best_psnr"], list(payload["history"])


def generator_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Generator, ExperimentConfig, dict]:
    """The SR generator of an `ferray sr train` checkpoint, in eval mode; CheckpointError otherwise."""
    payload = load_checkpoint(path, kind=SR_KIND)
    cfg = from_dict(payload["config"])
    generator = Generator(generator_spec(cfg))
    generator.load_state_dict(payload["model"])
    return generator.to(device).eval(), cfg, payload
