"""Helpers for the model tests: random (non-zero) weights and matching inputs."""

import torch

from flux_nemo.model import FluxConfig


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, so gates, final layer and biases all matter (init zeroes them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1 + 0.1 * noise if "layernorm" in name else std * noise)
    return model


def image_ids(batch: int, h: int, w: int) -> torch.Tensor:
    """(0, row, col) ids of an h x w patch grid, ``[batch, h*w, 3]``."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(1, h * w, 3)
    return ids.expand(batch, -1, -1).float()


def make_inputs(
    config: FluxConfig, batch: int, h: int, w: int, txt_len: int, seed: int = 1, dtype=torch.float32
):
    """Batch-first inputs of ``Flux.forward`` for an h x w grid and ``txt_len`` text tokens."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": dtype}
    return dict(
        img=torch.randn(batch, h * w, config.in_channels, **kw),
        txt=torch.randn(batch, txt_len, config.context_in_dim, **kw),
        y=torch.randn(batch, config.vec_in_dim, **kw),
        timesteps=torch.rand(batch, **kw),
        img_ids=image_ids(batch, h, w),
        txt_ids=torch.zeros(batch, txt_len, 3),
    )


def adamw_step(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float = 1e-4):
    """One step, from a fresh state, of the training AdamW (``build_torch_adamw``: the MLPerf betas, eps 1e-8 and
    weight decay 0.1 on every parameter) on copies of ``weights`` in fp32 (fp64 for fp64 weights).

    Returns:
        the stepped copies, by name.
    """
    from flux_nemo.training.optim import build_torch_adamw

    params = {}
    for name, weight in weights.items():
        param = weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).clone().requires_grad_()
        param.grad = grads[name].detach().to(param)
        params[name] = param
    build_torch_adamw(params.values(), lr).step()
    return {name: param.detach() for name, param in params.items()}
