"""The student's loss: the teacher's probabilities softened at a temperature, matched by KL
divergence (scaled by T^2 so its gradients keep their size as T changes: Hinton et al.), plus a
share of the cross-entropy to the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    label_share: float = 0.4,
) -> tuple[torch.Tensor, dict]:
    """(loss, {"kl", "ce"}) of student logits (N, C) against teacher probabilities (N, C) and labels."""
    soft_teacher = F.softmax(teacher_probs.float().clamp_min(1e-8).log() / temperature, dim=-1)
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, soft_teacher, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(logits.float(), labels)
    loss = (1 - label_share) * kl + label_share * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}
