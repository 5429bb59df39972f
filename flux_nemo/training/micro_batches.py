"""The micro-batches of one optimizer step: forward and backward of each, gradients accumulated, with the adaLN
modulations computed once for all of them.

The modulations (``flux_nemo.model.Conditioning``: each block's and the final layer's adaLN linears of the
conditioning vector) depend on a sample's timestep and pooled text only. Computed per micro-batch, as
``Flux.forward`` does by itself, their weights (3.2 B of Flux.1's 11.9 B parameters) are read twice and their
gradients added to ``main_grad`` once per micro-batch, by GEMMs only ``micro_batch_size`` rows deep: weight-bound
work that does not shrink with the micro-batch (2 + 4 blocks, 4 micro-batches of 16: ~4 ms per step, an estimate
read from the kernels of an H100 trace, not a measured saving).

:func:`accumulate` computes them once for the step's batch and gives each micro-batch its rows as leaf tensors. In
the last micro-batch's backward, as soon as a module's leaves have their gradients (the backward has passed that
block), their gradients over all micro-batches go back through that module's modulation linear, inside the same
backward. So each block's modulation gradients are ready when the block's other gradients are, as Megatron DDP's
bucketed, overlapped reduction expects, instead of all at the end of the step. The conditioning vector's own
gradient (``time_in``, ``vector_in``) follows last. The math is that of the plain loop: a modulation is computed per
sample, and a weight's gradient is the sum of the micro-batches'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flux_nemo.flow_matching import ModelInputs
from flux_nemo.model import Conditioning
from flux_nemo.training.checkpoint import unwrap


def accumulate(
    model: torch.nn.Module,
    inputs: Sequence[ModelInputs],
    loss_fn: Callable[[ModelInputs, Conditioning | None], Tensor],
    grad_sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
    backward: Callable[[Tensor], None] = Tensor.backward,
    once_per_step: bool = True,
) -> Tensor:
    """Forward + backward of each micro-batch in ``inputs``, each loss divided by the number of micro-batches;
    returns the sum of the (undivided) losses, detached.

    ``model`` is Flux or Flux inside Megatron's DDP / ``Float16Module`` wrappers; ``loss_fn(x, conditioning)`` is a micro-batch's loss, its
    prediction from ``model(..., conditioning=conditioning)``. ``grad_sync(last)`` is the context of a micro-batch
    (gradient reduction only on the last); every modulation gradient is produced inside the last one. ``backward``
    is how a loss is backpropagated (Lightning's ``manual_backward``). ``once_per_step=False`` is the plain loop
    (``train.modulations_once_per_step=false``): ``loss_fn(x, None)``, each forward computes its own modulations.
    """
    if not once_per_step:
        return _plain(inputs, loss_fn, grad_sync, backward)
    flux = unwrap(model)
    vec = flux.conditioning_vector(torch.cat([x.timesteps for x in inputs]), torch.cat([x.y for x in inputs]))
    vec_leaf = vec.detach().requires_grad_()
    conditioning = flux.modulations(vec_leaf)  # [batch, n*h] each
    rows: list[Conditioning] = []  # each micro-batch's rows, as leaves
    total = torch.zeros((), device=vec.device)
    start = 0
    for i, x in enumerate(inputs):
        rows.append(conditioning.rows(start, start + len(x.timesteps)).map(_leaf))
        start += len(x.timesteps)
        last = i == len(inputs) - 1
        with grad_sync(last):
            pending = _backward_when_ready(conditioning, rows) if last else None
            loss = loss_fn(x, rows[-1])
            backward(loss / len(inputs))
            if pending:
                raise RuntimeError(
                    f"{len(pending)} adaLN modulation(s) got no gradient from the last micro-batch's loss"
                )
            if last:
                torch.autograd.backward(vec, vec_leaf.grad)
        total = total + loss.detach()
    return total


def _plain(inputs, loss_fn, grad_sync, backward) -> Tensor:
    """The micro-batch loop without precomputed modulations (``once_per_step=False``)."""
    total = torch.zeros((), device=inputs[0].img.device)
    for i, x in enumerate(inputs):
        with grad_sync(i == len(inputs) - 1):
            loss = loss_fn(x, None)
            backward(loss / len(inputs))
        total = total + loss.detach()
    return total


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _backward_when_ready(conditioning: Conditioning, rows: list[Conditioning]) -> set[int]:
    """Hook the last micro-batch's leaves: once all of a module's have their gradient, backpropagate that module's
    modulations with the gradients of all micro-batches' rows. Returns the indices of the modules still pending
    (emptied as they run)."""
    groups = conditioning.groups()
    pending = set(range(len(groups)))
    for index, leaves in enumerate(rows[-1].groups()):
        remaining = [len(leaves)]

        def ready(_tensor: Tensor, index: int = index, remaining: list[int] = remaining) -> None:
            remaining[0] -= 1
            if remaining[0]:
                return
            parts = [[r.groups()[index][k].grad for r in rows] for k in range(len(groups[index]))]
            if any(g is None for p in parts for g in p):
                raise RuntimeError(f"adaLN modulation {index}: a micro-batch's loss gave it no gradient")
            torch.autograd.backward(groups[index], [torch.cat(p) for p in parts])
            pending.discard(index)

        for leaf in leaves:
            leaf.register_post_accumulate_grad_hook(ready)
    return pending
