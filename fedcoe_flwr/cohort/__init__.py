"""Cohort training: many clients' local updates in one vectorised pass.

At cross-device shapes (50 images per client, batch 10) a client's local update is a few
tiny steps and most of its time is per-operation overhead. The executor stacks the
parameters of C clients (``torch.func.stack_module_state``), runs the method's own local
loss (``Algorithm.local_task``, the same function the per-client path calls) under
``vmap(grad(...))`` over the clients, and steps a functional SGD with the per-client
optimiser's semantics. Each client keeps its own seed and batches, so its update does not
depend on which clients it is trained with (docs/COHORT.md).

- ``optim``: the functional SGD (momentum, weight decay, per-client state);
- ``grouping``: which clients can share one stacked cohort, and chunks of bounded size;
- ``executor``: ``train_clients``, the entry point."""

from .executor import DEFAULT_CHUNK_SIZE, train_clients

__all__ = ["DEFAULT_CHUNK_SIZE", "train_clients"]
