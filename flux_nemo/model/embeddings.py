"""Flux embeddings: 3-axis RoPE (EmbedND), the sinusoidal timestep embedding and the MLP embedder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_nemo.model.config import FluxConfig
from flux_nemo.model.main_grad import linear


def param_device(config: FluxConfig) -> torch.device | int | None:
    """Device for parameters this package allocates itself, following Megatron's linears.

    ``None`` means the caller's device context (CPU, or meta under ``with torch.device("meta")``).
    """
    if config.init_model_with_meta_device:
        return torch.device("meta")
    if config.use_cpu_initialization:
        return None
    return torch.cuda.current_device()


class ReplicatedLinear(nn.Linear):
    """An ``nn.Linear`` that every tensor-parallel rank holds whole (embedders, final layer); with
    ``gradient_accumulation_fusion`` its weight gradient goes straight into Megatron DDP's ``main_grad``
    (:func:`flux_nemo.model.main_grad.linear`)."""

    def __init__(self, config: FluxConfig, in_features: int, out_features: int):
        super().__init__(in_features, out_features, device=param_device(config), dtype=config.params_dtype)
        self.accumulate_into_main_grad = config.gradient_accumulation_fusion

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.accumulate_into_main_grad)


def replicated_linear(config: FluxConfig, in_features: int, out_features: int) -> ReplicatedLinear:
    """A linear layer that every tensor-parallel rank holds whole (embedders, final layer)."""
    return ReplicatedLinear(config, in_features, out_features)


def rope_frequencies(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE angles of position ids, in Megatron's interleaved layout.

    Axis ``i`` (``d_i = axes_dim[i]``) has its own frequencies ``1 / theta**(arange(0, d_i, 2) / d_i)``;
    the per-axis angle tables are concatenated in axis order (BFL ``EmbedND``). Each angle is repeated for
    the two elements (2k, 2k+1) of its pair, which is what Megatron/TE interleaved RoPE expects.

    Args:
        ids: positions ``[b, s, n_axes]``.

    Returns:
        float64 angles ``[s, b, 1, sum(axes_dim)]``.
    """
    angles = []
    for i, dim in enumerate(axes_dim):
        # float64 like the reference: positions * omega must not lose bits before cos/sin.
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., i].to(torch.float64)[..., None] * omega)  # [b, s, d_i / 2]
    freqs = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)  # [b, s, head_dim]
    return freqs.transpose(0, 1)[:, :, None, :]  # [s, b, 1, head_dim]


class EmbedND(nn.Module):
    """Multi-axis RoPE table for (axis, row, col) position ids; no parameters."""

    def __init__(self, axes_dim: tuple[int, ...], theta: int):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: Tensor) -> Tensor:
        """float64 angles ``[s, b, 1, head_dim]`` of ``ids [b, s, n_axes]``."""
        return rope_frequencies(ids, self.axes_dim, self.theta)


def apply_interleaved_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotate each pair (2k, 2k+1) of the last dim of ``t [s, b, np, hn]`` by ``freqs [s, b|1, 1, hn]``.

    Like BFL: cos and sin are taken at the precision of ``freqs`` (float64 from :class:`EmbedND`), the rotation
    is computed in fp32 (fp64 for fp64 inputs) and cast back.
    """
    return rotate_interleaved(t, *rope_cos_sin(freqs, t.dtype))


def rope_cos_sin(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles ``freqs`` (taken at their precision) in the compute dtype of a ``dtype`` tensor's
    rotation: fp32, or fp64 for fp64 tensors."""
    compute = torch.promote_types(dtype, torch.float32)
    return freqs.cos().to(compute), freqs.sin().to(compute)


def rotate_interleaved(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotation of :func:`apply_interleaved_rope` given :func:`rope_cos_sin`: in their dtype, cast back."""
    x = t.to(cos.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((-x_odd, x_even), dim=-1).flatten(-2)  # pairs (x0, x1) -> (-x1, x0)
    return (x * cos + rotated * sin).to(t.dtype)


def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: int = 10_000, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of timesteps in [0, 1]: ``cat([cos, sin])`` of ``1000 t * freqs``.

    The product is formed in fp32 (fp64 for fp64 inputs) so bf16 does not quantize ``1000 t``.

    Returns:
        ``[b, dim]`` in ``t``'s dtype.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    compute = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=compute, device=t.device) / half)
    args = (t.to(compute) * time_factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear to ``hidden_size`` (``time_in`` and ``vector_in``)."""

    def __init__(self, config: FluxConfig, in_dim: int):
        super().__init__()
        self.in_layer = replicated_linear(config, in_dim, config.hidden_size)
        self.out_layer = replicated_linear(config, config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))
