"""Tiny random encoders in HF layout, built offline, for CPU tests and demos of the raw data path.

``write_tiny_encoders(dir)`` writes three local folders that load exactly as the real ones do
(``FluxEncoders(t5, clip, vae)`` with ``local_files_only=True``):

* ``t5/``: a 2-layer ``T5EncoderModel`` and a word-level fast tokenizer (``</s>`` appended, ``<pad>`` = 0);
* ``clip/``: a 2-layer ``CLIPTextModel`` and a word-level fast tokenizer (``<|startoftext|> ... <|endoftext|>``,
  padded with ``<|endoftext|>``, as CLIP-L);
* ``vae/``: a diffusers ``AutoencoderKL`` with 3 downsamplings (64x64 images -> 8x8 latents), no quant convs
  (as the FLUX VAE).

Weights are random (seeded); the vocabulary is ``WORDS`` (other words map to ``<unk>``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WORDS = tuple(
    "a an the photo picture of cat dog dogs two three red blue green car bus street park man woman sitting "
    "on in at with mat table play playing running quick brown fox jumps over lazy near big small".split()
)


def _word_tokenizer(specials: list[str], template: str, **special_kwargs):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    used = [(s, vocab[s]) for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special_kwargs), len(vocab)


def write_tiny_encoders(
    out_dir: str | os.PathLike, *, seed: int = 0, hidden: int = 32, latent_channels: int = 4
) -> dict[str, str]:
    """Write tiny ``t5/``, ``clip/`` and ``vae/`` folders under ``out_dir``; returns ``{"t5", "clip", "vae"}``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out_dir)
    paths = {k: str(out / k) for k in ("t5", "clip", "vae")}
    torch.manual_seed(seed)

    t5_tok, v = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    t5_cfg = T5Config(
        vocab_size=v, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=hidden // 8,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    T5EncoderModel(t5_cfg).save_pretrained(paths["t5"])
    t5_tok.save_pretrained(paths["t5"])

    clip_tok, v = _word_tokenizer(
        ["<|startoftext|>", "<|endoftext|>", "<unk>"], "<|startoftext|> $A <|endoftext|>",
        pad_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
    )  # fmt: skip
    clip_cfg = CLIPTextConfig(
        vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=hidden // 8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    CLIPTextModel(clip_cfg).save_pretrained(paths["clip"])
    clip_tok.save_pretrained(paths["clip"])

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    vae.save_pretrained(paths["vae"])
    return paths


def write_raw_webdataset(
    out_dir: str | os.PathLike, samples: list[dict], per_shard: int = 1000, pattern: str = "shard_%05d.tar"
) -> list[Path]:
    """Write raw samples ``{"key", "png" | "jpg" (bytes), "txt" (str), "json" (dict, optional)}`` as tar shards.

    Members in the order image, txt, json; returns the shard paths (no ``index.json``: loaders scan the shards).
    """
    import io
    import json
    import tarfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(samples), per_shard):
        path = out / (pattern % (k // per_shard))
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples[k : k + per_shard]:
                members = [(e, s[e]) for e in ("png", "jpg") if e in s]
                if "txt" in s:
                    members.append(("txt", s["txt"].encode()))
                if "json" in s:
                    members.append(("json", json.dumps(s["json"]).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def random_image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A smooth random RGB image (low-frequency pattern + noise) encoded as ``fmt``."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (3 + c) + rng.uniform(0, 6)) + np.cos(y / (4 + c)) for c in range(3)], -1)
    arr = np.clip((base + 2) * 60 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()
