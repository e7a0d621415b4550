"""FedProx (Li et al. 2020): FedAvg plus the local proximal term (mu/2)||w - w_global||^2,
mu = ``prox_mu`` (default 0.01). Shares FedAvg's functions; only mu differs."""

from __future__ import annotations

from .fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
    prox_mu_from_config = True
