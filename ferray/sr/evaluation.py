"""`ferray sr eval`: PSNR/SSIM of SR against bicubic at 24 -> 48, and a Figure-2-style grid."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ferray.data.contract import load_split
from ferray.device import default_device
from ferray.engine import TensorBatches
from ferray.sr.engine import evaluate_sr, generator_from_checkpoint
from ferray.sr.nets import bicubic, make_lr

log = logging.getLogger(__name__)


def evaluate_generator(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "PublicTest",
    out: str | Path | None = None,
    faces: int = 6,
) -> dict:
    device = default_device()
    generator, cfg, payload = generator_from_checkpoint(checkpoint, device)
    images, _, _ = load_split(data, split)
    if images.shape[1:] != (48, 48):
        from ferray.data.contract import DataError

        raise DataError(f"{data}: {images.shape[1]}x{images.shape[2]} faces; SR evaluation needs the 48x48 data")
    out = Path(out) if out is not None else Path(checkpoint).parent
    result, figure = sr_report(generator, images, split, out, faces, device)
    result.update(
        {
            "checkpoint": str(checkpoint),
            "data": str(data),
            "epoch": payload["epoch"],
            "content_loss": payload["content_loss"],
        }
    )
    (out / f"sr-eval-{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        f"SR x2 (epoch {payload['epoch']}, content loss {payload['content_loss']}) on {split}, 24 -> 48, "
        f"{result['samples']:,} faces:\n"
        f"  PSNR {result['psnr']:.2f} dB vs bicubic {result['bicubic_psnr']:.2f} dB ({result['psnr_gain']:+.2f} dB)\n"
        f"  SSIM {result['ssim']:.4f} vs bicubic {result['bicubic_ssim']:.4f} ({result['ssim_gain']:+.4f})\n"
        f"wrote {out / f'sr-eval-{split}.json'} and {figure}"
    )
    return result


def sr_report(generator, images: np.ndarray, split: str, out: Path, faces: int, device) -> tuple[dict, Path]:
    """PSNR/SSIM of SR and bicubic on 48x48 faces in memory, and the grid of `faces` of them."""
    labels = torch.zeros(len(images), dtype=torch.long)
    batches = TensorBatches(torch.from_numpy(images), labels, 256, shuffle=False, drop_last=False)
    result = {**evaluate_sr(generator, batches, device), "split": split}
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_sr_grid(
        generator, images[np.linspace(0, len(images) - 1, faces).astype(int)], device, out / f"sr-grid-{split}.png"
    )
    return result, figure


@torch.no_grad()
def plot_sr_grid(generator, faces: np.ndarray, device, path: Path) -> Path:
    """Rows of faces; columns LR (24x24), bicubic, SR and HR (48x48), like the paper's Figure 2."""
    from ferray.plotting import pyplot, save

    plt = pyplot()

    hr = torch.from_numpy(faces).float().unsqueeze(1).to(device) / 255.0
    lr = make_lr(hr)
    columns = {
        "LR 24x24": lr,
        "bicubic": bicubic(lr, 2).clamp(0, 1),
        "SR (ours)": generator(lr).clamp(0, 1),
        "HR 48x48": hr,
    }
    fig, axes = plt.subplots(len(faces), 4, figsize=(6, 1.6 * len(faces)))
    for j, (title, batch) in enumerate(columns.items()):
        for i in range(len(faces)):
            ax = axes[i, j]
            ax.imshow(batch[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    return save(fig, path, dpi=110)
