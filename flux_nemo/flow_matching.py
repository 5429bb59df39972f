"""The MLPerf flux1 rectified-flow objective as pure tensor functions (reference: torchtitan@9603aa83).

Every function runs on the device of its inputs, draws its randomness there (``torch.rand*`` with the device's
current generator: on GPU the trainer's own stream, ``flux_nemo.training.rng``; on CPU the default generator, seeded
per data-parallel rank by the trainer), never reads a value back to the host and keeps shapes static, so a training
step built from them can be captured in a CUDA graph.

Training sample (reference ``FluxTrainer.train_step``, preprocessed path):
    z      = mean + exp(0.5 * logvar) * eps            fresh VAE posterior sample every step
    x0     = (z - 0.1159) * 0.3611                      shift first, then scale
    t5, clip <- empty encodings with probability 0.1    both together, per sample (classifier-free guidance)
    t      ~ U[0, 1)                                    no shift, no logit-normal
    x_t    = (1 - t) * x0 + t * noise                   t = 0 is data, t = 1 is noise
    target = noise - x0                                 loss = MSE mean in fp32
Evaluation uses the stored ``timestep / 8`` instead of a random t, no dropout, and the per-sample MSE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

VAE_SHIFT = 0.1159
VAE_SCALE = 0.3611
CFG_DROPOUT = 0.1
EVAL_TIMESTEPS = 8


class ModelInputs(NamedTuple):
    """Arguments of ``Flux.forward`` (batch-first) and the regression target."""

    img: Tensor  # [B, L_img, C * 4]
    txt: Tensor  # [B, L_txt, context_in_dim]
    y: Tensor  # [B, vec_in_dim]
    timesteps: Tensor  # [B] in [0, 1)
    img_ids: Tensor  # [B, L_img, 3]
    txt_ids: Tensor  # [B, L_txt, 3]
    target: Tensor  # [B, L_img, C * 4], packed like img


def pack_latents(z: Tensor) -> Tensor:
    """``b c (h 2) (w 2) -> b (h w) (c 2 2)``: 2x2 patches, channel-major inside a patch (BFL convention)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2)
    return z.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of spatial size ``height x width``."""
    b, _, d = x.shape
    c, h, w = d // 4, height // 2, width // 2
    x = x.reshape(b, h, w, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, row, col)`` of an ``h x w`` patch grid, row-major like :func:`pack_latents`."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()
    return ids.unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text position ids: all zeros (text tokens get no rotary rotation)."""
    return torch.zeros(batch, length, 3, device=device)


def sample_posterior(mean: Tensor, logvar: Tensor) -> Tensor:
    """A fresh sample of the VAE posterior ``N(mean, exp(logvar))`` (never the mean alone)."""
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def scale_latents(z: Tensor) -> Tensor:
    """VAE latent normalisation of the reference: shift by 0.1159, then scale by 0.3611."""
    return (z - VAE_SHIFT) * VAE_SCALE


def drop_conditioning(
    t5: Tensor, clip: Tensor, t5_empty: Tensor, clip_empty: Tensor, p: float = CFG_DROPOUT
) -> tuple[Tensor, Tensor]:
    """Replace T5 and CLIP together by the empty-prompt encodings for a Bernoulli(p) subset of samples."""
    drop = torch.rand(t5.shape[0], device=t5.device) < p
    t5 = torch.where(drop[:, None, None], t5_empty.to(t5.dtype), t5)
    clip = torch.where(drop[:, None], clip_empty.to(clip.dtype), clip)
    return t5, clip


def sample_timesteps(batch: int, device: torch.device | str | None = None) -> Tensor:
    """t ~ U[0, 1), drawn on the device."""
    return torch.rand(batch, device=device)


def eval_timesteps(timestep: Tensor) -> Tensor:
    """The fixed evaluation time of each sample: its stored integer ``timestep`` (0..7) divided by 8."""
    return timestep.float() / EVAL_TIMESTEPS


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` with t broadcast over the non-batch dimensions."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target of rectified flow: ``noise - x0``."""
    return noise - x0


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Training loss: plain MSE mean over every element, in fp32."""
    return F.mse_loss(pred.float(), target.float())


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Evaluation loss: MSE per sample (mean over all but the batch dimension), in fp32."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


def build_inputs(
    batch: dict[str, Tensor],
    t: Tensor,
    dtype: torch.dtype,
    empty: tuple[Tensor, Tensor] | None = None,
    p_drop: float = CFG_DROPOUT,
) -> ModelInputs:
    """Model inputs and target for a batch (``t5, clip, mean, logvar``) at times ``t``.

    ``empty`` is ``(t5_empty, clip_empty)``; when given, classifier-free-guidance dropout is applied with
    probability ``p_drop`` (training). ``dtype`` is the compute dtype of x0, noise, x_t and the target (bf16 in the
    reference); the loss is later taken in fp32.
    """
    mean, logvar = batch["mean"].to(dtype), batch["logvar"].to(dtype)
    x0 = scale_latents(sample_posterior(mean, logvar))
    noise = torch.randn_like(x0)
    t5, clip = batch["t5"].to(dtype), batch["clip"].to(dtype)
    if empty is not None:
        t5, clip = drop_conditioning(t5, clip, empty[0], empty[1], p_drop)
    b, _, h, w = x0.shape
    return ModelInputs(
        img=pack_latents(add_noise(x0, noise, t)),
        txt=t5,
        y=clip,
        timesteps=t.to(dtype),
        img_ids=image_ids(b, h // 2, w // 2, x0.device),
        txt_ids=text_ids(b, t5.shape[1], x0.device),
        target=pack_latents(velocity_target(x0, noise)),
    )


def training_inputs(
    batch: dict[str, Tensor], empty: tuple[Tensor, Tensor], dtype: torch.dtype, p_drop: float = CFG_DROPOUT
) -> ModelInputs:
    """Training step inputs: random t ~ U[0, 1) and CFG dropout with the empty encodings."""
    t = sample_timesteps(batch["mean"].shape[0], batch["mean"].device)
    return build_inputs(batch, t, dtype, empty, p_drop)


def eval_inputs(batch: dict[str, Tensor], dtype: torch.dtype) -> ModelInputs:
    """Evaluation inputs: t = timestep / 8, no dropout, fresh posterior sample and noise."""
    return build_inputs(batch, eval_timesteps(batch["timestep"]), dtype)
