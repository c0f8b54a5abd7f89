"""Joint softmax + center loss (Wen et al., ECCV 2016), Ray-free.

    L = L_S + lambda * L_C,   L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2   (divided by the batch size
                                                                     with reduction="mean")

x_i is the feature vector before the classifier, c_j the center of class j. "raw" is the paper's
term as written; on the pooled BN -> PReLU features the network can shrink every feature (batch
norm's scale is free) and the term with them, so it stops acting after the first epoch.
features="normalized" puts x_i on the unit sphere after centering it on the batch's mean
embedding: x_i = (f_i - mean f) / ||f_i - mean f||. Normalising alone is not enough: the pooled
features share a large common direction, and the network can scale all of them up while
shrinking the angles between them, which leaves the logits as they were and the term near zero.
Centered and normalised, the term measures a class's spread against the spread between classes,
which no rescaling or common shift of the features changes; 1/2||x - c||^2 then lies in [0, 2].

Centers are not learned by the optimizer: after each step they move toward their class's
features at their own rate alpha (Wen et al., eq. 4):

    delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + #{i: y_i = j}),    c_j <- c_j - alpha * delta_c_j

Under data-parallel training the per-class sums are all-reduced first, so every worker moves the
centers by the same global step and they stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ferray.distill.loss import distillation_loss

FEATURE_SPACES = ("normalized", "raw")


class CenterLoss(nn.Module):
    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        alpha: float = 0.5,
        reduction: str = "mean",
        features: str = "raw",
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if features not in FEATURE_SPACES:
            raise ValueError(f"features must be one of {', '.join(FEATURE_SPACES)}, not {features!r}")
        self.alpha, self.reduction, self.normalize = alpha, reduction, features == "normalized"
        self.register_buffer("centers", torch.zeros(num_classes, feature_dim))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The vectors the term acts on: (B, D) float32; when normalising, centered on the batch's mean
        embedding (a constant: no gradient through it) and put on the unit sphere."""
        features = features.float()
        if not self.normalize:
            return features
        return F.normalize(features - features.mean(0, keepdim=True).detach(), dim=1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = self.embed(features) - self.centers[labels]  # (B, D); centers carry no gradient
        loss = 0.5 * diff.pow(2).sum()
        return loss / features.shape[0] if self.reduction == "mean" else loss

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = self.embed(features.detach())
        num_classes = self.centers.shape[0]
        # index_add rather than bincount: bincount reads its result back to the host on CUDA,
        # a synchronization in every training step.
        counts = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=features.dtype))  # (C,)
        sums = torch.zeros_like(self.centers).index_add_(0, labels, features)  # (C, D)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        delta = (counts[:, None] * self.centers - sums) / (1 + counts[:, None])
        self.centers -= self.alpha * delta


class JointLoss(nn.Module):
    """Cross-entropy (optionally label-smoothed) + lambda * center loss; returns the parts too.

    With `center_share` > 0, lambda is not fixed: before each step it is set so that the center
    term is that share of the cross-entropy, from running means of both (of their logarithms, with
    momentum BALANCE_MOMENTUM: one batch does not swing it, and a scale that falls tenfold is
    followed as fast as one that rises), at most `center_lambda`. The center term's scale changes
    several-fold during training (the embeddings start nearly collinear and spread out as classes
    separate), so a fixed lambda that is a secondary term in one epoch is noise or dominant in
    another; a share is what one means to choose."""

    BALANCE_MOMENTUM = 0.98

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        center_lambda: float,
        center_alpha: float,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        features: str = "normalized",
        center_share: float = 0.0,
        distill: tuple[float, float] = (2.0, 0.4),
    ):
        super().__init__()
        self.center_lambda, self.label_smoothing, self.center_share = center_lambda, label_smoothing, center_share
        self.distill = distill  # (temperature, label share) when a teacher is given: the run's distill section
        self.center = CenterLoss(num_classes, feature_dim, center_alpha, reduction, features)
        # running means of log cross-entropy and log center term; `balanced` 0 until the first step
        self.register_buffer("balance", torch.zeros(2))
        self.register_buffer("balanced", torch.zeros(()))

    def current_lambda(self, ce: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """The lambda of this step (a tensor: no host synchronisation)."""
        if self.center_share <= 0:
            return torch.full((), self.center_lambda, device=ce.device)
        means = torch.where(self.balanced > 0, self.balance, self._logs(ce, center))
        return (self.center_share * torch.exp(means[0] - means[1])).clamp(max=self.center_lambda)

    @staticmethod
    def _logs(ce: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        return torch.stack([ce.detach(), center.detach()]).clamp_min(1e-8).log()

    def forward(self, logits, features, labels, teacher=None) -> tuple[torch.Tensor, dict]:
        """With `teacher` (probabilities (N, C) on the same views), the classification term is
        distillation's (ferray.distill.loss: KL to the teacher plus a share of cross-entropy) and the
        center term stays; `distill` = (temperature, label share) then."""
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        zero = torch.zeros((), device=ce.device)
        classify, kl = ce, zero
        if teacher is not None:
            temperature, share = self.distill
            classify, kd_parts = distillation_loss(logits, teacher, labels, temperature, share)
            kl = kd_parts["kl"]
        if self.center_lambda == 0:
            return classify, {"ce": ce.detach(), "center": zero, "lambda": zero, "kl": kl}
        center = self.center(features, labels)
        lam = self.current_lambda(ce, center)
        if self.center_share > 0:
            with torch.no_grad():
                measured, m = self._logs(ce, center), self.BALANCE_MOMENTUM
                self.balance.copy_(torch.where(self.balanced > 0, m * self.balance + (1 - m) * measured, measured))
                self.balanced.fill_(1.0)
        return classify + lam * center, {"ce": ce.detach(), "center": center.detach(), "lambda": lam.detach(), "kl": kl}

    def after_step(self, features, labels) -> None:
        if self.center_lambda != 0:
            self.center.update_centers(features, labels)
