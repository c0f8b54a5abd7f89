"""An exponential moving average of a model's weights (Ray-free).

    ema = WeightEMA(model, decay=0.999)
    ...optimizer.step(); ema.update(model)
    evaluate(ema.module, ...)

Every floating-point entry of the state dict is averaged, batch-norm running statistics included
(they must match the averaged weights they normalise); integer buffers (num_batches_tracked) are
copied. The decay is warmed up as (1 + n) / (10 + n) over the first updates, so the average does
not drag the random initial weights along for thousands of steps. Under data-parallel training
every rank holds the same weights after each step, so every rank's average is the same too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), not {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step toward `model`'s current weights (the bare module, not a DDP/compile wrapper)."""
        decay = self.current_decay()
        self.updates += 1
        averaged, copied_to, copied_from = [], [], []
        targets = []
        source = model.state_dict()
        for name, mine in self.module.state_dict().items():
            theirs = source[name].detach()
            if mine.is_floating_point():
                averaged.append(mine)
                targets.append(theirs.to(mine.dtype))
            else:
                copied_to.append(mine)
                copied_from.append(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)  # mine += (1 - decay) * (theirs - mine)
        for mine, theirs in zip(copied_to, copied_from):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "model": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])
