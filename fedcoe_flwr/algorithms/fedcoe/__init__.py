"""FedCoE: a server-side pool of global experts with one shared gate, a client-expert
correlation learned at aggregation, a private local level per client, and a cold-start
model built from the pool with no gradient step.

- ``params``: its config keys; ``model``: the network and payload keys;
  ``aggregation``: the server math; ``coldstart``: adapting the pool to a new client (with the
  label-shift arithmetic and AdaBN every method shares, ``algorithms.adaptation``); ``plots``;
  ``algorithm``: the hooks."""

from .algorithm import FedCoE
from .aggregation import expert_weights, routing_diagnostics
from .coldstart import adapt_new_client, coldstart_evaluate, training_prior
from .model import CLASS_MARGINAL, CORRELATION, LOCAL_PRIOR, FedCoEModel
from .params import FedCoEParams, experts_per_client

__all__ = ["FedCoE", "FedCoEParams", "FedCoEModel", "CORRELATION", "CLASS_MARGINAL", "LOCAL_PRIOR",
           "adapt_new_client", "coldstart_evaluate", "expert_weights", "experts_per_client",
           "routing_diagnostics", "training_prior"]
