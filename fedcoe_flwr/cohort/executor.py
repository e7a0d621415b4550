"""``train_clients``: every client's ``client_train`` result, the clients whose method
defines a ``LocalTask`` trained in stacked, vectorised cohorts.

For one chunk of stackable tasks (``grouping``):
1. each client's batches come from ``training.local_batches`` with its own seed, exactly
   the batches the per-client loop steps on;
2. parameters and buffers are stacked per client (``stack_module_state``);
3. at step s, the clients that still have a batch are grouped by batch size (the last
   batch of an epoch is smaller); each group is one call of
   ``vmap(grad(objective))`` on its rows, then one functional SGD step on those rows. A
   client whose batches ran out is masked out of the step: its parameters, momentum and
   buffers are left as they are, as if it had stopped, which is what it did alone;
4. the trained rows are written back into each client's model and the method's
   ``finish`` makes the reply, as in the per-client path.

BatchNorm (and pFedMoE's switchable normalisation) keep per-client running statistics:
the buffers are stacked like the parameters and updated in place row by row. Parameters
the loss does not reach (found once per chunk with autograd on the first client's first
batch) take no step, as ``torch.optim.SGD`` skips a parameter without a gradient."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ..algorithms.base import Algorithm, ClientStep
from ..algorithms.training import Arrays, LocalTask, Trained, check_finite, local_batches, start_parameters
from ..config import ExperimentConfig
from .grouping import chunked, group_tasks
from .optim import FunctionalSGD

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64  # clients stacked at once: bounds memory (about 4 copies of each client's parameters)
Result = tuple[Arrays, Arrays | None, dict[str, Any]]
_MODEL = "model."


class _Objective(nn.Module):
    """The objective as a module's forward, so that ``functional_call`` swaps the stacked
    tensors into every part of the model the objective touches (not only ``forward``)."""

    def __init__(self, model: nn.Module, objective: Callable):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor]):  # noqa: ANN201
        return self.objective(self.model, x, y, start)


def _prefixed(*parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_MODEL + k: v for part in parts for k, v in part.items()}


def used_parameters(call: _Objective, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    start: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the parameters the loss reaches (autograd on one batch, on copies: the
    model's own parameters and running statistics are not touched)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    loss, _ = functional_call(call, _prefixed(params, buffers), (x, y, start))
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return [k for k, g in zip(params, grads) if g is not None]


def _rows(tensors: Mapping[str, torch.Tensor], index: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return dict(tensors) if index is None else {k: v.index_select(0, index) for k, v in tensors.items()}


def _put_rows(tensors: Mapping[str, torch.Tensor], index: torch.Tensor | None,
              rows: Mapping[str, torch.Tensor]) -> None:
    if index is not None:
        for k, v in rows.items():
            tensors[k].index_copy_(0, index, v)


def train_chunk(tasks: Sequence[LocalTask], cfg: ExperimentConfig) -> list[Result]:
    """Train stackable ``tasks`` together; each one's ``finish`` result, in order."""
    template = tasks[0]
    for task in tasks:
        task.model.train()
    call = _Objective(template.model, template.objective)
    device = next(template.model.parameters()).device
    plans = [list(local_batches(t.data, cfg, device, t.seed)) for t in tasks]
    starts = [start_parameters(t.model) if t.uses_start else {} for t in tasks]
    params, _ = stack_module_state([t.model for t in tasks])
    params = {k: v.detach() for k, v in params.items()}
    own_buffers = [dict(t.model.named_buffers()) for t in tasks]
    buffers = {k: torch.stack([b[k] for b in own_buffers]) for k in own_buffers[0]}
    start = {k: torch.stack([s[k] for s in starts]) for k in starts[0]}
    first = next((i for i, plan in enumerate(plans) if plan), None)
    used = [] if first is None else used_parameters(call, tasks[first].model, *plans[first][0], starts[first])
    optimizer = FunctionalSGD.of(cfg)
    momentum = optimizer.init({k: params[k] for k in used})

    def client_loss(p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], s: Mapping[str, torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        loss, stats = functional_call(call, _prefixed(p, b), (x, y, s))
        return loss, (loss.detach(), stats)

    step_fn = vmap(grad(client_loss, has_aux=True))
    n = len(tasks)
    totals = torch.zeros(n, dtype=torch.float64)
    samples = torch.zeros(n, dtype=torch.int64)
    sums: dict[str, torch.Tensor] = {}
    for s in range(max((len(p) for p in plans), default=0)):
        by_size: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if s < len(plan):
                by_size.setdefault(int(plan[s][1].shape[0]), []).append(i)
        for size, members in by_size.items():
            device_index = None if len(members) == n else torch.tensor(members, device=device)
            p, b = _rows(params, device_index), _rows(buffers, device_index)
            st, m = _rows(start, device_index), _rows(momentum, device_index)
            x = torch.stack([plans[i][s][0] for i in members])
            y = torch.stack([plans[i][s][1] for i in members])
            grads, (loss, stats) = step_fn(p, b, st, x, y)
            check_finite(loss, cfg, f"local training (cohort clients of seeds {[tasks[i].seed for i in members]})")
            optimizer.step({k: p[k] for k in used}, grads, m)
            _put_rows(params, device_index, p)
            _put_rows(buffers, device_index, b)
            _put_rows(momentum, device_index, m)
            rows = torch.tensor(members)
            totals.index_add_(0, rows, loss.detach().cpu().double() * size)
            samples.index_add_(0, rows, torch.full((len(members),), size, dtype=torch.int64))
            for key, value in stats.items():
                sums.setdefault(key, torch.zeros(n, dtype=torch.float64)).index_add_(0, rows,
                                                                                    value.detach().cpu().double())
    with torch.no_grad():
        for i, task in enumerate(tasks):
            for k, v in task.model.named_parameters():
                v.copy_(params[k][i])
            for k, v in task.model.named_buffers():
                v.copy_(buffers[k][i])
    return [task.finish(task.model, Trained(float(totals[i]) / max(int(samples[i]), 1),
                                            {k: float(v[i]) for k, v in sums.items()}, int(samples[i])))
            for i, task in enumerate(tasks)]


def train_clients(algorithm: Algorithm, steps: Sequence[ClientStep], chunk_size: int = DEFAULT_CHUNK_SIZE
                  ) -> list[Result]:
    """``algorithm.client_train(step)`` for every step, in order: the clients of a method
    that defines ``local_task`` in vectorised cohorts of at most ``chunk_size``, any
    other client one by one (``algorithm.cohort_fallback`` says why)."""
    tasks = [algorithm.local_task(step) for step in steps]
    results: list[Result | None] = [None] * len(steps)
    fallback = [i for i, task in enumerate(tasks) if task is None]
    if fallback:
        log.info("%s trains its %d clients one by one: %s", algorithm.name, len(fallback), algorithm.cohort_fallback)
    for i in fallback:
        results[i] = algorithm.client_train(steps[i])
    stackable = [i for i, task in enumerate(tasks) if task is not None]
    for group in group_tasks([tasks[i] for i in stackable]):
        for chunk in chunked([stackable[j] for j in group], chunk_size):
            for i, result in zip(chunk, train_chunk([tasks[i] for i in chunk], steps[chunk[0]].cfg)):
                results[i] = result
    return results  # type: ignore[return-value]
