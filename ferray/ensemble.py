"""The ensemble of Model A and Model B, its fitted fusion, and the serving bundle (Ray-free).

    fused = w * P_A(face) + (1 - w) * P_B(SR(face))

P_A: Model A on the 48x48 face (ten-crop TTA); P_B: Model B on the face upscaled 2x by the SR
generator (ten-crop TTA at 96/88). The weight w is fitted on the selection split (Validation where
it was carved, PublicTest under FER2013's own protocol, as the paper selects) by a grid over [0, 1]
in steps of 0.01, maximizing accuracy (ties broken by log-loss). Two alternatives are measured on
the same split and recorded in the model card: the same grid on log-probabilities (logit
averaging), and stacking (a logistic regression on both members' log-probabilities) whose accuracy
is estimated by 5-fold cross-validation, since fitting 105 weights on the split it is scored on
would flatter it.

A bundle is a folder: bundle.json (fusion, labels, members, measured accuracies), the three
checkpoints with only what inference needs (weights + config; loaded with weights_only=True), and
MODEL_CARD.md. `load_bundle` rebuilds everything from the folder alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ferray import __version__
from ferray.augment import predict_proba
from ferray.config import ExperimentConfig
from ferray.data.contract import (
    EMOTIONS,
    FER_SIZE,
    DataError,
    atomic_output,
    load_split,
    read_manifest,
    selection_split,
    untouched_splits,
)
from ferray.device import default_device, use_bf16
from ferray.engine import CheckpointError, load_checkpoint, model_from_checkpoint
from ferray.metrics import confusion_matrix, summarize_confusion
from ferray.models import num_params
from ferray.models.folding import fold_batch_norms
from ferray.models.frozen import freeze_for_cpu
from ferray.runs import RUN_FILES

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
    bf16: bool | None = None  # None: where it is fast (ferray.device.use_bf16); False forces fp32
    # int8 CPU inference (ferray.models.quantized) for the members calibrated in `int8_ranges`
    # (member name -> its activation ranges, from the bundle's `ferray quantize`); off unless asked for
    int8: bool = False
    int8_ranges: dict = field(default_factory=dict, repr=False, compare=False)
    # bf16 CPU inference forwards frozen bf16 copies of the members (ferray.models.frozen), int8 their int8
    # copies, made on first use: (member name, int8) -> (the member it was made from, its copy)
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
            x = faces.float().unsqueeze(1) / 255.0
            faces = (
                (self.generator(x).clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)
            )  # as `sr upscale` writes it
            scale = 1
        model, autocast = self.runner("b")
        return predict_proba(model, faces, crop, self.tta, autocast, scale).cpu()

    def runner(self, which: str) -> tuple[torch.nn.Module, bool]:
        """(the module that forwards member `which`, whether it needs bf16 autocast). In bf16 on a CPU,
        a frozen bf16 copy of the member (made once, on first use; it runs in bf16 by itself); else the
        member itself, under autocast where bf16 is used (CUDA)."""
        model, cfg = (self.model_a, self.cfg_a) if which == "a" else (self.model_b, self.cfg_b)
        int8 = self.int8 and which in self.int8_ranges  # a member that was not calibrated runs as it would
        if not int8 and (not self._amp or self.device.type != "cpu"):
            return model, self._amp
        with self._freezing:  # Serve replicas forward from executor threads
            source, copy = self._frozen.get((which, int8), (None, None))
            if source is not model:  # first use, or the member was replaced since
                crop = cfg.augment.crop  # the views it is given
                copy = self._int8_copy(which, model, crop) if int8 else freeze_for_cpu(model, crop)
                self._frozen[which, int8] = (model, copy)
        return copy, False

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

    def fuse(self, pa: torch.Tensor, pb: torch.Tensor | None) -> torch.Tensor:
        return fuse(pa, pb, self.weight_a)

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
def fuse(pa, pb, weight_a: float):
    """w * P_A + (1 - w) * P_B; P_A itself where there is no B (a bundle of one member)."""
    return pa if pb is None else weight_a * pa + (1 - weight_a) * pb


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

        def closure(layer=layer, optimizer=optimizer, train=train):  # bound now: LBFGS calls it in this fold
            optimizer.zero_grad()
            loss = (
                torch.nn.functional.cross_entropy(layer(features[train]), targets[train])
                + 1e-3 * layer.weight.pow(2).sum()
            )
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            correct += int((layer(features[fold]).argmax(1) == targets[fold]).sum())
    return correct / len(labels)


# ------------------------------------------------------------------------------------------ bundle
def _slim(payload: dict) -> dict:
    """What inference needs from a training checkpoint: weights (in half precision: a bundle ships
    inside the package, and fp16 weights classify as fp32 ones do), config, and the run's facts."""
    keep = (
        "format",
        "kind",
        "ferray_version",
        "config",
        "model",
        "weights",
        "epoch",
        "metrics",
        "pretrained",
        "content_loss",
    )
    slim = {k: payload[k] for k in keep if k in payload}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["model"].items()}
    return slim


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


def bundle_selection_split(cfg_a: ExperimentConfig, manifest: dict, data) -> str:
    """The split a bundle's fusion is fitted on: the one member A was selected on when the data has
    it (the same faces, so nothing else is touched), else the data's own selection split."""
    chosen = cfg_a.data.selection_split
    return chosen if chosen in manifest["splits"] else selection_split(manifest, "auto", str(data))


def fit_fusion(pa: np.ndarray, pb: np.ndarray | None, labels: np.ndarray, split: str) -> tuple[dict, dict]:
    """(fusion, alternatives) on the selection split; a bundle of A alone has nothing to fit."""
    if pb is None:
        return {"method": "single model (A)", "weight_a": 1.0, "fitted_on": None, "how": "nothing to fit"}, {}
    weight, _ = fit_weight(pa, pb, labels)
    weight_log, accuracy_log = fit_weight(pa, pb, labels, log=True)
    fusion = {
        "method": "probability mean",
        "weight_a": weight,
        "fitted_on": split,
        "how": "grid over w in [0, 1] step 0.01, max accuracy, ties by log-loss",
    }
    alternatives = {
        "logit mean": {"weight_a": weight_log, "accuracy": accuracy_log},
        "stacking (logistic regression, 5-fold CV)": {"accuracy": stacking_cv_accuracy(pa, pb, labels)},
    }
    return fusion, alternatives


def member_accuracies(pa: np.ndarray, pb: np.ndarray | None, labels: np.ndarray, weight_a: float) -> dict:
    accuracies = {"ensemble": _score(fuse(pa, pb, weight_a), labels)[0], "a": _score(pa, labels)[0]}
    if pb is not None:
        accuracies["b"] = _score(pb, labels)[0]
    return accuracies


def evaluate_views(
    ensemble: Ensemble, data, splits: list[str], selection: str, known: dict | None = None, echo=print
) -> dict:
    """Every split x {center crop, ten-crop TTA}: the fused report with each member's accuracy, the
    selection split marked as such. `known`: {(split, tta): (P_A, P_B)} already computed."""
    known = dict(known or {})
    evaluations = {}
    for split in splits:
        faces, labels, _ = load_split(data, split)
        evaluations[split] = {"selection": split == selection, "views": {}}
        for tta in (False, True):
            if (split, tta) not in known:
                echo(f"ensemble: {split} ({len(labels):,} faces){' with ten-crop TTA' if tta else ''} ...")
                ensemble.tta = tta
                known[split, tta] = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
            pa, pb = known[split, tta]
            report = summarize_confusion(confusion_matrix(labels, fuse(pa, pb, ensemble.weight_a).argmax(1)))
            report["members"] = member_accuracies(pa, pb, labels, ensemble.weight_a)
            evaluations[split]["views"]["tta" if tta else "center"] = report
    return evaluations


def _numpy(pair) -> tuple[np.ndarray, np.ndarray | None]:
    pa, pb = pair
    return pa.numpy(), None if pb is None else pb.numpy()


def build_bundle(
    a: str | Path,
    b: str | Path | None,
    sr: str | Path | None,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    tta: bool = True,
    overwrite: bool = False,
    echo=print,
    probs: tuple[np.ndarray, np.ndarray] | None = None,
    tests: bool = True,
) -> dict:
    """Fit the fusion on the selection split of `data` (`split`, else the one A was selected on) and
    write the serving bundle to `out`; with `tests`, also evaluate every split that neither trained
    nor selected (center crop and TTA: the figures of the model card). `b` None: a bundle of A alone.
    `probs`: the members' (P_A, P_B) on the selection split with that TTA, when already computed."""
    device = default_device()
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(f"{data}: the ensemble is fitted on the prepared 48x48 faces (B's SR input is made from them)")
    ensemble = load_members(a, b, sr, device, fold=False)
    member_cards = {  # the members as trained (their parameter counts), before folding for the evaluations
        "a": _member_card(ensemble.model_a, ensemble.cfg_a, a, "model_a.pt"),
        "b": None if b is None else _member_card(ensemble.model_b, ensemble.cfg_b, b, "model_b.pt"),
        "sr": None
        if sr is None
        else {
            "checkpoint": "sr.pt",
            "source": str(sr),
            "content_loss": load_checkpoint(sr, kind="sr").get("content_loss"),
        },
    }
    ensemble.fold_batch_norms()
    split = split or bundle_selection_split(ensemble.cfg_a, manifest, data)
    faces, labels, _ = load_split(data, split)
    if probs is None:
        echo(f"ensemble: members on {len(labels):,} {split} (selection) faces{' with ten-crop TTA' if tta else ''} ...")
        ensemble.tta = tta
        probs = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
    pa, pb = probs
    if (pb is not None and pa.shape != pb.shape) or len(pa) != len(labels):
        raise ValueError(
            f"probs: shapes {pa.shape} and {None if pb is None else pb.shape} for {len(labels)} {split} faces"
        )
    fusion, alternatives = fit_fusion(pa, pb, labels, split)
    ensemble.weight_a = fusion["weight_a"]
    accuracy = member_accuracies(pa, pb, labels, ensemble.weight_a)
    splits = [split] + (untouched_splits(manifest, split, ensemble.cfg_a.data.train_split) if tests else [])
    evaluations = evaluate_views(ensemble, data, splits, split, {(split, tta): (pa, pb)}, echo) if tests else {}
    card = {
        "format": BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ferray_version": __version__,
        "labels": list(EMOTIONS),
        "tta": tta,
        "selection_split": split,
        "fusion": fusion,
        "accuracy": {split: accuracy},
        "alternatives": alternatives,
        "evaluations": evaluations,
        "data": {"path": str(Path(data).absolute()), "checksum": manifest["checksum"], "splits": manifest["splits"]},
        "members": member_cards,
    }
    _write_bundle(out, card, a, b, sr, overwrite)
    members = f"A {accuracy['a']:.2%}" + (f", B {accuracy['b']:.2%}" if b is not None else "")
    fused = (
        f"; w_A = {fusion['weight_a']:.2f}, ensemble {accuracy['ensemble']:.2%} (logit mean "
        f"{alternatives['logit mean']['accuracy']:.2%}, stacking "
        f"{alternatives['stacking (logistic regression, 5-fold CV)']['accuracy']:.2%} by 5-fold CV)"
        if b
        else ""
    )
    echo(f"ensemble: {split} (selection) accuracy {members}{fused}; bundle {out}")
    for name in splits[1:]:
        view = evaluations[name]["views"]["tta" if tta else "center"]
        echo(f"ensemble: {name} (test) accuracy {view['accuracy']:.2%}{' with TTA' if tta else ''}")
    return card


def _write_bundle(out, card: dict, a, b, sr, overwrite: bool) -> None:
    from ferray.metrics import plot_confusion

    with atomic_output(out, overwrite=overwrite, kind="bundle") as tmp:
        torch.save(_slim(load_checkpoint(a)), tmp / "model_a.pt")
        _copy_run_files(Path(a).parent, tmp / "run_a")
        if b is not None:
            torch.save(_slim(load_checkpoint(b)), tmp / "model_b.pt")
            _copy_run_files(Path(b).parent, tmp / "run_b")
        if sr is not None:
            torch.save(_slim(load_checkpoint(sr, kind="sr")), tmp / "sr.pt")
        view = "tta" if card["tta"] else "center"
        for split, evaluation in card["evaluations"].items():
            report = evaluation["views"][view]
            role = "selection" if evaluation["selection"] else "test"
            plot_confusion(
                report["confusion"],
                tmp / f"confusion-{split}.png",
                f"{split} ({role}){' TTA' if card['tta'] else ''}: {report['accuracy']:.2%}",
            )
        (tmp / BUNDLE_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(model_card(card))


def _copy_run_files(run_dir: Path, into: Path) -> None:
    """The member's own record of its training (config, per-epoch metrics, result, machine), kept in
    the bundle so that its model card can be checked against the files it was written from."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if found:
        into.mkdir()
        for path in found:
            (into / path.name).write_bytes(path.read_bytes())


def _member_card(model, cfg: ExperimentConfig, source, filename: str) -> dict:
    payload = load_checkpoint(source)
    return {
        "checkpoint": filename,
        "source": str(source),
        "model": cfg.model.name,
        "parameters": num_params(model),
        "depth": getattr(model, "keras_depth", lambda: None)(),
        "crop": cfg.augment.crop,
        "input_scale": cfg.data.input_scale,
        "pretrained": bool(payload.get("pretrained", False)),
        "trained_on": cfg.data.path,
        "epochs": payload["epoch"],
        "selection_split": cfg.data.selection_split,
        "weights": payload.get("weights", "raw"),
        "selection_accuracy": payload.get("metrics", {}).get("eval_acc"),
        "run": run_facts(source),
    }


def run_facts(checkpoint) -> dict | None:
    """What the member's run recorded about itself (RUN/result.json beside RUN/best.pt), if it is there."""
    from ferray.runs import read_record

    record = read_record(Path(checkpoint).parent)
    if record is None:
        return None
    facts = record.to_dict()
    keep = (
        "name",
        "best_epoch",
        "epochs",
        "seconds",
        "train_seconds",
        "workers",
        "gpus_per_worker",
        "machine",
        "commit",
        "data_checksum",
        "budget_minutes",
        "images_per_s",
    )
    return {k: facts[k] for k in keep if k in facts}


def model_card(card: dict) -> str:
    """MODEL_CARD.md, written from bundle.json alone (so the two never disagree)."""
    from ferray.report.model_card import render_model_card

    return render_model_card(card)


DEFAULT_BUNDLE = "default"


def default_bundle_path() -> Path:
    """The bundle that ships inside the package: Model A trained on FER2013 (see its MODEL_CARD.md)."""
    return Path(__file__).resolve().parent / "bundles" / DEFAULT_BUNDLE


def resolve_bundle(path: str | Path | None) -> Path:
    """A bundle folder; None or "default" is the one that ships with ferray."""
    if path is None or str(path) == DEFAULT_BUNDLE:
        return default_bundle_path()
    return Path(path)


def load_bundle(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    members: tuple[str, ...] = ("a", "b"),
    fold: bool = True,
    int8: bool = False,
) -> tuple[Ensemble, dict]:
    """The ensemble of a bundle folder (None: the default one), from the folder alone (never a path a
    client names). `members` picks what to load: a Serve replica of Model A needs neither B nor the
    generator. `fold`: batch norms folded for inference (False: the models exactly as trained).
    `int8`: forward in int8 on the CPU (the bundle must be calibrated: `ferray quantize`)."""
    path = resolve_bundle(path)
    card = read_bundle_card(path)
    device = torch.device(device) if device else default_device()
    parts = card["members"]
    a = path / parts["a"]["checkpoint"] if "a" in members else None
    b = path / parts["b"]["checkpoint"] if "b" in members and parts.get("b") else None
    sr = path / parts["sr"]["checkpoint"] if b is not None and parts.get("sr") else None
    ensemble = load_members(a, b, sr, device, fold)
    ensemble.weight_a, ensemble.tta = card["fusion"]["weight_a"], card["tta"]
    ensemble.int8 = int8
    if not int8:  # the ranges are read only where they are used
        return ensemble, card
    for name in members:
        ranges = (parts.get(name) or {}).get("int8", {}).get("ranges")
        if ranges:
            ensemble.int8_ranges[name] = _read_json(path / ranges, "int8 calibration")
    if not ensemble.int8_ranges:
        from ferray.models.quantized import Int8Unavailable

        loaded = " or ".join(m.upper() for m in members if parts.get(m))
        raise Int8Unavailable(
            f"{path}: int8 asked for, but member {loaded} has no int8 calibration: make one with "
            f"`ferray quantize {path} --data DIR`"
        )
    return ensemble, card


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the bundle names this {what} file but it is missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def bundle_members(card: dict) -> tuple[str, ...]:
    """The members a bundle holds: ("a", "b"), or ("a",) for a bundle of Model A alone."""
    return ("a", "b") if card["members"].get("b") else ("a",)


def read_bundle_card(path: str | Path | None) -> dict:
    """bundle.json of a bundle folder (None or "default": the one that ships), checked."""
    path = resolve_bundle(path)
    card_file = path / BUNDLE_FILE
    if not card_file.is_file():
        hint = (
            "the default bundle is missing from this installation"
            if path == default_bundle_path()
            else "make one with `ferray ensemble`"
        )
        raise CheckpointError(f"{path}: not a ferray bundle (no {BUNDLE_FILE}); {hint}")
    card = _read_json(card_file, "bundle card")
    if card.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{card_file}: format {card.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    return card


def evaluate_bundle(
    bundle: str | Path | None,
    data: str | Path,
    split: str = "PublicTest",
    out: str | Path | None = None,
    echo=print,
    tta: bool | None = None,
    int8: bool = False,
) -> dict:
    """The ensemble's report on a split, with each member's accuracy beside it; `tta` None: as the
    bundle says (the fusion weight is the bundle's either way). With `out`, writes
    eval-<split>[-tta].{json,png} there (never into the bundle: it may be the installed default)."""
    from ferray.evaluate import format_report

    ensemble, card = load_bundle(bundle, int8=int8)
    if tta is not None:
        ensemble.tta = tta
    faces, labels, _ = load_split(data, split)
    if faces.shape[1:] != (FER_SIZE, FER_SIZE):
        raise DataError(f"{data}: the bundle takes the prepared 48x48 faces, not {faces.shape[1]}x{faces.shape[2]}")
    pa, pb = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
    report = fused_report(pa, pb, labels, ensemble.weight_a, split, ensemble.tta, resolve_bundle(bundle))
    report["precision"] = _precision(ensemble, "a")
    report["selection_split"] = card.get("selection_split")
    report["selection"] = (
        split == card.get("selection_split") and read_manifest(data)["checksum"] == card["data"]["checksum"]
    )
    if out is not None:
        echo(f"wrote {write_fused_report(report, Path(out))}")
    echo(format_report(report))
    members = ", ".join(f"{name.upper()} {acc:.2%}" for name, acc in report["members"].items())
    echo(
        f"members on {split}: {members}, ensemble {report['accuracy']:.2%} (w_A = {ensemble.weight_a:.2f}; "
        f"A forwarded in {report['precision']})"
        + ("  [the bundle's selection split: not a test]" if report["selection"] else "")
    )
    return report


def _precision(ensemble: Ensemble, which: str) -> str:
    """How member `which` was forwarded: the copy's own account (frozen bf16, int8), else fp32 or autocast."""
    runner, autocast = ensemble.runner(which)
    return getattr(runner, "how", "bf16 autocast" if autocast else "fp32")


def fused_report(
    pa: np.ndarray,
    pb: np.ndarray | None,
    labels: np.ndarray,
    weight_a: float,
    split: str,
    tta: bool,
    bundle: str | Path,
) -> dict:
    """The ensemble's evaluation from its members' probabilities, each member's accuracy beside it."""
    report = summarize_confusion(confusion_matrix(labels, fuse(pa, pb, weight_a).argmax(1)))
    members = {"a": _score(pa, labels)[0]} | ({"b": _score(pb, labels)[0]} if pb is not None else {})
    return {
        **report,
        "split": split,
        "tta": tta,
        "model": "ensemble (A + B)" if pb is not None else "Model A",
        "epoch": "-",
        "members": members,
        "bundle": str(bundle),
        "weight_a": weight_a,
    }


def write_fused_report(report: dict, out: Path) -> Path:
    """eval-<split>[-tta][-int8].json and .png (the normalized confusion matrix) in `out`."""
    from ferray.metrics import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    int8 = report.get("precision", "").startswith("int8")
    stem = out / (f"eval-{report['split']}" + ("-tta" if report["tta"] else "") + ("-int8" if int8 else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(
        report["confusion"],
        stem.with_suffix(".png"),
        f"{report['model']} on {report['split']}{' (TTA)' if report['tta'] else ''}: {report['accuracy']:.2%}",
    )
    return stem.with_suffix(".json")
