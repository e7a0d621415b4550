"""Which clients' tasks can be stacked into one cohort, and chunks of bounded size.

Tasks stack when their models have the same parameter and buffer names, shapes and
dtypes, the same objective (function and constants) and equal ``LocalTask.signature``
(FedCoE's expert set, pFedMoE's local width). Within a group, clients are ordered by how
many samples they train on, so that a chunk holds clients with similar numbers of steps
(fewer steps where only some of them are still training). How clients are grouped and
chunked changes the speed, never a client's result."""

from __future__ import annotations

from functools import partial
from typing import Hashable, Sequence

from ..algorithms.training import LocalTask


def objective_key(objective: object) -> Hashable:
    """Objectives with equal keys compute the same function: a ``functools.partial`` by its
    function and constants, anything else by identity."""
    if isinstance(objective, partial):
        key = (objective.func, objective.args, tuple(sorted(objective.keywords.items())))
        try:
            hash(key)
            return key
        except TypeError:
            return ("id", id(objective))
    return objective  # a module-level function: hashable, equal only to itself


def stack_key(task: LocalTask) -> Hashable:
    model = task.model
    return (type(model), task.signature, task.uses_start, objective_key(task.objective),
            tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in model.named_parameters()),
            tuple((k, tuple(v.shape), v.dtype) for k, v in model.named_buffers()))


def group_tasks(tasks: Sequence[LocalTask]) -> list[list[int]]:
    """Indices of ``tasks`` in stackable groups (first-seen order), each ordered by
    training samples, most first."""
    groups: dict[Hashable, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(stack_key(task), []).append(i)
    return [sorted(idx, key=lambda i: -tasks[i].data.num_train) for idx in groups.values()]


def chunked(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of at most ``size`` (>= 1) indices."""
    if size < 1:
        raise ValueError(f"cohort chunk size must be >= 1, got {size}")
    return [indices[i:i + size] for i in range(0, len(indices), size)]
