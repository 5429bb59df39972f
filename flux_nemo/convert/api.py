"""Format-level load / save / convert, used by the CLI (``python -m flux_nemo.convert``)."""

from __future__ import annotations

import os

import torch

from . import io
from .mapping import (
    ConversionError,
    bfl_to_megatron,
    check_state_dict,
    diffusers_to_megatron,
    megatron_layout,
    megatron_to_bfl,
    megatron_to_diffusers,
)

FORMATS = ("diffusers", "bfl", "flux-nemo")


def load_checkpoint(fmt: str, path: str | os.PathLike, config=None) -> tuple[dict[str, torch.Tensor], object]:
    """Read a checkpoint of format `fmt` and return (state dict in our names, FluxConfig).

    `config` (a FluxConfig) is required for BFL files, which carry none, and refused for the other formats,
    whose config travels with the weights.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "bfl":
        if config is None:
            raise ConversionError("a BFL checkpoint carries no config: give --flavor or --config")
        return bfl_to_megatron(io.load_bfl(path), config), config
    if config is not None:
        raise ConversionError(
            f"a {fmt} checkpoint carries its own config; --flavor/--config apply to bfl only"
        )
    if fmt == "diffusers":
        sd, cfg = io.load_diffusers(path)
        config = io.config_from_diffusers(cfg)
        return diffusers_to_megatron(sd, config), config
    sd, config = io.load_flux_nemo(path)
    check_state_dict(sd, megatron_layout(config), "flux-nemo")
    return sd, config


def save_checkpoint(
    fmt: str, sd: dict[str, torch.Tensor], config, path: str | os.PathLike, max_shard_size="10GB"
) -> None:
    """Write a state dict in our names as a checkpoint of format `fmt`."""
    if fmt == "diffusers":
        io.save_diffusers(megatron_to_diffusers(sd, config), config, path, max_shard_size)
    elif fmt == "bfl":
        io.save_bfl(megatron_to_bfl(sd, config), path)
    elif fmt == "flux-nemo":
        check_state_dict(sd, megatron_layout(config), "flux-nemo")
        io.save_flux_nemo(sd, config, path)
    else:
        raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def convert_checkpoint(
    src_fmt: str,
    dst_fmt: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config=None,
    max_shard_size="10GB",
):
    """Convert a checkpoint on disk; returns the FluxConfig it used."""
    if dst_fmt not in FORMATS:
        raise ConversionError(f"unknown format {dst_fmt!r}; expected one of {FORMATS}")
    sd, config = load_checkpoint(src_fmt, src, config)
    save_checkpoint(dst_fmt, sd, config, dst, max_shard_size)
    return config
