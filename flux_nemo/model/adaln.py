"""adaLN modulation (shift, scale, gate) and the final layer of Flux."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from flux_nemo.model.config import FluxConfig
from flux_nemo.model.embeddings import replicated_linear


def layer_norm(x: Tensor, config: FluxConfig) -> Tensor:
    """LayerNorm over the hidden dim without affine parameters (eps 1e-6 in Flux)."""
    return F.layer_norm(x, (x.shape[-1],), eps=config.layernorm_epsilon)


@dataclass
class ModulationOut:
    """One adaLN modulation, each tensor ``[1, b, h]`` (broadcast over the sequence)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None

    def modulate(self, x: Tensor) -> Tensor:
        """``(1 + scale) * x + shift``."""
        return (1 + self.scale) * x + self.shift


class Modulation(MegatronModule):
    """SiLU -> Linear(h, n*h) of the conditioning vector, chunked in the reference order.

    ``num_chunks`` is 6 (double blocks: (shift, scale, gate) x 2), 3 (single blocks) or 2 (final layer:
    (shift, scale)). The linear is replicated across tensor-parallel ranks: its input ``vec`` is replicated.
    """

    def __init__(self, config: FluxConfig, num_chunks: int):
        super().__init__(config)
        self.num_chunks = num_chunks
        self.linear = replicated_linear(config, config.hidden_size, num_chunks * config.hidden_size)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        """``vec [b, h]`` -> one ``ModulationOut`` per 3 chunks (one (shift, scale) pair if 2 chunks)."""
        chunks = self.linear(F.silu(vec))[None].chunk(self.num_chunks, dim=-1)  # each [1, b, h]
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.num_chunks, 3)]


class LastLayer(MegatronModule):
    """Final adaLN (shift, scale) + LayerNorm + Linear(h, in_channels)."""

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        self.adaLN_modulation = Modulation(config, num_chunks=2)
        self.linear = replicated_linear(config, config.hidden_size, config.in_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``x [s, b, h]``, ``vec [b, h]`` -> ``[s, b, in_channels]``."""
        (mod,) = self.adaLN_modulation(vec)
        return self.linear(mod.modulate(layer_norm(x, self.config)))
