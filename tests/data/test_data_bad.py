"""Bad data: every error names the file and the row or key; nothing is skipped silently."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from flux_nemo.data.format import (
    TENSOR_COLUMNS,
    RecordShapes,
    encode_tensor,
    write_arrow_dataset,
    write_webdataset,
)
from flux_nemo.data.loader import build_eval_loader, build_train_loader
from flux_nemo.data.readers import open_source

SHAPES = RecordShapes(t5_len=2, t5_dim=4, clip_dim=3, latent_channels=1, latent_size=2)


def rows(n, bad=None):
    """n good rows; ``bad`` = (row index, column, replacement bytes)."""
    for i in range(n):
        r = {
            "__key__": f"k{i}",
            **{c: torch.full(s, float(i)) for c, s in SHAPES.fields().items()},
            "timestep": i,
        }
        if bad is not None and bad[0] == i:
            r[bad[1]] = bad[2]
        yield r


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_raw_arrow(path, table):
    """An Arrow stream file as save_to_disk would write it, bypassing our writer's validation."""
    path.mkdir(parents=True)
    with (
        pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)


def good_table(n=4, **override):
    cols = {"__key__": [f"k{i}" for i in range(n)]}
    for c, s in SHAPES.fields().items():
        cols[c] = pa.array([encode_tensor(torch.full(s, float(i))) for i in range(n)], pa.binary())
    cols["timestep"] = pa.array(list(range(n)), pa.int32())
    cols.update(override)
    return pa.table(cols)


def drain(path, **kw):
    loader = build_eval_loader(path, dp_rank=0, dp_world=1, micro_batch_size=2, shapes=SHAPES, **kw)
    return list(loader)


@pytest.mark.parametrize(
    "bad,match",
    [
        (npy(np.zeros((3,), np.float32)), r"row 2 \(key 'k2'\) column mean: dtype '<f4'"),
        (
            npy(np.zeros((1, 2, 3), np.uint16)),
            r"row 2 \(key 'k2'\) column mean: shape \(1, 2, 3\), expected \(1, 2, 2\)",
        ),
        (b"\x93NUMPY not really", r"row 2 \(key 'k2'\) column mean: unsupported .npy version"),
        (b"\x93NUMPY\x01\x00\x07\x00{'a': 1", r"row 2 \(key 'k2'\) column mean: corrupt .npy header"),
    ],
)
def test_arrow_bad_cell_names_file_row_key_column(tmp_path, bad, match):
    # our writer validates cells, so write the bad table directly, as a foreign producer might
    tbl = good_table(
        4,
        mean=pa.array(
            [encode_tensor(torch.zeros(1, 2, 2))] * 2 + [bad] + [encode_tensor(torch.zeros(1, 2, 2))],
            pa.binary(),
        ),
    )
    write_raw_arrow(tmp_path / "d", tbl)
    with pytest.raises(ValueError, match=match) as e:
        drain(tmp_path / "d")
    assert "data-00000-of-00001.arrow" in str(e.value)


def test_writer_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 \(key 'k1'\) column logvar: shape"):
        write_arrow_dataset(tmp_path / "a", rows(3, bad=(1, "logvar", torch.zeros(2, 2, 2))), SHAPES)
    with pytest.raises(ValueError, match=r"row 2 \(key 'k2'\) column clip_encodings: dtype"):
        write_webdataset(
            tmp_path / "w", rows(3, bad=(2, "clip_encodings", npy(np.zeros(3, np.int64)))), SHAPES
        )
    bad = [{"__key__": "x", "mean": torch.zeros(1, 2, 2)}]
    with pytest.raises(KeyError, match=r"row 0 \(key 'x'\): missing column 't5_encodings'"):
        write_arrow_dataset(tmp_path / "b", bad, SHAPES)


def test_arrow_null_cell(tmp_path):
    cells = [encode_tensor(torch.zeros(3))] * 3 + [None]
    write_raw_arrow(tmp_path / "d", good_table(4, clip_encodings=pa.array(cells, pa.binary())))
    with pytest.raises(
        ValueError, match=r"data-00000-of-00001.arrow row 3 \(key 'k3'\) column clip_encodings: null"
    ):
        drain(tmp_path / "d")


def test_arrow_missing_column_and_wrong_types(tmp_path):
    write_raw_arrow(tmp_path / "m", good_table(4).drop_columns(["logvar"]))
    with pytest.raises(ValueError, match=r"data-00000-of-00001.arrow: missing column 'logvar'"):
        open_source(tmp_path / "m", SHAPES)
    write_raw_arrow(tmp_path / "t", good_table(4, mean=pa.array(["x"] * 4)))
    with pytest.raises(ValueError, match="column 'mean' has type string, expected binary"):
        open_source(tmp_path / "t", SHAPES)
    write_raw_arrow(tmp_path / "ts", good_table(4, timestep=pa.array(["0"] * 4)))
    with pytest.raises(ValueError, match="column 'timestep' has type string"):
        open_source(tmp_path / "ts", SHAPES)


def test_arrow_corrupt_or_missing_files(tmp_path):
    write_arrow_dataset(tmp_path / "a", rows(6), SHAPES, rows_per_file=3)
    f = tmp_path / "a" / "data-00001-of-00002.arrow"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="data-00001-of-00002.arrow: corrupt or unreadable Arrow file"):
        open_source(tmp_path / "a", SHAPES)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="missing: data-00001-of-00002.arrow"):
        open_source(tmp_path / "a", SHAPES)
    with pytest.raises(FileNotFoundError, match="neither an Arrow"):
        open_source(tmp_path / "nothing", SHAPES)


def test_model_dimension_mismatch_fails_at_build(tmp_path):
    write_arrow_dataset(tmp_path / "a", rows(4), SHAPES)
    write_webdataset(tmp_path / "w", rows(4), SHAPES)
    model = RecordShapes(t5_len=2, t5_dim=8, clip_dim=3, latent_channels=1, latent_size=2)
    with pytest.raises(
        ValueError, match=r"row 0 \(key 'k0'\) column t5_encodings: shape \(2, 4\), expected \(2, 8\)"
    ):
        build_train_loader(tmp_path / "a", dp_rank=0, dp_world=1, micro_batch_size=1, shapes=model)
    with pytest.raises(
        ValueError, match=r"shard-000000.tar key '000000000' member .t5.bytes: shape \(2, 4\)"
    ):
        build_train_loader(tmp_path / "w", dp_rank=0, dp_world=1, micro_batch_size=1, shapes=model)


def _rewrite_tar(src, dst, drop=None, replace=None):
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin.getmembers():
            if m.name == drop:
                continue
            data = tin.extractfile(m).read()
            if replace and m.name == replace[0]:
                data = replace[1]
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_webdataset_missing_member_and_bad_member(tmp_path):
    write_webdataset(tmp_path / "w", rows(4), SHAPES, samples_per_shard=2)
    shard = tmp_path / "w" / "shard-000001.tar"
    _rewrite_tar(shard, tmp_path / "x.tar", drop="000000003.logvar.bytes")
    shard.write_bytes((tmp_path / "x.tar").read_bytes())
    with pytest.raises(
        ValueError, match=r"shard-000001.tar key '000000003': missing member 000000003.logvar.bytes"
    ):
        open_source(tmp_path / "w", SHAPES)

    write_webdataset(tmp_path / "v", rows(4), SHAPES, samples_per_shard=2)
    shard = tmp_path / "v" / "shard-000000.tar"
    _rewrite_tar(
        shard, tmp_path / "y.tar", replace=("000000001.mean.bytes", npy(np.zeros((1, 2, 2), np.float16)))
    )
    shard.write_bytes((tmp_path / "y.tar").read_bytes())
    with pytest.raises(ValueError, match=r"shard-000000.tar key '000000001' member .mean.bytes: dtype '<f2'"):
        drain(tmp_path / "v")

    write_webdataset(tmp_path / "j", rows(2), SHAPES)
    shard = tmp_path / "j" / "shard-000000.tar"
    _rewrite_tar(shard, tmp_path / "z.tar", replace=("000000001.json", b"{not json"))
    shard.write_bytes((tmp_path / "z.tar").read_bytes())
    with pytest.raises(ValueError, match=r"shard-000000.tar key '000000001': corrupt .json member"):
        drain(tmp_path / "j")


def test_webdataset_corrupt_shards(tmp_path):
    write_webdataset(tmp_path / "w", rows(4), SHAPES, samples_per_shard=2)
    shard = tmp_path / "w" / "shard-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1500])  # truncated inside a member
    with pytest.raises(ValueError, match=r"shard-000001.tar: truncated tar"):
        open_source(tmp_path / "w", SHAPES)
    hdr = bytearray(good)
    hdr[10] ^= 0xFF  # damage the first member's name: header checksum no longer matches
    shard.write_bytes(bytes(hdr))
    with pytest.raises(ValueError, match=r"shard-000001.tar: corrupt tar header at byte 0"):
        open_source(tmp_path / "w", SHAPES)
    shard.write_bytes(b"")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="no webdataset .tar shards"):
        open_source(tmp_path / "none", SHAPES, fmt="webdataset")


def test_webdataset_json_keys_and_timesteps(tmp_path):
    write_webdataset(tmp_path / "w", rows(3), SHAPES)
    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as t:
        meta = json.loads(t.extractfile("000000002.json").read())
    assert meta == {"key": "k2", "timestep": 2}
    src = open_source(tmp_path / "w", SHAPES)
    assert [src.key(i) for i in range(3)] == ["k0", "k1", "k2"]
    with pytest.raises(IndexError, match=r"sample 3 out of range \[0, 3\)"):
        src.key(3)


def test_columns_are_complete(tmp_path):
    # a sanity check of the helper itself: the good table passes, so the failures above are the injected faults
    write_raw_arrow(tmp_path / "g", good_table(4))
    batches = drain(tmp_path / "g")
    assert [b["timestep"].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert set(TENSOR_COLUMNS) <= set(good_table(1).column_names)


@pytest.mark.parametrize(
    "timestep,match",
    [
        (pa.array([0, 1, None, 3], pa.int32()), r"key 'k2'\): timestep missing"),
        (pa.array([0, 1, 8, 3], pa.int32()), r"key 'k2'\): timestep 8, expected 0\.\.7"),
        (pa.array([0, -3, 2, 3], pa.int32()), r"key 'k1'\): timestep -3, expected 0\.\.7"),
    ],
)
def test_eval_timesteps_must_be_stored_and_in_range(tmp_path, timestep, match):
    """Evaluation runs at t = timestep / 8: a missing or out-of-range timestep is an error, never t = -1/8."""
    write_raw_arrow(tmp_path / "e", good_table(4, timestep=timestep))
    with pytest.raises(ValueError, match=match):
        drain(tmp_path / "e")
    build_train_loader(
        tmp_path / "e", dp_rank=0, dp_world=1, micro_batch_size=2, shapes=SHAPES
    )  # train: unused


def test_eval_without_a_timestep_column_is_refused(tmp_path):
    table = good_table(4)
    write_raw_arrow(tmp_path / "e", table.drop_columns(["timestep"]))
    with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow row 0 \(key 'k0'\): timestep missing"):
        drain(tmp_path / "e")
    write_webdataset(
        tmp_path / "w", ({k: v for k, v in r.items() if k != "timestep"} for r in rows(2)), SHAPES
    )
    with pytest.raises(ValueError, match=r"shard-000000\.tar .*key 'k0'\): timestep missing"):
        drain(tmp_path / "w")
