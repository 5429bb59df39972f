"""preprocess/clean_cc12m.py on a fake tiny CC12M: problematic indices, size filter, first N, resize + crop."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from preprocess_testlib import load_script

from flux_nemo.data.tiny_assets import random_image_bytes, write_raw_webdataset

clean = load_script("clean_cc12m")

# index: (width, height); None = undecodable bytes (listed as problematic, so never decoded)
SIZES = [(48, 40), None, (20, 50), (64, 32), (33, 90), (31, 31), None, (40, 40), (50, 36)]


def fake_cc12m(root):
    samples = []
    for i, wh in enumerate(SIZES):
        img = b"\xff\xd8 broken jpeg" if wh is None else random_image_bytes(*wh, seed=i, fmt="JPEG")
        samples.append(
            {"key": f"{i:09d}", "jpg": img, "txt": f"caption {i}", "json": {"url": f"http://x/{i}"}}
        )
    write_raw_webdataset(root / "in", samples, per_shard=5, pattern="cc12m-train-%04d.tar")
    (root / "problematic.txt").write_text("1\n\n6\n")
    return samples


def read_out(out):
    rows = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            rows += [(m.name, tar.extractfile(m).read()) for m in tar]
    return rows


def expected_png(jpg: bytes, size: int, crop_box) -> np.ndarray:
    return np.array(
        Image.open(io.BytesIO(jpg)).convert("RGB").resize(size, Image.Resampling.BICUBIC).crop(crop_box)
    )


def test_filters_subset_and_crop(tmp_path):
    samples = fake_cc12m(tmp_path)
    stats = clean.clean(tmp_path / "in", tmp_path / "out", filter_file=tmp_path / "problematic.txt",
                        subset_size=4, min_size=32, output_size=24, samples_per_shard=3)  # fmt: skip
    # 1 and 6 problematic; 2 (20 wide) and 5 (31x31) below 32; the first 4 others are 0, 3, 4, 7
    assert stats == {"written": 4, "problematic": 2, "small": 2, "read": 6}
    rows = read_out(tmp_path / "out")
    kept = [0, 3, 4, 7]
    assert [n for n, _ in rows] == [f"{i:09d}.{e}" for i in kept for e in ("png", "txt", "json")]
    for k, i in enumerate(kept):
        png, txt, meta = (rows[3 * k + j][1] for j in range(3))
        assert txt.decode() == f"caption {i}" and json.loads(meta) == {"key": f"{i:09d}", "index": i}
        arr = np.array(Image.open(io.BytesIO(png)))
        assert arr.shape == (24, 24, 3)
        if i == 0:  # 48x40 -> short side 24: 28x24 (int(24*48/40)), crop left round(2.0) = 2
            assert np.array_equal(arr, expected_png(samples[0]["jpg"], (28, 24), (2, 0, 26, 24)))
        if i == 4:  # 33x90 -> 24x65 (int(65.45)), crop top round(20.5) = 20 (round half to even)
            assert np.array_equal(arr, expected_png(samples[4]["jpg"], (24, 65), (0, 20, 24, 44)))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_deterministic_across_workers(tmp_path):
    fake_cc12m(tmp_path)
    kw = dict(filter_file=tmp_path / "problematic.txt", subset_size=5, min_size=32, output_size=16, window=2)
    s1 = clean.clean(tmp_path / "in", tmp_path / "w1", workers=1, **kw)
    s2 = clean.main([f"--input-dir={tmp_path / 'in'}", f"--output-dir={tmp_path / 'w2'}", "--subset-size=5",
                     f"--filter-file={tmp_path / 'problematic.txt'}", "--min-size=32", "--output-size=16",
                     "--workers=2"])  # fmt: skip
    assert s1["written"] == 5 and s2 == 0
    assert read_out(tmp_path / "w1") == read_out(tmp_path / "w2")


def test_bad_data_is_an_error_unless_listed(tmp_path):
    fake_cc12m(tmp_path)
    with pytest.raises(ValueError, match=r"cc12m-train-0000\.tar:000000001: cannot decode image"):
        clean.clean(tmp_path / "in", tmp_path / "o1", subset_size=9, min_size=8, output_size=8)
    write_raw_webdataset(tmp_path / "nocap", [{"key": "a", "jpg": random_image_bytes(40, 40, 0, "JPEG")}])
    with pytest.raises(ValueError, match=r"shard_00000\.tar:a: no caption 'txt' member"):
        clean.clean(tmp_path / "nocap", tmp_path / "o2", subset_size=1, min_size=8, output_size=8)
    (tmp_path / "bad.txt").write_text("3\nx\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not an integer index"):
        clean.read_filter_file(tmp_path / "bad.txt")
