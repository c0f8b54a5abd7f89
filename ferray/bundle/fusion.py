"""The fusion of any number of members, fitted on the selection split (Ray-free).

    P = sum_i w_i P_i / sum_i w_i   over the answering members, then P^(1/T) renormalised

By default the weights are equal and only the temperature T is fitted (min log-loss on the selection
split: Validation where it was carved, PublicTest under FER2013's own protocol): a handful of
weights fitted on 2,872 faces buy little that holds on a test split. Fitted weights (min log-loss of
the weighted mean) are kept only where they beat equal weights on the selection split by more than
its bootstrap noise, and the card says which won and by how much. Each named set of members (e.g.
"fast") gets its own temperature, and each member its own for answers from it alone. Two
alternatives are measured on the same split and recorded in the card: the mean of log-probabilities
(logit averaging) and stacking (a logistic regression on the members' log-probabilities) whose
accuracy is estimated by 5-fold cross-validation, since fitting it on the split it is scored on would
flatter it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ferray.bundle.card import Fusion
from ferray.labels import EMOTIONS

TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(5.0), 481))  # steps of under 1%
ECE_BINS = 15
TEMPERATURE_HOW = "then the temperature of the fused output: min log-loss over T in [0.2, 5]"


def fuse(probs: dict, weights: dict):
    """sum_i w_i P_i / sum_i w_i over the members in `probs` (numpy or torch; a member without a
    weight counts as 1); one member's probabilities come back unchanged."""
    names = list(probs)
    if len(names) == 1:
        return probs[names[0]]
    total = sum(weights.get(name, 1.0) for name in names)
    return sum(weights.get(name, 1.0) / total * probs[name] for name in names)


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
    """How the served probabilities are made from the answering members': their weighted mean, then
    the temperature. Every answer (the API, `ferray predict`, serving, evaluations) goes through one."""

    weights: dict = field(default_factory=dict)  # member -> weight; absent members count 1
    temperature: float = 1.0

    def __call__(self, probs: dict):
        return calibrate(fuse(probs, self.weights), self.temperature)


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


def fit_weights(probs: dict, labels: np.ndarray, steps: int = 200) -> dict:
    """Weights (positive, summing to 1) of the members' probability mean with the least log-loss on
    `labels`, by L-BFGS over their softmax parameters."""
    stacked = torch.from_numpy(np.stack([probs[name] for name in probs])).double()  # (M, N, C)
    targets = torch.from_numpy(labels).long()
    logits = torch.zeros(len(probs), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=steps)

    def closure():
        optimizer.zero_grad()
        mixed = (torch.softmax(logits, 0)[:, None, None] * stacked).sum(0)
        loss = -torch.log(mixed[torch.arange(len(targets)), targets].clamp_min(1e-12)).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights = torch.softmax(logits.detach(), 0).tolist()
    return {name: round(w, 4) for name, w in zip(probs, weights)}


def bootstrap_gain(
    fused: np.ndarray, baseline: np.ndarray, labels: np.ndarray, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(accuracy of `fused` minus that of `baseline`, the standard deviation of that difference over
    bootstrap resamples of the faces): the gain and the noise a split of this size puts on it."""
    right_fused, right_base = fused.argmax(1) == labels, baseline.argmax(1) == labels
    difference = right_fused.astype(float) - right_base.astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(rounds, len(labels)))
    return float(difference.mean()), float(difference[draws].mean(1).std())


def stacking_cv_accuracy(probs: dict, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a logistic regression on the members' log-probabilities."""
    features = torch.from_numpy(np.log(np.clip(np.concatenate(list(probs.values()), 1), 1e-12, None))).float()
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


WEIGHTS_CHOICES = ("auto", "equal", "fitted")
NOISE_MARGIN = 2.0  # fitted weights must beat equal ones by this many bootstrap standard deviations


def fit_fusion(
    probs: dict, labels: np.ndarray, split: str, sets: dict, weights: str = "auto"
) -> tuple[Fusion, dict, dict]:
    """(fusion, alternatives, each member's own temperature) on the selection split. `weights`:
    "equal"; "fitted"; or "auto", fitted only where they beat equal weights by more than
    NOISE_MARGIN bootstrap standard deviations of the difference. Each set in `sets` gets the
    temperature of its own fused output."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"fusion weights {weights!r}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    every = probs  # the sets' temperatures read every member; the fusion itself is the "all" set's
    probs = {name: probs[name] for name in sets.get("all", list(probs))}
    equal = {name: 1.0 for name in probs}
    chosen, choice = equal, "equal"
    alternatives: dict = {}
    if len(probs) > 1:
        fitted = fit_weights(probs, labels)
        gain, noise = bootstrap_gain(fuse(probs, fitted), fuse(probs, equal), labels)
        alternatives["fitted weights"] = {"weights": fitted, "accuracy_gain": gain, "bootstrap_sd": noise}
        if weights == "fitted" or (weights == "auto" and gain > NOISE_MARGIN * noise):
            chosen, choice = fitted, f"fitted: {gain:+.2%} over equal weights on {split} (bootstrap sd {noise:.2%})"
        elif weights == "auto":
            choice = f"equal: fitted weights gained {gain:+.2%} on {split}, within its noise (bootstrap sd {noise:.2%})"
        log_mean = np.exp(np.mean([np.log(np.clip(p, 1e-12, None)) for p in probs.values()], 0))
        alternatives["logit mean"] = {"accuracy": score(log_mean / log_mean.sum(1, keepdims=True), labels)[0]}
        alternatives["stacking (logistic regression, 5-fold CV)"] = {"accuracy": stacking_cv_accuracy(probs, labels)}
    set_temperatures = {
        name: fit_temperature(fuse({m: every[m] for m in members}, chosen), labels) for name, members in sets.items()
    }
    fusion = Fusion(
        method="probability mean",
        weights=chosen,
        fitted_on=split,
        how=f"weights {'equal' if chosen is equal else 'fitted by min log-loss'}; " + TEMPERATURE_HOW,
        temperature=fit_temperature(fuse(probs, chosen), labels),
        set_temperatures=set_temperatures,
        weights_choice=choice,
    )
    temperatures = {name: fit_temperature(p, labels) for name, p in every.items()}
    return fusion, alternatives, temperatures


def member_accuracies(probs: dict, labels: np.ndarray, weights: dict, ensemble: list | None = None) -> dict:
    """The ensemble's accuracy (the members in `ensemble`, default every member in `probs`) and each
    member's."""
    fused = probs if ensemble is None else {name: probs[name] for name in ensemble}
    return {"ensemble": score(fuse(fused, weights), labels)[0]} | {n: score(p, labels)[0] for n, p in probs.items()}


def set_accuracies(probs: dict, labels: np.ndarray, weights: dict, sets: dict) -> dict:
    """Each named set's fused accuracy (the sets whose members are all in `probs`)."""
    return {
        name: score(fuse({m: probs[m] for m in members}, weights), labels)[0]
        for name, members in sets.items()
        if all(m in probs for m in members)
    }


SELECTION_HOW = (
    "greedy forward selection with equal weights on {split}: the best member alone, then at each step the "
    "member whose addition gives the highest accuracy (ties: the lower log-loss); the set kept is the "
    "smallest of the highest accuracy along that path"
)


def greedy_selection(probs: dict, labels: np.ndarray) -> list[dict]:
    """The path of greedy forward selection over the members of `probs` (equal weights): one entry per
    size, {"members": [...], "accuracy", "log_loss"}, the first the best member alone."""

    def measured(members: list[str]) -> dict:
        accuracy, log_loss = score(fuse({m: probs[m] for m in members}, {}), labels)
        return {"members": members, "accuracy": accuracy, "log_loss": log_loss}

    left, path = list(probs), []
    while left:
        chosen = path[-1]["members"] if path else []
        steps = [measured([*chosen, name]) for name in left]
        best = max(steps, key=lambda step: (step["accuracy"], -step["log_loss"]))
        path.append(best)
        left.remove(best["members"][-1])
    return path


def selected_members(path: list[dict]) -> list[str]:
    """The smallest set of the highest accuracy on the greedy path."""
    top = max(step["accuracy"] for step in path)
    return next(step["members"] for step in path if step["accuracy"] == top)
