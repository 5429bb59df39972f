"""Record format: npy-in-bf16 cells, Arrow (save_to_disk) and webdataset containers, empty encodings."""

import io

import numpy as np
import pytest
import torch

from flux_nemo.data.format import (
    FIELDS,
    TENSOR_COLUMNS,
    WDS_EXT,
    RecordShapes,
    decode_tensor,
    encode_tensor,
    load_empty_encodings,
    save_empty_encodings,
    write_arrow_dataset,
    write_webdataset,
)
from flux_nemo.data.readers import ArrowSource, WebDatasetSource, open_source

SHAPES = RecordShapes(t5_len=4, t5_dim=8, clip_dim=6, latent_channels=2, latent_size=4)


def make_rows(n, shapes=SHAPES, timesteps=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        row = {
            "__key__": f"key.{i}/x",
            **{c: torch.randn(s, generator=g) * 3 for c, s in shapes.fields().items()},
        }
        row["timestep"] = None if timesteps is None else timesteps[i]
        rows.append(row)
    return rows


def read_all(src, shapes=SHAPES):
    out = {c: np.zeros((len(src), *s), np.uint16) for c, s in shapes.fields().items()}
    ts = [src.fill(i, out, i) for i in range(len(src))]
    return {c: torch.from_numpy(a).view(torch.bfloat16) for c, a in out.items()}, ts


def test_official_fields():
    assert FIELDS == {
        "t5_encodings": (256, 4096),
        "clip_encodings": (768,),
        "mean": (16, 32, 32),
        "logvar": (16, 32, 32),
    }
    assert RecordShapes.for_model(context_in_dim=4096, vec_in_dim=768, in_channels=64) == RecordShapes()


def test_encode_matches_reference_and_round_trips_bits():
    # every bf16 bit pattern, including NaNs, infs and subnormals, survives the round trip
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16).reshape(256, 256)
    b = encode_tensor(bits)
    ref = io.BytesIO()
    np.save(ref, bits.view(torch.uint16).numpy())  # the reference writer
    assert b == ref.getvalue()
    back = decode_tensor(b, (256, 256), where="w")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.uint16), bits.view(torch.uint16))
    # the reference reader agrees
    ref_back = torch.from_numpy(np.load(io.BytesIO(b))).view(torch.bfloat16)
    assert torch.equal(ref_back.view(torch.uint16), back.view(torch.uint16))


def test_encode_casts_float32_to_bf16():
    t = torch.randn(3, 5)
    assert torch.equal(decode_tensor(encode_tensor(t), (3, 5), where="w"), t.to(torch.bfloat16))
    with pytest.raises(TypeError):
        encode_tensor(torch.arange(4))


def _npy(arr, **kw):
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "payload,match",
    [
        (_npy(np.zeros((2, 3), np.float32)), "dtype '<f4'"),
        (_npy(np.zeros((3, 2), np.uint16)), r"shape \(3, 2\), expected \(2, 3\)"),
        (_npy(np.asfortranarray(np.zeros((2, 3), np.uint16))), "Fortran"),
        (_npy(np.zeros((2, 3), np.uint16))[:-2], "payload has 10 bytes"),
        (b"garbage" * 4, "bad magic"),
        (_npy(np.zeros((2, 3), np.uint16))[:20], "truncated .npy header"),
        (_npy(np.zeros((2, 3), np.uint16)).replace(b"'shape'", b"'shapX'"), "corrupt .npy header"),
    ],
)
def test_decode_errors_name_the_location(payload, match):
    with pytest.raises(ValueError, match=match) as e:
        decode_tensor(payload, (2, 3), where="file.arrow row 7 column mean")
    assert str(e.value).startswith("file.arrow row 7 column mean: ")


@pytest.mark.parametrize("with_ts", [True, False])
def test_arrow_and_webdataset_identical_bit_for_bit(tmp_path, with_ts):
    ts = [i % 8 for i in range(11)] if with_ts else None
    rows = make_rows(11, timesteps=ts)
    assert (
        write_arrow_dataset(
            tmp_path / "a", rows, SHAPES, rows_per_file=4, rows_per_batch=3, with_timestep=with_ts
        )
        == 11
    )
    assert write_webdataset(tmp_path / "w", rows, SHAPES, samples_per_shard=4) == 11
    assert len(list((tmp_path / "a").glob("data-*-of-00003.arrow"))) == 3
    assert len(list((tmp_path / "w").glob("shard-*.tar"))) == 3
    a, w = open_source(tmp_path / "a", SHAPES), open_source(tmp_path / "w", SHAPES)
    assert isinstance(a, ArrowSource) and isinstance(w, WebDatasetSource)
    (ta, tsa), (tw, tsw) = read_all(a), read_all(w)
    for c in TENSOR_COLUMNS:
        want = torch.stack([r[c] for r in rows]).to(torch.bfloat16)
        assert torch.equal(ta[c].view(torch.uint16), want.view(torch.uint16)), c
        assert torch.equal(tw[c].view(torch.uint16), want.view(torch.uint16)), c
    assert tsa == tsw == (ts if with_ts else [-1] * 11)
    assert [a.key(i) for i in range(11)] == [w.key(i) for i in range(11)] == [r["__key__"] for r in rows]


def test_arrow_is_readable_by_hf_datasets(tmp_path):
    import datasets

    rows = make_rows(5, timesteps=[0, 1, None, 3, 7])
    write_arrow_dataset(tmp_path / "a", rows, SHAPES, rows_per_file=2)
    ds = datasets.load_from_disk(str(tmp_path / "a"))
    assert ds.column_names == ["__key__", *TENSOR_COLUMNS, "timestep"]
    assert ds.features["timestep"].dtype == "int32" and ds.features["mean"].dtype == "binary"
    assert ds["timestep"][:] == [0, 1, None, 3, 7]
    got = decode_tensor(ds[3]["t5_encodings"], (4, 8), where="hf")
    assert torch.equal(got, rows[3]["t5_encodings"].to(torch.bfloat16))


def test_reads_dataset_written_by_hf_save_to_disk(tmp_path):
    """The published data are HF save_to_disk output: read one written by HF itself, with nulls (CC12M)."""
    import datasets
    import pyarrow as pa

    rows = make_rows(7, timesteps=[5, None, 2, None, 0, 1, 3])
    cols = {"__key__": [r["__key__"] for r in rows]}
    for c in TENSOR_COLUMNS:
        cols[c] = pa.array([encode_tensor(r[c]) for r in rows], pa.binary())
    cols["timestep"] = pa.array([r["timestep"] for r in rows], pa.int32())
    datasets.Dataset(pa.table(cols)).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    src = open_source(tmp_path / "hf", SHAPES)
    t, ts = read_all(src)
    assert ts == [5, -1, 2, -1, 0, 1, 3]
    assert torch.equal(t["logvar"], torch.stack([r["logvar"] for r in rows]).to(torch.bfloat16))


def test_empty_encodings_round_trip_and_dtype(tmp_path):
    t5, clip = torch.randn(1, 4, 8), torch.randn(1, 6)
    save_empty_encodings(tmp_path, t5, clip)
    assert np.load(tmp_path / "t5_empty.npy").dtype == np.float16
    assert np.load(tmp_path / "clip_empty.npy").shape == (1, 6)
    t5b, clipb = load_empty_encodings(tmp_path, SHAPES)
    assert t5b.dtype == clipb.dtype == torch.bfloat16
    assert t5b.shape == (1, 4, 8) and clipb.shape == (1, 6)
    assert torch.equal(t5b, t5.to(torch.float16).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"t5_empty.npy: shape \(1, 4, 8\), expected \(1, 256, 4096\)"):
        load_empty_encodings(tmp_path, RecordShapes())


def test_empty_encodings_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_empty_encodings(tmp_path / "nope")
    np.save(tmp_path / "t5_empty.npy", np.zeros((1, 4, 8), np.int32))
    np.save(tmp_path / "clip_empty.npy", np.zeros((1, 6), np.float16))
    with pytest.raises(ValueError, match="t5_empty.npy: dtype int32"):
        load_empty_encodings(tmp_path)
    np.save(tmp_path / "t5_empty.npy", np.zeros((4, 8), np.float16))
    with pytest.raises(ValueError, match="t5_empty.npy: shape"):
        load_empty_encodings(tmp_path)
    (tmp_path / "clip_empty.npy").unlink()
    np.save(tmp_path / "t5_empty.npy", np.zeros((1, 4, 8), np.float16))
    with pytest.raises(FileNotFoundError, match="clip_empty.npy"):
        load_empty_encodings(tmp_path)


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_many_files_keep_few_open(tmp_path, fmt):
    import os

    rows = make_rows(14, timesteps=list(range(14)))
    if fmt == "arrow":
        write_arrow_dataset(tmp_path / "d", rows, SHAPES, rows_per_file=2)
        cls = ArrowSource
    else:
        write_webdataset(tmp_path / "d", rows, SHAPES, samples_per_shard=2)
        cls = WebDatasetSource
    fds = len(os.listdir("/proc/self/fd"))
    src = cls(tmp_path / "d", SHAPES, max_open=2)
    order = [13, 0, 7, 1, 12, 2, 6, 3, 11, 4, 5, 10, 8, 9]
    out = {c: np.zeros((14, *s), np.uint16) for c, s in SHAPES.fields().items()}
    ts = [src.fill(i, out, k) for k, i in enumerate(order)]
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert ts == order
    want = torch.stack([rows[i]["mean"] for i in order]).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(out["mean"]).view(torch.bfloat16), want)


def test_arrow_ipc_file_format_is_accepted(tmp_path):
    import pyarrow as pa

    rows = make_rows(3, timesteps=[1, 2, 3])
    cols = {"__key__": [r["__key__"] for r in rows]}
    for c in TENSOR_COLUMNS:
        cols[c] = pa.array([encode_tensor(r[c]) for r in rows], pa.binary())
    table = pa.table(cols)
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    t, ts = read_all(open_source(tmp_path / "x.arrow", SHAPES))
    assert ts == [-1, -1, -1]
    assert torch.equal(
        t["clip_encodings"], torch.stack([r["clip_encodings"] for r in rows]).to(torch.bfloat16)
    )


def test_webdataset_library_interop(tmp_path):
    """Shards written by the ``webdataset`` library read back identically, and ours read with the library."""
    import webdataset as wds

    rows = make_rows(5, timesteps=[3, None, 1, 0, 7])
    (tmp_path / "lib").mkdir()
    with wds.TarWriter(str(tmp_path / "lib" / "part-0.tar")) as sink:
        for i, r in enumerate(rows):
            sample = {"__key__": f"s{i:04d}", "json": {"key": r["__key__"], "timestep": r["timestep"]}}
            sample.update({ext: encode_tensor(r[c]) for c, ext in WDS_EXT.items()})
            sink.write(sample)
    ours, ts = read_all(open_source(tmp_path / "lib", SHAPES))
    for c in TENSOR_COLUMNS:
        assert torch.equal(ours[c], torch.stack([r[c] for r in rows]).to(torch.bfloat16)), c
    assert ts == [3, -1, 1, 0, 7]

    write_webdataset(tmp_path / "ours", rows, SHAPES, samples_per_shard=2)
    shards = sorted(str(p) for p in (tmp_path / "ours").glob("*.tar"))
    got = list(wds.WebDataset(shards, shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"{i:09d}" for i in range(5)]
    for g, r in zip(got, rows, strict=True):
        assert torch.equal(
            decode_tensor(g["mean.bytes"], SHAPES.fields()["mean"], where="x"), r["mean"].bfloat16()
        )
