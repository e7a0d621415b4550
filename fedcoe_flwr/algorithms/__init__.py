"""Every method as one module (FedCoE as a subpackage) implementing the hooks of
``base.Algorithm``; the server and the client call only those hooks.

Adding a method: a module here with an ``Algorithm`` subclass (and its ``Params``
section when it has keys of its own), one line in ``REGISTRY``, a page in
docs/algorithms/, and ``python scripts/sync_run_config.py`` for new keys."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry stays import-light: config.py reads it before any method loads
    from .base import Algorithm

# algorithm name -> "module:class"; a module is imported when its method is first used
REGISTRY = {
    "fedcoe": "fedcoe.algorithm:FedCoE",
    "fedavg": "fedavg:FedAvg",
    "fedprox": "fedprox:FedProx",
    "fedper": "fedper:FedPer",
    "pfedmoe": "pfedmoe:PFedMoE",
    "fedmoe_da": "fedmoe_da:FedMoEDA",
    "local": "local:LocalOnly",
}


DEFAULT = next(iter(REGISTRY))  # the method a config without ``algorithm`` runs


def algorithm_class(name: str) -> type["Algorithm"]:
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm '{name}'; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(import_module(f".{module}", __name__), cls)


def get_algorithm(name: str) -> "Algorithm":
    """The method selected by ``algorithm = "..."`` in the config."""
    return algorithm_class(name)()
