"""CLI: ``python -m flux_nemo.convert --from diffusers|bfl|flux-nemo --to diffusers|bfl|flux-nemo SRC DST``."""

from __future__ import annotations

import argparse
import sys

from .api import FORMATS, convert_checkpoint
from .io import config_from_flavor, load_config_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flux_nemo.convert",
        description="Convert a Flux checkpoint between diffusers, BFL and flux-nemo formats (lossless).",
        epilog="Formats: diffusers = transformer folder; bfl = one .safetensors file; "
        "flux-nemo = folder with model.safetensors + config.json. See `pydoc flux_nemo.convert`.",
    )
    p.add_argument("--from", dest="src_fmt", choices=FORMATS, required=True)
    p.add_argument("--to", dest="dst_fmt", choices=FORMATS, required=True)
    p.add_argument("src")
    p.add_argument("dst")
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--flavor", help="model flavor of a BFL source (schnell | tiny)")
    cfg.add_argument("--config", help="config of a BFL source: our config.json or a diffusers config.json")
    p.add_argument("--max-shard-size", default="10GB", help="diffusers output shard size (default 10GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = None
        if args.flavor:
            config = config_from_flavor(args.flavor)
        elif args.config:
            config = load_config_json(args.config)
        config = convert_checkpoint(
            args.src_fmt, args.dst_fmt, args.src, args.dst, config, args.max_shard_size
        )
    except (ValueError, OSError) as e:  # ConversionError, config errors, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {args.src_fmt} {args.src} -> {args.dst_fmt} {args.dst} "
        f"(hidden {config.hidden_size}, {config.num_double_blocks}+{config.num_single_blocks} blocks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
