"""FedProx (Li et al. 2020): FedAvg plus the local proximal term (mu/2)||w - w_global||^2,
mu = ``prox_mu`` (default 0.01). Shares FedAvg's functions; only mu differs."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ExperimentConfig, Section, require
from .fedavg import FedAvg


@dataclass(frozen=True)
class FedProxParams(Section):
    prox_mu: float = 0.01  # mu of the proximal term

    def check(self, cfg: ExperimentConfig) -> None:
        require(self, ge0=("prox_mu",))


class FedProx(FedAvg):
    name = "fedprox"
    Params = FedProxParams

    def proximal_weight(self, cfg: ExperimentConfig) -> float:
        return cfg.methods[self.name].prox_mu
