"""Reading and writing the three checkpoint formats (see the package docstring for their layout on disk)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .mapping import EXTRA_STATE_SUFFIX, ConversionError, Dims

FORMAT_TAG = "flux-nemo"
OURS_WEIGHTS = "model.safetensors"
OURS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
# The FluxConfig fields that define the architecture; our config.json holds exactly these.
FLUX_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "in_channels",
    "vec_in_dim",
    "context_in_dim",
    "mlp_ratio",
    "num_double_blocks",
    "num_single_blocks",
    "axes_dim",
    "theta",
    "qkv_bias",
    "guidance_embed",
)


# ---------------------------------------------------------------------------------------------------------------
# Configs


def flux_fields(config) -> dict:
    """The architecture fields of a FluxConfig as a JSON-ready dict."""
    out = {}
    for f in FLUX_FIELDS:
        v = getattr(config, f)
        out[f] = list(v) if isinstance(v, tuple | list) else v
    return out


def config_from_fields(fields: Mapping):
    """A FluxConfig from the dict written by :func:`flux_fields` (the model package is imported lazily)."""
    from flux_nemo.model import FluxConfig

    unknown = sorted(set(fields) - set(FLUX_FIELDS))
    if unknown:
        raise ConversionError(f"unknown config field(s): {', '.join(unknown)}")
    missing = sorted(set(FLUX_FIELDS) - set(fields))
    if missing:
        raise ConversionError(f"missing config field(s): {', '.join(missing)}")
    kwargs = dict(fields)
    kwargs["axes_dim"] = tuple(kwargs["axes_dim"])
    return FluxConfig.from_flavor("tiny", **kwargs)


def config_from_diffusers(cfg: Mapping):
    from flux_nemo.model import FluxConfig

    return FluxConfig.from_diffusers_config(dict(cfg))


def config_from_flavor(flavor: str):
    from flux_nemo.model import FluxConfig

    return FluxConfig.from_flavor(flavor)


def load_config_json(path: str | os.PathLike):
    """A FluxConfig from a JSON file: either our config.json (flux fields) or a diffusers transformer config."""
    cfg = json.loads(Path(path).read_text())
    if "num_single_layers" in cfg or "_class_name" in cfg:
        return config_from_diffusers(cfg)
    cfg.pop("format", None)
    return config_from_fields(cfg)


def diffusers_config(config) -> dict:
    """The diffusers FluxTransformer2DModel config.json for a FluxConfig (errors where diffusers cannot express it)."""
    d = Dims.from_config(config)
    axes = [int(a) for a in config.axes_dim]
    problems = []
    if float(config.theta) != 10000:
        problems.append(f"theta={config.theta} (diffusers fixes 10000)")
    if d.mlp != 4 * d.hidden:
        problems.append(f"MLP width {d.mlp} != 4 * hidden {d.hidden} (diffusers fixes mlp_ratio 4)")
    if sum(axes) != d.head_dim:
        problems.append(f"sum(axes_dim)={sum(axes)} != head_dim {d.head_dim}")
    if problems:
        raise ConversionError("config cannot be written as a diffusers Flux config: " + "; ".join(problems))
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = "0.42.1"
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": version,
        "patch_size": 1,
        "in_channels": d.in_channels,
        "out_channels": None,
        "num_layers": d.num_double,
        "num_single_layers": d.num_single,
        "attention_head_dim": d.head_dim,
        "num_attention_heads": d.heads,
        "joint_attention_dim": d.context_in_dim,
        "pooled_projection_dim": d.vec_in_dim,
        "guidance_embeds": False,
        "axes_dims_rope": axes,
    }


# ---------------------------------------------------------------------------------------------------------------
# Files


def _save(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def parse_size(size: str | int) -> int:
    """'10GB' -> 10**10, '500MB', '64KiB', or a plain number of bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def load_diffusers(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of a diffusers transformer folder (or a pipeline folder with transformer/)."""
    root = Path(path)
    if not (root / "config.json").exists() and (root / "transformer" / "config.json").exists():
        root = root / "transformer"
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ConversionError(
            f"{root / 'config.json'} is a {cfg['_class_name']}, not a FluxTransformer2DModel"
        )
    indices = sorted(root.glob("*.safetensors.index.json"))
    if indices:
        if len(indices) > 1:
            raise ConversionError(f"several safetensors index files in {root}: {[p.name for p in indices]}")
        weight_map = json.loads(indices[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (root / DIFFUSERS_WEIGHTS).exists():
        files = [DIFFUSERS_WEIGHTS]
    else:
        files = [p.name for p in root.glob("*.safetensors")]
        if len(files) != 1:
            raise ConversionError(
                f"expected one *.safetensors file or an index json in {root}, found {files}"
            )
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(str(root / name))
        dup = sorted(sd.keys() & part.keys())
        if dup:
            raise ConversionError(f"key(s) {dup} appear in more than one shard of {root}")
        sd.update(part)
    if indices:
        listed = set(weight_map)
        if listed != sd.keys():
            raise ConversionError(
                f"{indices[0].name} does not match the shards: not in shards {sorted(listed - sd.keys())}, "
                f"not in index {sorted(sd.keys() - listed)}"
            )
    return sd, cfg


def save_diffusers(
    sd: Mapping[str, torch.Tensor], config, path: str | os.PathLike, max_shard_size: str | int = "10GB"
) -> None:
    """Write a diffusers transformer folder: config.json + one safetensors file, or shards + index json."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = diffusers_config(config)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], root / DIFFUSERS_WEIGHTS)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
            _save(shard, root / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_bfl(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_bfl(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(sd, path)


def load_flux_nemo(path: str | os.PathLike):
    """(state dict, FluxConfig) of a flux-nemo checkpoint folder."""
    root = Path(path)
    fields = json.loads((root / OURS_CONFIG).read_text())
    tag = fields.pop("format", None)
    if tag != FORMAT_TAG:
        raise ConversionError(f"{root / OURS_CONFIG} is not a flux-nemo config (format={tag!r})")
    return load_file(str(root / OURS_WEIGHTS)), config_from_fields(fields)


def save_flux_nemo(sd: Mapping[str, torch.Tensor], config, path: str | os.PathLike) -> None:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _save(sd, root / OURS_WEIGHTS)
    (root / OURS_CONFIG).write_text(
        json.dumps({"format": FORMAT_TAG, **flux_fields(config)}, indent=2) + "\n"
    )
