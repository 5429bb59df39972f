"""preprocess/coco_to_webdataset.py on a fake tiny COCO: selection rules, TSV, shards, PNG resize, errors."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from preprocess_testlib import SCRIPTS, load_script

from flux_nemo.data.tiny_assets import random_image_bytes

coco = load_script("coco_to_webdataset")


def fake_coco(root, n_images=12, seed=0):
    rng = np.random.default_rng(seed)
    images = root / "val2014"
    images.mkdir(parents=True)
    image_ids = sorted(rng.choice(600_000, n_images, replace=False).tolist())
    anns, ann_id = [], 1000
    for k, image_id in enumerate(image_ids):
        w, h = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(
            random_image_bytes(w, h, seed=k, fmt="JPEG")
        )
        for c in range(int(rng.integers(2, 5))):
            ann_id += int(rng.integers(1, 50))
            anns.append(
                {"image_id": image_id, "id": ann_id, "caption": f" A photo\n number {c} of image {k}.\n"}
            )
    rng.shuffle(anns)
    captions = root / "captions_val2014.json"
    captions.write_text(json.dumps({"images": [], "annotations": anns}))
    return captions, images, anns


def expected_rows(anns, n, seed=2023):
    """The documented reference selection, written out independently (reference.md §9)."""
    df = pd.DataFrame(anns)
    df["caption"] = [c.replace("\n", "").strip() for c in df["caption"]]
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    df = df.drop_duplicates(subset=["image_id"], keep="first").iloc[:n].sort_values("id")
    return [(int(r.image_id), int(r.id), r.caption, i % 8) for i, r in enumerate(df.itertuples())]


def test_selection_tsv_and_shards(tmp_path):
    captions, images, anns = fake_coco(tmp_path)
    out, tsv = tmp_path / "wds", tmp_path / "val.tsv"
    n = coco.convert(captions, images, out, tsv, num_samples=10, width=32, height=32, samples_per_shard=4)
    assert n == 10
    rows = expected_rows(anns, 10)
    assert [r[3] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert len({r[0] for r in rows}) == 10 and [r[1] for r in rows] == sorted(r[1] for r in rows)
    got = pd.read_csv(tsv, sep="\t")
    assert list(got.columns) == ["image_id", "id", "caption", "timestep"]
    assert list(got.itertuples(index=False, name=None)) == rows
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "shard_00000.tar",
        "shard_00001.tar",
        "shard_00002.tar",
    ]
    members = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar]
    assert len(members) == 3 * 10
    for k, (image_id, _, caption, ts) in enumerate(rows):
        (png_name, png), (txt_name, txt), (json_name, meta) = members[3 * k : 3 * k + 3]
        base = f"{image_id:012d}"
        assert (png_name, txt_name, json_name) == (f"{base}.png", f"{base}.txt", f"{base}.json")
        assert txt.decode() == caption
        assert json.loads(meta) == {"id": str(image_id), "caption": caption,
                                    "filename": f"COCO_val2014_{base}.png", "timestep": ts}  # fmt: skip
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        src = Image.open(images / f"COCO_val2014_{base}.jpg")
        want = np.array(src.resize((32, 32), Image.Resampling.BICUBIC))
        assert np.array_equal(np.array(Image.open(io.BytesIO(png))), want)
    assert json.loads((out / "index.json").read_text())["shard_00002.tar"]["count"] == 2


def test_workers_give_identical_bytes_and_cli(tmp_path):
    captions, images, _ = fake_coco(tmp_path)
    coco.convert(captions, images, tmp_path / "a", tmp_path / "a.tsv", num_samples=8, width=16, height=16)
    args = [sys.executable, str(SCRIPTS / "coco_to_webdataset.py"), "--captions", str(captions), "--images",
            str(images), "--output-dir", str(tmp_path / "b"), "--output-tsv", str(tmp_path / "b.tsv"),
            "--num-samples", "8", "--width", "16", "--height", "16", "--workers", "2"]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True)
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a/shard_00000.tar").read_bytes() == (tmp_path / "b/shard_00000.tar").read_bytes()


def test_errors_name_the_file(tmp_path):
    captions, images, anns = fake_coco(tmp_path)
    with pytest.raises(ValueError, match="only 12 distinct images, 13 requested"):
        coco.select_captions(captions, 13)
    victim = expected_rows(anns, 12)[5][0]
    path = images / f"COCO_val2014_{victim:012d}.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=rf"COCO_val2014_{victim:012d}\.jpg: cannot decode image"):
        coco.convert(captions, images, tmp_path / "o", tmp_path / "o.tsv", num_samples=12, width=8, height=8)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"COCO image not found: .*{victim:012d}\.jpg"):
        coco.convert(captions, images, tmp_path / "o", tmp_path / "o.tsv", num_samples=12, width=8, height=8)
