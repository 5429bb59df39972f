"""Checkpoint conversion between diffusers, BFL and flux-nemo (lossless in every direction).

State dicts (no files, no model needed)::

    from flux_nemo.convert import diffusers_to_megatron, megatron_to_diffusers, bfl_to_megatron, megatron_to_bfl
    ours = diffusers_to_megatron(diffusers_sd, flux_config)     # also megatron_to_diffusers, bfl_to_megatron, ...

`flux_config` is a ``flux_nemo.model.FluxConfig`` (only its architecture fields are read). Every function checks
its input against the layout that the config implies and raises :class:`ConversionError` naming each unexpected
or missing key and each shape mismatch (expected and actual shape); entries ending in ``_extra_state`` (TE FP8
metadata) are ignored. The transforms only move rows and columns, so ``megatron_to_X(X_to_megatron(sd))`` is
bit-exact. What changes between the formats:

* QKV: ours is Megatron's per-head row layout ``[q_h, k_h, v_h]`` per head (docs/DESIGN.md); diffusers has
  separate ``to_q/to_k/to_v`` (``add_{q,k,v}_proj`` for text); BFL fuses ``[q; k; v]`` in one ``qkv`` block.
* Single blocks: BFL ``linear1`` rows are ``[qkv | mlp_in]`` (ours: ``linear_qkv`` + ``mlp.linear_fc1``);
  BFL ``linear2`` and diffusers ``proj_out`` columns are ``[attention | mlp]`` (ours: ``linear_proj`` without
  bias + ``mlp.linear_fc2`` that carries the bias).
* Final layer: diffusers ``norm_out.linear`` rows are (scale, shift); BFL and ours are (shift, scale).

Formats on disk (CLI ``python -m flux_nemo.convert --from F --to F SRC DST``, F in diffusers | bfl | flux-nemo):

* ``diffusers``: a FluxTransformer2DModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
  shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``);
  a pipeline folder with a ``transformer/`` subfolder is also read. Written sharded above ``--max-shard-size``.
* ``bfl``: one ``.safetensors`` file in BFL names (``flux1-schnell.safetensors``). It carries no config, so
  reading it needs ``--flavor schnell|tiny`` or ``--config FILE`` (our config.json or a diffusers config.json).
* ``flux-nemo``: a folder with ``model.safetensors`` (the state dict in our names, docs/DESIGN.md, no
  ``_extra_state``) and ``config.json``: ``{"format": "flux-nemo", <FluxConfig architecture fields>}`` with the
  fields ``hidden_size, num_attention_heads, in_channels, vec_in_dim, context_in_dim, mlp_ratio,
  num_double_blocks, num_single_blocks, axes_dim, theta, qkv_bias, guidance_embed``. Load it with
  :func:`load_flux_nemo` -> (state dict, FluxConfig), write it with :func:`save_flux_nemo`.
"""

from .api import convert_checkpoint, load_checkpoint, save_checkpoint
from .io import (
    diffusers_config,
    flux_fields,
    load_bfl,
    load_config_json,
    load_diffusers,
    load_flux_nemo,
    save_bfl,
    save_diffusers,
    save_flux_nemo,
)
from .mapping import (
    ConversionError,
    bfl_to_megatron,
    check_state_dict,
    diffusers_to_megatron,
    megatron_layout,
    megatron_to_bfl,
    megatron_to_diffusers,
)

__all__ = [
    "ConversionError",
    "bfl_to_megatron",
    "check_state_dict",
    "convert_checkpoint",
    "diffusers_config",
    "diffusers_to_megatron",
    "flux_fields",
    "load_bfl",
    "load_checkpoint",
    "load_config_json",
    "load_diffusers",
    "load_flux_nemo",
    "megatron_layout",
    "megatron_to_bfl",
    "megatron_to_diffusers",
    "save_bfl",
    "save_checkpoint",
    "save_diffusers",
    "save_flux_nemo",
]
