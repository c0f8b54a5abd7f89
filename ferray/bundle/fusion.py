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

import numpy as np
import torch

from ferray.bundle.card import Fusion
from ferray.labels import EMOTIONS

GRID = np.linspace(0, 1, 101)


def fuse(pa, pb, weight_a: float):
    """w * P_A + (1 - w) * P_B; P_A itself where there is no B (a bundle of one member)."""
    return pa if pb is None else weight_a * pa + (1 - weight_a) * pb


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
    """(fusion, alternatives) on the selection split; a bundle of A alone has nothing to fit."""
    if pb is None:
        return Fusion(method="single model (A)", weight_a=1.0, fitted_on=None, how="nothing to fit"), {}
    weight, _ = fit_weight(pa, pb, labels)
    weight_log, accuracy_log = fit_weight(pa, pb, labels, log=True)
    fusion = Fusion(
        method="probability mean",
        weight_a=weight,
        fitted_on=split,
        how="grid over w in [0, 1] step 0.01, max accuracy, ties by log-loss",
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
