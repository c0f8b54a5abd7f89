"""The ensemble of Model A and Model B, its fitted fusion, and the serving bundle (Ray-free).

    fused = w * P_A(face) + (1 - w) * P_B(SR(face))

P_A: Model A on the 48x48 face (ten-crop TTA); P_B: Model B on the face upscaled 2x by the SR
generator (ten-crop TTA at 96/88). The weight w is fitted on PublicTest by a grid over [0, 1] in
steps of 0.01, maximizing accuracy (ties broken by log-loss), as the paper selects on PublicTest.
Two alternatives are measured and recorded in the model card: the same grid on log-probabilities
(logit averaging), and stacking (a logistic regression on both members' log-probabilities) whose
accuracy is estimated by 5-fold cross-validation on PublicTest, since fitting 105 weights on the
split it is scored on would flatter it.

A bundle is a folder: bundle.json (fusion, labels, members, measured accuracies), the three
checkpoints with only what inference needs (weights + config; loaded with weights_only=True), and
MODEL_CARD.md. `load_bundle` rebuilds everything from the folder alone.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ferray import __version__
from ferray.augment import predict_proba
from ferray.device import use_bf16
from ferray.config import ExperimentConfig
from ferray.data.contract import EMOTIONS, FER_SIZE, DataError, atomic_output, load_split, read_manifest
from ferray.engine import CheckpointError, load_checkpoint, model_from_checkpoint
from ferray.metrics import confusion_matrix, summarize_confusion
from ferray.models import num_params

BUNDLE_FORMAT = "ferray.bundle/1"
BUNDLE_FILE = "bundle.json"
GRID = np.linspace(0, 1, 101)


# ------------------------------------------------------------------------------------------- model
@dataclass
class Ensemble:
    """A and B with their fusion weight. Either member may be absent: a Serve replica loads one."""

    model_a: torch.nn.Module | None
    cfg_a: ExperimentConfig | None
    model_b: torch.nn.Module | None
    cfg_b: ExperimentConfig | None
    generator: torch.nn.Module | None  # None: B takes bicubic input (data.input_scale 2) or 96x96 faces as given
    weight_a: float = 0.5
    tta: bool = True
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def probs_a(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 48x48 faces (N, 48, 48) -> P_A (N, 7) on the CPU."""
        faces = self._check(faces).to(self.device)
        return predict_proba(self.model_a, faces, self.cfg_a.augment.crop, self.tta, self._amp,
                             self.cfg_a.data.input_scale).cpu()

    @torch.no_grad()
    def probs_b(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 48x48 faces (N, 48, 48) -> P_B (N, 7) on the CPU, through the SR generator if any."""
        faces = self._check(faces).to(self.device)
        crop, scale = self.cfg_b.augment.crop, self.cfg_b.data.input_scale
        if self.generator is not None:
            x = faces.float().unsqueeze(1) / 255.0
            faces = (self.generator(x).clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)  # as `sr upscale` writes it
            scale = 1
        return predict_proba(self.model_b, faces, crop, self.tta, self._amp, scale).cpu()

    def member_probs(self, faces: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_A, P_B) of (N, 48, 48) uint8 faces, in chunks of `batch`."""
        chunks = self._check(faces).split(batch)
        return torch.cat([self.probs_a(c) for c in chunks]), torch.cat([self.probs_b(c) for c in chunks])

    def fuse(self, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
        return self.weight_a * pa + (1 - self.weight_a) * pb

    def predict(self, faces: torch.Tensor) -> dict:
        pa, pb = self.member_probs(faces)
        return {"probs": self.fuse(pa, pb), "a": pa, "b": pb}

    @property
    def _amp(self) -> bool:
        return use_bf16(self.device)

    @staticmethod
    def _check(faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 3 or tuple(faces.shape[1:]) != (FER_SIZE, FER_SIZE) or faces.dtype != torch.uint8:
            raise ValueError(f"the ensemble takes (N, 48, 48) uint8 faces, got {tuple(faces.shape)} {faces.dtype}")
        return faces


# ------------------------------------------------------------------------------------------ fusion
def _score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    accuracy = float((probs.argmax(1) == labels).mean())
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return accuracy, nll


def fit_weight(pa: np.ndarray, pb: np.ndarray, labels: np.ndarray, log: bool = False) -> tuple[float, float]:
    """(w, accuracy) of the best grid weight for A in w * A + (1 - w) * B (of log-probs if `log`)."""
    best = (-1.0, np.inf, 0.5)
    for w in GRID:
        if log:
            fused = np.exp(w * np.log(np.clip(pa, 1e-12, None)) + (1 - w) * np.log(np.clip(pb, 1e-12, None)))
            fused /= fused.sum(1, keepdims=True)
        else:
            fused = w * pa + (1 - w) * pb
        accuracy, nll = _score(fused, labels)
        if (accuracy, -nll) > (best[0], -best[1]):
            best = (accuracy, nll, float(w))
    return best[2], best[0]


def stacking_cv_accuracy(pa: np.ndarray, pb: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a logistic regression on [log P_A, log P_B]."""
    features = torch.from_numpy(np.log(np.clip(np.concatenate([pa, pb], 1), 1e-12, None))).float()
    targets = torch.from_numpy(labels).long()
    order = np.random.default_rng(seed).permutation(len(labels))
    correct = 0
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        layer = torch.nn.Linear(features.shape[1], len(EMOTIONS))
        optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(layer(features[train]), targets[train]) + 1e-3 * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            correct += int((layer(features[fold]).argmax(1) == targets[fold]).sum())
    return correct / len(labels)


# ------------------------------------------------------------------------------------------ bundle
def _slim(payload: dict) -> dict:
    """What inference needs from a training checkpoint: weights, config, and the run's facts."""
    keep = ("format", "kind", "ferray_version", "config", "model", "epoch", "metrics", "pretrained", "content_loss")
    return {k: payload[k] for k in keep if k in payload}


def load_members(a: str | Path | None, b: str | Path | None, sr: str | Path | None, device) -> Ensemble:
    """The members named (None skips one), each checked to fit its place in the ensemble."""
    model_a = cfg_a = model_b = cfg_b = generator = None
    if a is not None:
        model_a, cfg_a, _ = model_from_checkpoint(a, device)
        if cfg_a.data.input_scale != 1 or cfg_a.augment.crop > FER_SIZE:
            raise CheckpointError(f"{a}: member A must take the 48x48 faces directly (it was trained with "
                                  f"input_scale {cfg_a.data.input_scale}, crop {cfg_a.augment.crop})")
    if b is not None:
        model_b, cfg_b, _ = model_from_checkpoint(b, device)
        if sr is not None:
            if cfg_b.data.input_scale != 1:
                raise CheckpointError(f"{b} takes bicubic input (data.input_scale {cfg_b.data.input_scale}); "
                                      "no SR generator with it")
            from ferray.sr.engine import generator_from_checkpoint

            generator = generator_from_checkpoint(sr, device)[0]
        elif cfg_b.data.input_scale == 1 and cfg_b.augment.crop > FER_SIZE:
            raise CheckpointError(f"{b} was trained on upscaled faces (crop {cfg_b.augment.crop}): "
                                  "give its SR checkpoint (--sr)")
    return Ensemble(model_a, cfg_a, model_b, cfg_b, generator, device=torch.device(device))


def build_bundle(a: str | Path, b: str | Path, sr: str | Path | None, data: str | Path, out: str | Path,
                 split: str = "PublicTest", tta: bool = True, overwrite: bool = False, echo=print,
                 probs: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Fit the fusion on `split` of `data` and write the serving bundle to `out`. `probs`: the
    members' (P_A, P_B) on that split with that TTA when already computed (`ferray report`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(f"{data}: the ensemble is fitted on the prepared 48x48 faces (B's SR input is made from them)")
    ensemble = load_members(a, b, sr, device)
    ensemble.tta = tta
    faces, labels, _ = load_split(data, split)
    if probs is None:
        echo(f"ensemble: members on {len(labels):,} {split} faces{' with ten-crop TTA' if tta else ''} ...")
        pa, pb = (p.numpy() for p in ensemble.member_probs(torch.from_numpy(faces)))
    else:
        pa, pb = probs
        if pa.shape != pb.shape or len(pa) != len(labels):
            raise ValueError(f"probs: shapes {pa.shape} and {pb.shape} for {len(labels)} {split} faces")
    weight, accuracy = fit_weight(pa, pb, labels)
    weight_log, accuracy_log = fit_weight(pa, pb, labels, log=True)
    stacking = stacking_cv_accuracy(pa, pb, labels)
    ensemble.weight_a = weight
    acc_a, acc_b = _score(pa, labels)[0], _score(pb, labels)[0]
    card = {
        "format": BUNDLE_FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ferray_version": __version__, "labels": list(EMOTIONS), "tta": tta,
        "fusion": {"method": "probability mean", "weight_a": weight, "fitted_on": split,
                   "how": "grid over w in [0, 1] step 0.01, max accuracy, ties by log-loss"},
        "accuracy": {split: {"ensemble": accuracy, "a": acc_a, "b": acc_b}},
        "alternatives": {"logit mean": {"weight_a": weight_log, "accuracy": accuracy_log},
                         "stacking (logistic regression, 5-fold CV)": {"accuracy": stacking}},
        "data": {"path": str(Path(data).absolute()), "checksum": manifest["checksum"]},
        "members": {
            "a": _member_card(ensemble.model_a, ensemble.cfg_a, a, "model_a.pt"),
            "b": _member_card(ensemble.model_b, ensemble.cfg_b, b, "model_b.pt"),
            "sr": None if sr is None else {"checkpoint": "sr.pt", "source": str(sr),
                                          "content_loss": load_checkpoint(sr, kind="sr").get("content_loss")},
        },
    }
    with atomic_output(out, overwrite=overwrite) as tmp:
        torch.save(_slim(load_checkpoint(a)), tmp / "model_a.pt")
        torch.save(_slim(load_checkpoint(b)), tmp / "model_b.pt")
        if sr is not None:
            torch.save(_slim(load_checkpoint(sr, kind="sr")), tmp / "sr.pt")
        (tmp / BUNDLE_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(model_card(card))
    echo(f"ensemble: w_A = {weight:.2f}; {split} accuracy A {acc_a:.2%}, B {acc_b:.2%}, ensemble {accuracy:.2%} "
         f"(logit mean {accuracy_log:.2%}, stacking {stacking:.2%} by 5-fold CV); bundle {out}")
    return card


def _member_card(model, cfg: ExperimentConfig, source, filename: str) -> dict:
    payload = load_checkpoint(source)
    return {"checkpoint": filename, "source": str(source), "model": cfg.model.name, "parameters": num_params(model),
            "depth": getattr(model, "keras_depth", lambda: None)(), "crop": cfg.augment.crop,
            "input_scale": cfg.data.input_scale, "pretrained": bool(payload.get("pretrained", False)),
            "trained_on": cfg.data.path, "epochs": payload["epoch"],
            "training_eval_accuracy": payload.get("metrics", {}).get("eval_acc")}


def model_card(card: dict) -> str:
    a, b, sr = card["members"]["a"], card["members"]["b"], card["members"]["sr"]
    split, acc = next(iter(card["accuracy"].items()))
    lines = [
        "# ferray model card", "",
        "Facial-expression recognition on 48x48 grayscale faces: 7 classes in FER2013 order "
        f"({', '.join(card['labels'])}).", "",
        "## Members", "",
        f"- **A**: `{a['model']}` ({a['parameters']:,} parameters, depth {a['depth']}), trained from "
        f"{'ImageNet weights' if a['pretrained'] else 'scratch'} on {a['trained_on']} for {a['epochs']} epochs; "
        f"input the 48x48 face, {a['crop']}x{a['crop']} crops.",
        f"- **B**: `{b['model']}` ({b['parameters']:,} parameters, depth {b['depth']}), "
        f"{'ImageNet-pretrained' if b['pretrained'] else 'trained from scratch (no pretrained weights were used)'}, "
        f"trained on {b['trained_on']} for {b['epochs']} epochs; input the face "
        + (f"upscaled 2x by the SR generator ({sr['content_loss']} content loss)" if sr else "upscaled 2x by bicubic")
        + f", {b['crop']}x{b['crop']} crops.",
        "", "## Fusion", "",
        f"{card['fusion']['method']}: P = {card['fusion']['weight_a']:.2f} * P_A + {1 - card['fusion']['weight_a']:.2f} * P_B, "
        f"fitted on {card['fusion']['fitted_on']} ({card['fusion']['how']}). "
        f"Test-time augmentation: {'ten crops, mirrored' if card['tta'] else 'none'}.", "",
        "## Measured accuracy", "",
        "| | accuracy |", "| --- | --- |",
        f"| A alone ({split}) | {acc['a']:.2%} |", f"| B alone ({split}) | {acc['b']:.2%} |",
        f"| ensemble ({split}, the split the weight was fitted on) | {acc['ensemble']:.2%} |",
    ]
    for name, alt in card["alternatives"].items():
        lines.append(f"| alternative: {name} | {alt['accuracy']:.2%} |")
    lines += ["", f"Data: {card['data']['path']} (checksum {card['data']['checksum']}).",
              "Figures on the split used for fitting are optimistic; report PrivateTest for a final number.", ""]
    return "\n".join(lines)


def load_bundle(path: str | Path, device: str | torch.device | None = None,
                members: tuple[str, ...] = ("a", "b")) -> tuple[Ensemble, dict]:
    """The ensemble of a bundle folder, from the folder alone (never a path a client names).
    `members` picks what to load: a Serve replica of Model A needs neither B nor the generator."""
    card = read_bundle_card(path)
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = card["members"]
    a = path / parts["a"]["checkpoint"] if "a" in members else None
    b = path / parts["b"]["checkpoint"] if "b" in members else None
    sr = path / parts["sr"]["checkpoint"] if "b" in members and parts.get("sr") else None
    ensemble = load_members(a, b, sr, device)
    ensemble.weight_a, ensemble.tta = card["fusion"]["weight_a"], card["tta"]
    return ensemble, card


def read_bundle_card(path: str | Path) -> dict:
    """bundle.json of a bundle folder, checked."""
    card_file = Path(path) / BUNDLE_FILE
    if not card_file.is_file():
        raise CheckpointError(f"{path}: not a ferray bundle (no {BUNDLE_FILE}); make one with `ferray ensemble`")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{card_file}: not valid JSON ({error})") from None
    if card.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{card_file}: format {card.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    return card


def evaluate_bundle(bundle: str | Path, data: str | Path, split: str = "PublicTest", out: str | Path | None = None,
                    echo=print, tta: bool | None = None) -> dict:
    """The ensemble's report on a split, with each member's accuracy beside it; `tta` None: as the
    bundle says (the fusion weight is the bundle's either way). Writes eval-<split>[-tta].{json,png}."""
    from ferray.evaluate import format_report

    ensemble, card = load_bundle(bundle)
    if tta is not None:
        ensemble.tta = tta
    faces, labels, _ = load_split(data, split)
    if faces.shape[1:] != (FER_SIZE, FER_SIZE):
        raise DataError(f"{data}: the bundle takes the prepared 48x48 faces, not {faces.shape[1]}x{faces.shape[2]}")
    pa, pb = (p.numpy() for p in ensemble.member_probs(torch.from_numpy(faces)))
    report = fused_report(pa, pb, labels, ensemble.weight_a, split, ensemble.tta, bundle)
    write_fused_report(report, Path(out) if out is not None else Path(bundle))
    echo(format_report(report))
    echo(f"members on {split}: A {report['members']['a']:.2%}, B {report['members']['b']:.2%}, "
         f"ensemble {report['accuracy']:.2%} (w_A = {ensemble.weight_a:.2f})")
    return report



def fused_report(pa: np.ndarray, pb: np.ndarray, labels: np.ndarray, weight_a: float, split: str, tta: bool,
                 bundle: str | Path) -> dict:
    """The ensemble's evaluation from its members' probabilities, each member's accuracy beside it."""
    reports = {name: summarize_confusion(confusion_matrix(labels, probs.argmax(1)))
               for name, probs in (("a", pa), ("b", pb), ("fused", weight_a * pa + (1 - weight_a) * pb))}
    return {**reports["fused"], "split": split, "tta": tta, "model": "ensemble (A + B)", "epoch": "-",
            "members": {"a": reports["a"]["accuracy"], "b": reports["b"]["accuracy"]}, "bundle": str(bundle),
            "weight_a": weight_a}


def write_fused_report(report: dict, out: Path) -> Path:
    """eval-<split>[-tta].json and .png (the normalized confusion matrix) in `out`."""
    from ferray.metrics import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"eval-{report['split']}" + ("-tta" if report["tta"] else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(report["confusion"], stem.with_suffix(".png"),
                   f"ensemble on {report['split']}{' (TTA)' if report['tta'] else ''}: {report['accuracy']:.2%}")
    return stem.with_suffix(".json")
