"""A functional SGD over stacked per-client parameters with ``torch.optim.SGD``'s
semantics as ``training.make_optimizer`` configures it (momentum, weight decay, no
dampening or Nesterov): g <- g + wd * w; b <- momentum * b + g; w <- w - lr * b. The
momentum buffer starts at zero, which gives torch's first step (b = g) exactly. Each row
of a stacked tensor is one client, so each client keeps its own momentum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..config import ExperimentConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FunctionalSGD:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> "FunctionalSGD":
        """The optimiser ``training.make_optimizer`` builds for the per-client path."""
        return cls(cfg.lr, cfg.momentum, cfg.weight_decay)

    def init(self, params: Mapping[str, torch.Tensor]) -> Tensors:
        """Per-client state: one zero momentum buffer per parameter (none without momentum)."""
        return {k: torch.zeros_like(v) for k, v in params.items()} if self.momentum else {}

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             state: Mapping[str, torch.Tensor]) -> None:
        """One step, in place, on the parameters named in ``params`` (all clients' rows)."""
        names = list(params)
        ps = [params[k] for k in names]
        gs = [grads[k] for k in names]
        if self.weight_decay:
            gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)
        if self.momentum:
            bufs = [state[k] for k in names]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, gs)
            gs = bufs
        torch._foreach_add_(ps, gs, alpha=-self.lr)
