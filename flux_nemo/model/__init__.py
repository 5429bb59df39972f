"""The Flux.1 DiT as Megatron-Core modules: ``FluxConfig``, ``build_flux`` and the ``Flux`` module."""

from flux_nemo.model.config import FluxConfig
from flux_nemo.model.flux import Flux, build_flux

__all__ = ["Flux", "FluxConfig", "build_flux"]
