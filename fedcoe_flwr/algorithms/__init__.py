"""Every method as one module with pure client-update / server-aggregation functions."""

from __future__ import annotations

from .common import Algorithm


def get_algorithm(name: str) -> Algorithm:
    """The method selected by ``algorithm = "..."`` in the config."""
    if name == "fedcoe":
        from .fedcoe import FedCoE

        return FedCoE()
    if name == "fedavg":
        from .fedavg import FedAvg

        return FedAvg()
    if name == "fedprox":
        from .fedprox import FedProx

        return FedProx()
    if name == "fedper":
        from .fedper import FedPer

        return FedPer()
    if name == "pfedmoe":
        from .pfedmoe import PFedMoE

        return PFedMoE()
    if name == "fedmoe_da":
        from .fedmoe_da import FedMoEDA

        return FedMoEDA()
    raise NotImplementedError(f"algorithm '{name}' is not implemented yet")
