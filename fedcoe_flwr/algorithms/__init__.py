"""Every method as one module with pure client-update / server-aggregation functions."""

from __future__ import annotations

from importlib import import_module

from .common import Algorithm

# algorithm name -> (module, class); modules are imported only when selected
REGISTRY = {
    "fedcoe": ("fedcoe", "FedCoE"),
    "fedavg": ("fedavg", "FedAvg"),
    "fedprox": ("fedprox", "FedProx"),
    "fedper": ("fedper", "FedPer"),
    "pfedmoe": ("pfedmoe", "PFedMoE"),
    "fedmoe_da": ("fedmoe_da", "FedMoEDA"),
    "local": ("local", "LocalOnly"),
}


def get_algorithm(name: str) -> Algorithm:
    """The method selected by ``algorithm = "..."`` in the config."""
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm '{name}'; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(import_module(f".{module}", __name__), cls)()
