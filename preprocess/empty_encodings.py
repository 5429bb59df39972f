"""Encodings of the empty prompt ``""``: ``t5_empty.npy`` [1, 256, 4096] and ``clip_empty.npy`` [1, 768], float16.

As the reference ``save_empty_encodings.py``: the empty caption goes through the same tokenisation (T5: ``</s>``
then 255 pads; CLIP: BOS, EOS, then pads to 77) and the same bf16 encoders, without attention masks, as every
other caption (``flux_nemo.data.encoders.FluxEncoders.encode_text``); the result is written as float16 by
``flux_nemo.data.format.save_empty_encodings`` (read back as bf16 by ``load_empty_encodings``). The VAE folder is
not needed.

Usage:
  python preprocess/empty_encodings.py --t5 /models/t5 --clip /models/clip --output-dir /data/empty_encodings
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("empty_encodings")


def empty_encodings(t5_path, clip_path, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t5 [1, 256, D], clip [1, D_clip])`` bf16 encodings of ``""``."""
    from flux_nemo.data.encoders import FluxEncoders

    return FluxEncoders(t5_path, clip_path, None, device=device).encode_text([""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t5", required=True, help="local T5 folder (HF layout, with tokenizer)")
    p.add_argument("--clip", required=True, help="local CLIP text folder (HF layout, with tokenizer)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from flux_nemo.data.format import save_empty_encodings

    t5, clip = empty_encodings(a.t5, a.clip, a.device)
    save_empty_encodings(a.output_dir, t5, clip)
    log.info("wrote t5_empty.npy %s and clip_empty.npy %s (float16) to %s", tuple(t5.shape), tuple(clip.shape),
             a.output_dir)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
