"""adaLN modulation (shift, scale, gate) and the final layer of Flux."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor, nn

from flux_nemo import shims
from flux_nemo.model.config import FluxConfig
from flux_nemo.model.embeddings import param_device, replicated_linear
from flux_nemo.model.fusions import elementwise_ops
from flux_nemo.model.main_grad import linear


@dataclass
class ModulationOut:
    """One adaLN modulation, each tensor ``[1, b, h]`` (broadcast over the sequence)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None


class ModulationLinear(MegatronModule):
    """The modulation's Linear(h, n*h), its output rows split over the tensor-parallel ranks.

    Like Megatron's ``ColumnParallelLinear`` with ``gather_output=True`` (NVIDIA's NeMo Flux adaLN): rank r holds
    rows ``[r * n*h / tp, (r + 1) * n*h / tp)`` and all-gathers the others, so every rank gets the whole
    ``[b, n*h]`` in the reference order. The modulation linears are 3.2B of Flux.1's 11.9B parameters; replicated,
    their bf16 weights and fp32 gradients alone took 18 GiB per GPU at any TP size (plus 36 GiB of fp32 master
    weights and Adam moments without data parallelism).

    Backward: ``vec``'s gradient is summed over the ranks (each holds a slice of the weight). The gathered output's
    gradient is reduce-scattered when ``sequence_split`` (block modulations under sequence parallelism: a rank
    sees only its tokens, so its gradient is a partial sum over the sequence), else split (every rank ran the same
    computation on every token). At tensor-parallel size 1 it is a plain linear. With
    ``gradient_accumulation_fusion`` the weight gradient goes straight into DDP's ``main_grad``
    (:func:`flux_nemo.model.main_grad.linear`).
    """

    def __init__(self, config: FluxConfig, in_features: int, out_features: int, sequence_split: bool):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        if out_features % tp:
            raise ValueError(
                f"modulation output size {out_features} is not divisible by tensor_model_parallel_size={tp}"
            )
        self.sequence_split = sequence_split
        kwargs = dict(device=param_device(config), dtype=config.params_dtype)
        self.weight = nn.Parameter(torch.zeros(out_features // tp, in_features, **kwargs))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, **kwargs))
        for param in (self.weight, self.bias):  # Megatron's attributes of a column-parallel linear
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x [b, h]`` -> ``[b, n*h]``."""
        if self.config.tensor_model_parallel_size == 1:
            return linear(x, self.weight, self.bias, self.config.gradient_accumulation_fusion)
        x = copy_to_tensor_model_parallel_region(x)  # backward: summed over the ranks
        local = linear(x, self.weight, self.bias, self.config.gradient_accumulation_fusion)  # [b, n*h / tp]
        # All-gather the output dim as the first dim of the transposed tensor (rank order = the row split).
        rows = shims.gather_from_sequence_parallel_region(
            local.t().contiguous(), tensor_parallel_output_grad=self.sequence_split
        )  # [n*h, b]
        return rows.t()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint shards split along dim 0 over tensor parallelism (as ``ColumnParallelLinear``'s)."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0, "bias": 0}, sharded_offsets
        )


class Modulation(MegatronModule):
    """SiLU -> Linear(h, n*h) of the conditioning vector (``forward``), cut into chunks in the reference order
    (``split``).

    ``num_chunks`` is 6 (double blocks: (shift, scale, gate) x 2), 3 (single blocks) or 2 (final layer:
    (shift, scale)). The linear is split over the tensor-parallel ranks (:class:`ModulationLinear`);
    ``sequence_split`` says whether the layer using the modulation sees only this rank's tokens (a block under
    sequence parallelism, the default) or every token (the final layer).
    """

    def __init__(self, config: FluxConfig, num_chunks: int, sequence_split: bool | None = None):
        super().__init__(config)
        self.num_chunks = num_chunks
        if sequence_split is None:
            sequence_split = config.sequence_parallel
        h = config.hidden_size
        self.linear = ModulationLinear(config, h, num_chunks * h, sequence_split)

    def forward(self, vec: Tensor) -> Tensor:
        """``vec [b, h]`` -> ``[b, n*h]``: the ``num_chunks`` chunks side by side (batch-first, so a slice of the
        batch is a slice of the rows)."""
        return self.linear(F.silu(vec))

    def split(self, out: Tensor) -> list[ModulationOut]:
        """``forward``'s ``[b, n*h]`` -> one ``ModulationOut`` per 3 chunks (one (shift, scale) pair if 2 chunks)."""
        chunks = out[None].chunk(self.num_chunks, dim=-1)  # each [1, b, h]
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.num_chunks, 3)]


class LastLayer(MegatronModule):
    """Final adaLN (shift, scale) + LayerNorm + Linear(h, in_channels). The LayerNorm + modulate is the blocks' op
    (one compiled kernel per direction with ``modulation_fusion``)."""

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        self.adaLN_modulation = Modulation(config, num_chunks=2, sequence_split=False)  # after the gather
        self.linear = replicated_linear(config, config.hidden_size, config.in_channels)
        ops = elementwise_ops(config.modulation_fusion)
        self.norm_modulate = functools.partial(ops.norm_modulate, eps=config.layernorm_epsilon)

    def modulations(self, vec: Tensor) -> tuple[Tensor]:
        """The adaLN modulation ``[b, 2h]`` of ``vec [b, h]`` (``Flux.conditioning``)."""
        return (self.adaLN_modulation(vec),)

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        """``x [s, b, h]``, its ``modulations(vec)`` -> ``[s, b, in_channels]``."""
        (mod,) = self.adaLN_modulation.split(modulation)
        return self.linear(self.norm_modulate(x, mod.shift, mod.scale))
