"""Local-only training: every client trains its own small CNN on its own data and
nothing is shared during training (FedPer with an empty body). The reference every
comparison includes, so a gain of a federated method over no federation shows.

- Global accuracy: the mean, over training clients, of each client's own model on the
  global test set.
- Cold start (our protocol; local training has no model for a new client): the
  sample-weighted average of the training clients' models, sent with their evaluation
  reply, as FedPer does for its heads."""

from __future__ import annotations

from .fedper import FedPer


class LocalOnly(FedPer):
    name = "local"
    body_layers = ()
