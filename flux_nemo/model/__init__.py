"""The Flux.1 DiT as Megatron-Core modules.

    config = FluxConfig.from_flavor("schnell")          # or "tiny"; any field overridable
    model = build_flux(config, backend="te")             # "local": Megatron + torch, runs on CPU / meta
    velocity = model(img, txt, y, timesteps, img_ids, txt_ids)   # batch-first, [b, s_img, in_channels]

Parameter names follow docs/DESIGN.md. ``Flux.block_runner`` is the per-block hook (recompute, FP8 context).
``Flux.conditioning(timesteps, y)`` is the adaLN modulations alone (a ``Conditioning``), which ``forward`` also takes
precomputed (``conditioning=``): a training step computes them once for all its micro-batches.
"""

from flux_nemo.model.config import FluxConfig
from flux_nemo.model.flux import Conditioning, Flux, build_flux

__all__ = ["Conditioning", "Flux", "FluxConfig", "build_flux"]
