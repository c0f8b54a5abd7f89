"""Fitting the fusion of A and B on the selection split (Ray-free).

The weight w of `P = w * P_A + (1 - w) * P_B` is fitted on the selection split (Validation where it
was carved, PublicTest under FER2013's own protocol, as the paper selects) by a grid over [0, 1] in
steps of 0.01, maximizing accuracy (ties broken by log-loss). Two alternatives are measured on the
same split and recorded in the model card: the same grid on log-probabilities (logit averaging),
and stacking (a logistic regression on both members' log-probabilities) whose accuracy is
estimated by 5-fold cross-validation, since fitting 105 weights on the split it is scored on would
flatter it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ferray.bundle.card import Fusion
from ferray.labels import EMOTIONS

GRID = np.linspace(0, 1, 101)
TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(5.0), 481))  # steps of under 1%
ECE_BINS = 15
TEMPERATURE_HOW = "then the temperature of the fused output: min log-loss over T in [0.2, 5]"


def fuse(pa, pb, weight_a: float):
    """w * P_A + (1 - w) * P_B; P_A itself where there is no B (a bundle of one member)."""
    return pa if pb is None else weight_a * pa + (1 - weight_a) * pb


def calibrate(probs, temperature: float):
    """P^(1/T), renormalized per row (numpy or torch); T = 1 gives P back unchanged."""
    if temperature == 1.0:
        return probs
    if isinstance(probs, torch.Tensor):
        scaled = probs.clamp_min(1e-12) ** (1.0 / temperature)
        return scaled / scaled.sum(-1, keepdim=True)
    scaled = np.clip(probs, 1e-12, None) ** (1.0 / temperature)
    return scaled / scaled.sum(-1, keepdims=True)


@dataclass(frozen=True)
class FusionRule:
    """How the served probabilities are made from the members': w * P_A + (1 - w) * P_B, then
    the temperature. Every answer (the API, `ferray predict`, evaluations) goes through one."""

    weight_a: float = 1.0
    temperature: float = 1.0

    def __call__(self, pa, pb):
        return calibrate(fuse(pa, pb, self.weight_a), self.temperature)


def rule_of(fusion: Fusion, members: tuple[str, ...] = ("a", "b")) -> FusionRule:
    """The rule of a bundle's answers from `members`: the fitted fusion and its temperature, or,
    for Model A alone, P_A at A's own temperature."""
    if "b" in members:
        return FusionRule(fusion.weight_a, fusion.temperature)
    return FusionRule(1.0, fusion.temperature_a)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T of TEMPERATURES whose calibrated probabilities have the least log-loss on `labels`."""
    log_probs = np.log(np.clip(probs, 1e-12, None))
    best_nll, best_t = np.inf, 1.0
    for t in TEMPERATURES:
        scaled = log_probs / t
        nll = float((np.logaddexp.reduce(scaled, axis=1) - scaled[np.arange(len(labels)), labels]).mean())
        if nll < best_nll:
            best_nll, best_t = nll, float(t)
    return best_t


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """The mean |accuracy - confidence| over equal-width confidence bins, weighted by their faces."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(
                float((predicted[inside] == labels[inside]).mean()) - confidence[inside].mean()
            )
    return float(error)


def score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
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
        accuracy, nll = score(fused, labels)
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


def fit_fusion(pa: np.ndarray, pb: np.ndarray | None, labels: np.ndarray, split: str) -> tuple[Fusion, dict]:
    """(fusion, alternatives) on the selection split: the weight (none for a bundle of A alone),
    then the temperature of the fused output."""
    temperature_a = fit_temperature(pa, labels)
    if pb is None:
        return (
            Fusion(
                method="single model (A)",
                weight_a=1.0,
                fitted_on=split,
                how="no weight to fit; " + TEMPERATURE_HOW,
                temperature=temperature_a,
                temperature_a=temperature_a,
            ),
            {},
        )
    weight, _ = fit_weight(pa, pb, labels)
    weight_log, accuracy_log = fit_weight(pa, pb, labels, log=True)
    fusion = Fusion(
        method="probability mean",
        weight_a=weight,
        fitted_on=split,
        how="grid over w in [0, 1] step 0.01, max accuracy, ties by log-loss; " + TEMPERATURE_HOW,
        temperature=fit_temperature(fuse(pa, pb, weight), labels),
        temperature_a=temperature_a,
    )
    alternatives = {
        "logit mean": {"weight_a": weight_log, "accuracy": accuracy_log},
        "stacking (logistic regression, 5-fold CV)": {"accuracy": stacking_cv_accuracy(pa, pb, labels)},
    }
    return fusion, alternatives


def member_accuracies(pa: np.ndarray, pb: np.ndarray | None, labels: np.ndarray, weight_a: float) -> dict:
    accuracies = {"ensemble": score(fuse(pa, pb, weight_a), labels)[0], "a": score(pa, labels)[0]}
    if pb is not None:
        accuracies["b"] = score(pb, labels)[0]
    return accuracies
