"""preprocess/encode.py: raw webdataset -> official format, bit for bit equal to the encoders run directly."""

import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from preprocess_testlib import SCRIPTS, load_script

from flux_nemo.data.encoders import FluxEncoders
from flux_nemo.data.format import RecordShapes
from flux_nemo.data.readers import open_source
from flux_nemo.data.tiny_assets import random_image_bytes, write_raw_webdataset

encode = load_script("encode")
SHAPES = RecordShapes(t5_len=256, t5_dim=32, clip_dim=32, latent_channels=4, latent_size=8)
WORDS = "a photo of the cat dog red car man sitting on mat two dogs play in park".split()


def raw_set(root, n, coco: bool):
    rng = np.random.default_rng(n)
    samples = []
    for i in range(n):
        caption = " ".join(rng.choice(WORDS, int(rng.integers(1, 12))))
        meta = {"id": str(5000 + i), "timestep": i % 8} if coco else {"key": f"cc-{i:04d}", "index": 3 * i}
        samples.append(
            {"key": f"{i:012d}", "png": random_image_bytes(64, 64, seed=i), "txt": caption, "json": meta}
        )
    write_raw_webdataset(root, samples, per_shard=4)
    return samples


@torch.no_grad()
def direct(enc, samples, spans):
    """Per-sample encoder outputs computed directly (HF calls, PIL decode), batched as ``spans``."""
    out = {k: [] for k in ("t5_encodings", "clip_encodings", "mean", "logvar")}
    for a, b in spans:
        caps = [s["txt"] for s in samples[a:b]]
        t5 = enc.t5_tokenizer(
            caps, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
        )
        clip = enc.clip_tokenizer(
            caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        imgs = np.stack([np.array(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples[a:b]])
        x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0).to(torch.bfloat16)
        mean, logvar = enc.vae.encoder(x).chunk(2, dim=1)
        out["t5_encodings"] += list(enc.t5(input_ids=t5.input_ids).last_hidden_state)
        out["clip_encodings"] += list(enc.clip(input_ids=clip.input_ids).pooler_output)
        out["mean"] += list(mean)
        out["logvar"] += list(logvar)
    return out


def assert_readback(path, fmt, samples, expected, coco: bool):
    src = open_source(path, SHAPES, fmt=fmt)
    assert len(src) == len(samples)
    for i, s in enumerate(samples):
        buf = {c: np.empty((1, *shape), np.uint16) for c, shape in SHAPES.fields().items()}
        ts = src.fill(i, buf, 0)
        assert src.key(i) == (s["json"]["id"] if coco else s["json"]["key"])
        assert ts == (s["json"]["timestep"] if coco else -1)
        for col, per_sample in expected.items():
            want = per_sample[i]
            got = torch.from_numpy(buf[col][0]).view(torch.bfloat16)
            assert want.dtype == torch.bfloat16 and torch.equal(got, want), (i, col)


def args(raw, out, enc_paths, *extra):
    return ["--input", str(raw), "--output", str(out), "--t5", enc_paths["t5"], "--clip", enc_paths["clip"],
            "--vae", enc_paths["vae"], "--image-size", "64", "--threads", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def enc(tiny_encoder_paths):
    return FluxEncoders(
        tiny_encoder_paths["t5"], tiny_encoder_paths["clip"], tiny_encoder_paths["vae"], device="cpu"
    )


def test_coco_parts_partial_batches_and_resume(tmp_path, tiny_encoder_paths, enc):
    samples = raw_set(tmp_path / "raw", 10, coco=True)
    out = tmp_path / "coco_pre"
    argv = args(
        tmp_path / "raw", out, tiny_encoder_paths, "--dataset=coco", "--batch-size=4", "--part-size=6"
    )
    assert encode.main([*argv, "--keep-parts"]) == 0
    # parts [0, 6) and [6, 10); batches of 4, the last of each part partial
    expected = direct(enc, samples, [(0, 4), (4, 6), (6, 10)])
    assert_readback(out, "arrow", samples, expected, coco=True)
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["__key__", "t5_encodings", "clip_encodings", "mean", "logvar", "timestep"]
    assert ds.features["timestep"].dtype == "int32" and ds["timestep"] == [i % 8 for i in range(10)]

    # resume: the first part is finished and is not redone; the second (no .done marker) is redone
    parts = tmp_path / "coco_pre.parts"
    first = parts / "part-000000000-000000006" / "data-00000-of-00001.arrow"
    second = parts / "part-000000006-000000010" / "data-00000-of-00001.arrow"
    t_first, t_second, before = first.stat().st_mtime_ns, second.stat().st_mtime_ns, ds.to_dict()
    (parts / "part-000000006-000000010.done").unlink()
    (tmp_path / "coco_pre.done").unlink()
    assert encode.main([*argv, "--keep-parts"]) == 0
    assert first.stat().st_mtime_ns == t_first  # finished part not redone
    assert second.stat().st_mtime_ns != t_second  # unfinished part redone
    assert datasets.load_from_disk(str(out)).to_dict() == before
    (tmp_path / "coco_pre.done").unlink()
    assert encode.main(argv) == 0  # all parts finished: merge only, then the parts are removed
    assert first.exists() is False and not parts.exists()
    assert datasets.load_from_disk(str(out)).to_dict() == before
    assert encode.main(argv) == 0  # complete: nothing to do
    (tmp_path / "coco_pre.done").unlink()
    (parts / "manifest.json").parent.mkdir()
    (parts / "manifest.json").write_text('{"num_samples": 10, "world_size": 2}')
    with pytest.raises(ValueError, match="written by a different run"):
        encode.main(argv)  # parts of another layout are never mixed in


def test_cc12m_no_timestep_and_webdataset_output(tmp_path, tiny_encoder_paths, enc):
    samples = raw_set(tmp_path / "raw", 7, coco=False)
    out, wds = tmp_path / "cc_pre", tmp_path / "cc_wds"
    argv = args(
        tmp_path / "raw", out, tiny_encoder_paths, "--dataset=cc12m", "--batch-size=3", f"--wds-output={wds}"
    )
    encode.main(argv)
    expected = direct(enc, samples, [(0, 3), (3, 6), (6, 7)])
    assert_readback(out, "arrow", samples, expected, coco=False)
    assert_readback(wds, "webdataset", samples, expected, coco=False)
    assert "timestep" not in datasets.load_from_disk(str(out)).column_names


def test_bad_sample_is_an_error_naming_it(tmp_path, tiny_encoder_paths):
    samples = raw_set(tmp_path / "raw", 3, coco=True)
    samples[2]["json"] = {"id": "7"}
    write_raw_webdataset(tmp_path / "raw", samples, per_shard=4)
    with pytest.raises(ValueError, match=r"shard_00000\.tar:000000000002: json has no 'timestep'"):
        encode.main(args(tmp_path / "raw", tmp_path / "o", tiny_encoder_paths, "--dataset=coco"))


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path, tiny_encoder_paths, enc):
    samples = raw_set(tmp_path / "raw", 10, coco=True)
    out = tmp_path / "pre"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPTS / "encode.py"), *args(tmp_path / "raw", out, tiny_encoder_paths, "--dataset=coco",
           "--batch-size=4", "--part-size=3")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0: [0, 5) in parts [0, 3) + [3, 5); rank 1: [5, 10) in parts [5, 8) + [8, 10).
    # torchrun runs each rank with OMP_NUM_THREADS=1, and CPU conv results depend on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = direct(enc, samples, [(0, 3), (3, 5), (5, 8), (8, 10)])
    finally:
        torch.set_num_threads(threads)
    assert_readback(out, "arrow", samples, expected, coco=True)
    assert json.loads((tmp_path / "pre.done").read_text())["count"] == 10
