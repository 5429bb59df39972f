"""Frozen encoders of the on-the-fly (raw) data path: T5-XXL, CLIP-L and the FLUX VAE encoder.

As the reference (reference.md §3, §5.2, §9): captions are tokenised with max-length padding and truncation
(T5: 256 tokens, CLIP: 77) and encoded WITHOUT an attention mask; T5 gives ``last_hidden_state``
``[B, 256, 4096]`` (pads included), CLIP gives ``pooler_output`` ``[B, 768]``. Images in [-1, 1] go through the
VAE encoder (plus ``quant_conv`` if the model has one; the FLUX VAE has none); its output is chunked into the raw
moments ``mean`` and ``logvar`` ``[B, 16, H/8, W/8]``: no sampling, no clamp, no shift or scale. Every encoder
runs with all of its parameters in bf16 (as the reference's bf16 encoders), so outputs are bf16.

Everything loads from local folders in HF layout (``local_files_only=True``): a T5 folder (``T5EncoderModel`` +
its tokenizer), a CLIP folder (``CLIPTextModel`` + its tokenizer) and a diffusers ``AutoencoderKL`` folder
(e.g. the ``vae/`` folder of FLUX.1-schnell). Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

T5_MAX_LENGTH = 256
CLIP_MAX_LENGTH = 77


def _local_dir(path: str | os.PathLike, what: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} folder not found: {p} (encoders load from local folders in HF layout; nothing is downloaded)"
        )
    return str(p)


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids ``[B, max_length]`` (int64): padded to ``max_length`` and truncated, as the reference."""
    out = tokenizer(
        list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    ids = out["input_ids"]
    if ids.shape[1] != max_length:
        raise ValueError(f"tokenizer returned {ids.shape[1]} tokens, expected {max_length}")
    return ids


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (HWC, as decoded) -> float32 ``[B, 3, H, W]`` in [-1, 1] (``x / 255 * 2 - 1``)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


def vae_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw moments ``(mean, logvar)`` of a diffusers ``AutoencoderKL`` encoder (no sampling, no clamp)."""
    h = vae.encoder(images)
    quant_conv = getattr(vae, "quant_conv", None)
    if quant_conv is not None:
        h = quant_conv(h)
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar


class FluxEncoders:
    """T5 + CLIP + VAE encoder, frozen, in ``dtype`` (bf16) on ``device``; loaded from local HF folders.

    ``encode(captions, images_uint8)`` returns ``{"t5", "clip", "mean", "logvar"}`` in the batch contract dtypes.
    """

    def __init__(
        self,
        t5_path: str | os.PathLike,
        clip_path: str | os.PathLike,
        vae_path: str | os.PathLike | None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        t5_max_length: int = T5_MAX_LENGTH,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ):
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_max_length
        t5_dir = _local_dir(t5_path, "T5")
        clip_dir = _local_dir(clip_path, "CLIP")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        # .to(dtype) after loading: every parameter in bf16 (T5 would otherwise keep `wo` in fp32)
        self.t5 = self._frozen(T5EncoderModel.from_pretrained(t5_dir, dtype=dtype, local_files_only=True))
        self.clip = self._frozen(CLIPTextModel.from_pretrained(clip_dir, dtype=dtype, local_files_only=True))
        self.vae = None  # text-only (e.g. for the empty encodings) when vae_path is None
        if vae_path is not None:
            vae_dir = _local_dir(vae_path, "VAE")
            self.vae = self._frozen(
                AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype, local_files_only=True)
            )

    def _frozen(self, module):
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t5 [B, 256, D], clip [B, D_clip])`` in ``dtype`` for ``captions`` (no attention masks)."""
        t5_ids = tokenize(self.t5_tokenizer, captions, self.t5_max_length).to(self.device)
        clip_ids = tokenize(self.clip_tokenizer, captions, self.clip_max_length).to(self.device)
        t5 = self.t5(input_ids=t5_ids, attention_mask=None).last_hidden_state
        clip = self.clip(input_ids=clip_ids, attention_mask=None).pooler_output
        return t5.to(self.dtype), clip.to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, H, W, 3]`` -> ``(mean, logvar)`` ``[B, C, H/8, W/8]`` in ``dtype``."""
        if self.vae is None:
            raise RuntimeError("these encoders were loaded without a VAE (vae_path=None)")
        x = normalize_images(images.to(self.device)).to(self.dtype)
        mean, logvar = vae_moments(self.vae, x)
        return mean.to(self.dtype), logvar.to(self.dtype)

    def encode(self, captions: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four encoded tensors of a batch: ``{"t5", "clip", "mean", "logvar"}``."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
        t5, clip = self.encode_text(captions)
        mean, logvar = self.encode_images(images)
        return {"t5": t5, "clip": clip, "mean": mean, "logvar": logvar}
