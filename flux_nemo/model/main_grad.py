"""Weight gradients accumulated straight into Megatron DDP's ``main_grad`` for the model's own linears (the adaLN
modulations, the embedders, the final layer): the contract of Megatron's ``gradient_accumulation_fusion``, which TE's
linears already follow.

Megatron DDP gives every parameter a ``main_grad`` (a view into its gradient buffer) and, after autograd has written
a parameter's ``.grad``, adds it there in a hook. For a linear that is one weight-sized write and one weight-sized
add per micro-batch; the modulation linears alone hold 3.2 B of Flux.1's 11.9 B parameters (H100 profile, 2 + 4
blocks: ~2.8 ms of these adds per 4-micro-batch step). :func:`linear` instead adds ``grad_out^T @ x`` into
``main_grad`` in one GEMM with accumulation, sets ``weight.grad_added_to_main_grad`` (DDP's hook then skips its add)
and hands autograd a placeholder ``.grad``, which the hook drops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LinearIntoMainGrad(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` (``x [..., in]``) whose backward adds the weight gradient into
    ``weight.main_grad``, in ``main_grad``'s dtype (fp32 or bf16)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        main_grad = weight.main_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out]
        main_grad.addmm_(rows.t().to(main_grad.dtype), x.reshape(-1, x.shape[-1]).to(main_grad.dtype))
        weight.grad_added_to_main_grad = True
        # Uninitialised unless DDP asks for zeros (``zero_out_wgrad``): its hook drops it without reading it.
        placeholder = torch.zeros_like if getattr(weight, "zero_out_wgrad", False) else torch.empty_like
        return grad_out @ weight, placeholder(weight), rows.sum(0) if ctx.has_bias else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, accumulate_into_main_grad: bool) -> Tensor:
    """``F.linear``; with ``accumulate_into_main_grad`` (``FluxConfig.gradient_accumulation_fusion``), once Megatron
    DDP has given the weight a ``main_grad``, its gradient goes there directly."""
    if accumulate_into_main_grad and hasattr(weight, "main_grad") and torch.is_grad_enabled():
        return _LinearIntoMainGrad.apply(x, weight, bias)
    return F.linear(x, weight, bias)
