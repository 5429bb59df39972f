"""Raw (on-the-fly) data path on CPU: DALI decode/resize, tiny local encoders, loaders, bad data."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flux_nemo.data.dali import ImageDecoder
from flux_nemo.data.encoders import FluxEncoders
from flux_nemo.data.raw import build_raw_eval_loader, build_raw_train_loader
from flux_nemo.data.raw_shards import RawShards, contiguous_range
from flux_nemo.data.tiny_assets import random_image_bytes, write_raw_webdataset, write_tiny_encoders

CAPTIONS = ["a photo of a cat", "two dogs play in the park", "a red car on the street", "a man sitting on a mat",
            "the quick brown fox jumps over a lazy dog", "a big bus near a small park", "three green cars"]  # fmt: skip


@pytest.fixture(scope="module")
def enc_paths(tmp_path_factory):
    return write_tiny_encoders(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def encoders(enc_paths):
    return FluxEncoders(enc_paths["t5"], enc_paths["clip"], enc_paths["vae"], device="cpu")


def make_set(root, n, *, coco: bool, per_shard=3):
    samples = []
    for i in range(n):
        s = {"key": f"{i:06d}", "png": random_image_bytes(64, 64, seed=i), "txt": CAPTIONS[i % len(CAPTIONS)]}
        s["json"] = {"id": str(1000 + i), "timestep": i % 8} if coco else {"key": f"cc-{i}"}
        samples.append(s)
    write_raw_webdataset(root, samples, per_shard=per_shard)
    return samples


@torch.no_grad()
def direct(encoders, samples):
    """Independent computation of one batch: PIL decode, x/255*2-1, HF tokenizers and models called directly."""
    caps = [s["txt"] for s in samples]
    t5_ids = encoders.t5_tokenizer(
        caps, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
    )
    clip_ids = encoders.clip_tokenizer(
        caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    imgs = np.stack([np.array(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0).to(torch.bfloat16)
    mean, logvar = encoders.vae.encoder(x).chunk(2, dim=1)
    return {
        "t5": encoders.t5(input_ids=t5_ids.input_ids).last_hidden_state,
        "clip": encoders.clip(input_ids=clip_ids.input_ids).pooler_output,
        "mean": mean,
        "logvar": logvar,
    }


def assert_batch_equal(batch, expected):
    for k, v in expected.items():
        assert batch[k].dtype == torch.bfloat16, k
        assert torch.equal(batch[k], v), k


def test_decoder_identity_crop_and_resize():
    rect = random_image_bytes(128, 64, seed=1)  # w=128, h=64
    square = random_image_bytes(64, 64, seed=2)
    big = random_image_bytes(128, 128, seed=3)
    crop = ImageDecoder(64, "crop", max_batch_size=4, device="cpu", num_threads=1)
    out = crop([square, rect])
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.uint8
    assert np.array_equal(out[0].numpy(), np.array(Image.open(io.BytesIO(square))))  # 64x64 unchanged
    # short side already 64: no resampling, centre crop of columns 32..95
    assert np.array_equal(out[1].numpy(), np.array(Image.open(io.BytesIO(rect)))[:, 32:96])
    resize = ImageDecoder(64, "resize", max_batch_size=4, device="cpu", num_threads=1)
    got = resize([big, rect]).numpy().astype(np.int32)
    for i, b in enumerate([big, rect]):
        pil = np.array(Image.open(io.BytesIO(b)).resize((64, 64), Image.Resampling.BICUBIC)).astype(np.int32)
        assert np.abs(got[i] - pil).mean() < 3.0  # bicubic, antialiased: close to PIL's
    with pytest.raises(ValueError, match="mode must be"):
        ImageDecoder(64, "pad", device="cpu")


def test_decoder_corrupt_image_names_sample():
    dec = ImageDecoder(64, "crop", max_batch_size=2, device="cpu", num_threads=1)
    good = random_image_bytes(64, 64, seed=0)
    with pytest.raises(ValueError, match=r"s\.tar:bad-key: cannot decode image"):
        dec([good, good[:40] + b"\x00" * 50], names=["s.tar:ok", "s.tar:bad-key"])


def test_contiguous_range_matches_datasets_shard():
    # datasets: Dataset.shard(num_shards, index, contiguous=True): first n % world ranks get one more
    assert [contiguous_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [contiguous_range(3, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_train_loader_batches_order_wrap_and_resume(tmp_path, encoders, enc_paths):
    samples = make_set(tmp_path / "cc", 7, coco=False)
    loader = build_raw_train_loader(tmp_path / "cc", encoders, 3, dp_rank=0, dp_world=1, image_size=64,
                                    num_threads=1)  # fmt: skip
    b0, b1, b2 = next(loader), next(loader), next(loader)
    assert set(b0) == {"t5", "clip", "mean", "logvar", "timestep", "valid"}
    assert b0["t5"].shape == (3, 256, 32) and b0["clip"].shape == (3, 32) and b0["mean"].shape == (3, 4, 8, 8)
    assert b0["timestep"].dtype == torch.int64 and b0["timestep"].tolist() == [-1, -1, -1]
    assert b0["valid"].dtype == torch.bool and b0["valid"].all()
    assert_batch_equal(b0, direct(encoders, samples[0:3]))
    assert_batch_equal(b1, direct(encoders, samples[3:6]))
    assert_batch_equal(b2, direct(encoders, [samples[6], samples[0], samples[1]]))  # wraps, in order
    state = loader.state_dict()
    b3 = next(loader)
    resumed = build_raw_train_loader(tmp_path / "cc", encoders, 3, image_size=64, num_threads=1)
    resumed.load_state_dict(state)
    assert_batch_equal(next(resumed), {k: b3[k] for k in ("t5", "clip", "mean", "logvar")})
    bad = build_raw_train_loader(tmp_path / "cc", encoders, 3, dp_world=2, image_size=64, num_threads=1)
    with pytest.raises(ValueError, match="cannot resume"):
        bad.load_state_dict(state)
    # encoders given as local folder paths: loaded by the builder, same batches
    from_paths = build_raw_train_loader(
        tmp_path / "cc", enc_paths, 3, image_size=64, device="cpu", num_threads=1
    )
    assert_batch_equal(next(from_paths), {k: b0[k] for k in ("t5", "clip", "mean", "logvar")})
    # rank 1 of 2 reads the second contiguous chunk (samples 4..6)
    r1 = build_raw_train_loader(
        tmp_path / "cc", encoders, 3, dp_rank=1, dp_world=2, image_size=64, num_threads=1
    )
    assert_batch_equal(next(r1), direct(encoders, samples[4:7]))


def test_eval_loader_pads_and_keeps_timesteps(tmp_path, encoders):
    samples = make_set(tmp_path / "coco", 5, coco=True, per_shard=2)
    seen = []
    for rank in range(2):
        loader = build_raw_eval_loader(tmp_path / "coco", encoders, 2, dp_rank=rank, dp_world=2, image_size=64,
                                       num_threads=1)  # fmt: skip
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # every rank the same number of batches
        for b in batches:
            seen += [t for t, v in zip(b["timestep"].tolist(), b["valid"].tolist(), strict=True) if v]
            assert all(
                t == 0 for t, v in zip(b["timestep"].tolist(), b["valid"].tolist(), strict=True) if not v
            )
        valid = torch.cat([b["valid"] for b in batches]).tolist()
        assert valid == ([True, True, True, False] if rank == 0 else [True, True, False, False])
        first = samples[0:2] if rank == 0 else samples[3:5]
        assert_batch_equal(batches[0], direct(encoders, first))
    assert seen == [s["json"]["timestep"] for s in samples]


def test_bad_data_names_shard_and_key(tmp_path, encoders):
    ok = random_image_bytes(64, 64, seed=0)
    write_raw_webdataset(
        tmp_path / "nocap", [{"key": "k0", "png": ok, "txt": "a cat"}, {"key": "k1", "png": ok}]
    )
    with pytest.raises(ValueError, match=r"shard_00000\.tar:k1: no caption member 'txt'"):
        list(RawShards(tmp_path / "nocap").iter_range(0, 2))
    write_raw_webdataset(tmp_path / "nots", [{"key": "k0", "png": ok, "txt": "a cat", "json": {"id": "1"}}])
    loader = build_raw_eval_loader(tmp_path / "nots", encoders, 1, image_size=64, num_threads=1)
    with pytest.raises(ValueError, match=r"shard_00000\.tar:k0: json has no 'timestep'"):
        list(loader)
    write_raw_webdataset(tmp_path / "nojson", [{"key": "k0", "png": ok, "txt": "a cat"}])
    with pytest.raises(ValueError, match=r"k0: no 'json' member"):
        list(build_raw_eval_loader(tmp_path / "nojson", encoders, 1, image_size=64, num_threads=1))
    write_raw_webdataset(tmp_path / "badimg", [{"key": "k0", "png": ok[:50], "txt": "a cat"}])
    with pytest.raises(ValueError, match=r"shard_00000\.tar:k0: cannot decode image"):
        next(build_raw_train_loader(tmp_path / "badimg", encoders, 1, image_size=64, num_threads=1))
    (tmp_path / "trunc").mkdir()
    [shard] = write_raw_webdataset(
        tmp_path / "full", [{"key": f"k{i}", "png": ok, "txt": "a"} for i in range(4)]
    )
    (tmp_path / "trunc" / "shard_00000.tar").write_bytes(
        shard.read_bytes()[: shard.stat().st_size // 2 + 100]
    )
    with pytest.raises(ValueError, match=r"trunc/shard_00000\.tar: corrupt or truncated tar shard"):
        RawShards(tmp_path / "trunc")
    with pytest.raises(FileNotFoundError, match="no webdataset .tar shards"):
        RawShards(tmp_path / "missing")


def test_encoders_load_only_local_folders(tmp_path, enc_paths):
    with pytest.raises(FileNotFoundError, match="T5 folder not found"):
        FluxEncoders(tmp_path / "nope", enc_paths["clip"], enc_paths["vae"], device="cpu")
    enc = FluxEncoders(enc_paths["t5"], enc_paths["clip"], None, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in enc.t5.parameters())  # T5 `wo` too
    t5, clip = enc.encode_text(["a cat", ""])
    ids = enc.t5_tokenizer([""], padding="max_length", max_length=256, truncation=True).input_ids[0]
    assert ids[0] == enc.t5_tokenizer.eos_token_id and set(ids[1:]) == {enc.t5_tokenizer.pad_token_id}
    assert t5.shape == (2, 256, 32) and clip.shape == (2, 32)
    assert t5[1, 1:].abs().sum() > 0  # pads are encoded (no attention mask)
    with pytest.raises(RuntimeError, match="without a VAE"):
        enc.encode_images(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


def test_tar_group_reading_skips_without_reading(tmp_path):
    samples = [{"key": f"k{i}", "png": random_image_bytes(8, 8, seed=i), "txt": f"c{i}"} for i in range(5)]
    [shard] = write_raw_webdataset(tmp_path, samples)
    shards = RawShards(tmp_path)
    assert len(shards) == 5
    got = [(s.key, s.caption) for s in shards.iter_range(2, 4)]
    assert got == [("k2", "c2"), ("k3", "c3")]
    with tarfile.open(shard) as tar:
        assert tar.getnames()[:3] == ["k0.png", "k0.txt", "k1.png"]


@pytest.mark.gpu
def test_mixed_gpu_decode_matches_cpu(tmp_path, enc_paths):
    """GPU path (DALI ``mixed`` decode, encoders on CUDA): same pixels for 64x64 PNGs, contract on the device."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed on this GPU host (the NGC image has it)")
    imgs = [random_image_bytes(64, 64, seed=i) for i in range(3)]
    gpu = ImageDecoder(64, "crop", max_batch_size=3, device="cuda", num_threads=1)(imgs)
    cpu = ImageDecoder(64, "crop", max_batch_size=3, device="cpu", num_threads=1)(imgs)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    make_set(tmp_path / "cc", 4, coco=False)
    batch = next(build_raw_train_loader(tmp_path / "cc", enc_paths, 2, image_size=64, device="cuda"))
    assert all(v.is_cuda for v in batch.values()) and batch["t5"].dtype == torch.bfloat16
