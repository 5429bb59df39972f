"""The Flux MLP through Transformer Engine's fusible-operations API (``FluxConfig.mlp_fusion``, ``te`` spec).

The module path runs fc1 (GEMM + bias), GELU and fc2 (GEMM + bias) as three kernels' worth of passes over the
``[s, b, 4h]`` hidden activation, and under FP8 a few more: the GELU output is written in bf16, read for its amax
and read again to be cast for fc2; in backward, dGELU, fc1's bias gradient and the cast of fc1's output gradient
are separate passes. A ``transformer_engine.pytorch.ops.Sequential`` of the same operations lets TE fuse them:
GELU writes fc2's FP8 input itself, and dGELU + dbias + cast is one kernel (TE's ``BackwardActivationBias``).

Same math (TE's GELU is the tanh approximation, as the reference's) and the same parameters: the operations use
the weights and biases of ``linear_fc1`` / ``linear_fc2``, which stay where checkpoints, the optimizer and
Megatron's DDP see them. Transformer Engine is imported on first use only.
"""

from __future__ import annotations

from megatron.core.transformer.mlp import MLPSubmodules
from torch import Tensor, nn

from flux_nemo.model.blocks import FluxMLP
from flux_nemo.model.config import FluxConfig


class TEFluxMLP(FluxMLP):
    """:class:`FluxMLP` of the ``te`` spec: the module path, or with ``config.mlp_fusion`` TE's fused operations.

    Tensor parallelism is not supported by the fused path (``FluxConfig`` refuses ``mlp_fusion`` with TP > 1).
    """

    def __init__(self, config: FluxConfig, submodules: MLPSubmodules):
        super().__init__(config, submodules)
        # The fused operations, built on first use; in a tuple so that nn.Module does not register them (their
        # parameters are fc1's and fc2's, which must appear once in parameters() and state_dict()).
        self._fused: tuple[nn.Module, ...] = ()

    def _forward(self, x: Tensor) -> Tensor:
        """``[s, b, h]`` -> ``[s, b, h]``."""
        if not self.config.mlp_fusion:
            return super()._forward(x)
        if not self._fused:
            self._fused = (_fused_mlp(self.linear_fc1, self.linear_fc2),)
        self._run_parameter_hooks()
        return self._fused[0](x)

    def _run_parameter_hooks(self) -> None:
        """Run fc1's and fc2's forward pre-hooks, which a module call would run and the fused path skips.

        Megatron's DDP registers them with ``overlap_param_gather`` (and re-registers them as it toggles the
        overlap): each waits for its module's parameter all-gather. They take no input; one that returns a
        replacement input cannot be honoured here and is an error.
        """
        for linear in (self.linear_fc1, self.linear_fc2):
            for hook in list(linear._forward_pre_hooks.values()):
                if hook(linear, ()) is not None:
                    raise RuntimeError(
                        f"FluxConfig.mlp_fusion: a forward pre-hook on {type(linear).__name__} ({hook!r}) "
                        "rewrites the module input, which the fused MLP does not expose"
                    )


def _fused_mlp(fc1: nn.Module, fc2: nn.Module) -> nn.Module:
    """``te.ops.Sequential(Linear, Bias, GELU, Linear, Bias)`` over fc1's and fc2's parameters."""
    from transformer_engine.pytorch import ops

    fused = ops.Sequential()
    for linear in (fc1, fc2):
        weight, bias = linear.weight, linear.bias
        gemm = ops.BasicLinear(
            weight.size(1),
            weight.size(0),
            device="meta",
            dtype=weight.dtype,
            # TE writes the weight gradient into Megatron's main_grad buffer, as the module path does.
            accumulate_into_main_grad=bool(getattr(linear, "fuse_wgrad_accumulation", False)),
        )
        gemm.weight = weight
        add_bias = ops.Bias(bias.numel(), device="meta", dtype=bias.dtype)
        add_bias.bias = bias
        fused.append(gemm)
        fused.append(add_bias)
        if linear is fc1:
            fused.append(ops.GELU())
    return fused
