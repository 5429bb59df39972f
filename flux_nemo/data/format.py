"""The official preprocessed flux1 record format: encoding, decoding and writers.

A record (one sample) holds four bf16 tensors, each stored as the bytes of ``np.save`` of the tensor viewed as
``uint16`` (a ``.npy`` with dtype ``<u2`` holding the raw bf16 bits), plus a string key and an optional int
timestep. Two containers hold the same records:

* an HF ``datasets`` ``save_to_disk`` directory (``state.json``, ``dataset_info.json``, ``data-*.arrow`` Arrow IPC
  streams) with columns ``__key__`` string, ``t5_encodings`` / ``clip_encodings`` / ``mean`` / ``logvar`` binary,
  ``timestep`` int32 (nullable, optional);
* webdataset tar shards with members ``<k>.json`` (``{"key", "timestep"}``), ``<k>.t5.bytes``,
  ``<k>.clip.bytes``, ``<k>.mean.bytes``, ``<k>.logvar.bytes``.

Shapes are configurable (``RecordShapes``) so that tiny synthetic data use the same code; defaults are official.
"""

from __future__ import annotations

import ast
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

NPY_MAGIC = b"\x93NUMPY"
TENSOR_COLUMNS = ("t5_encodings", "clip_encodings", "mean", "logvar")
# webdataset member extension (after "<key>.") for each tensor column
WDS_EXT = {
    "t5_encodings": "t5.bytes",
    "clip_encodings": "clip.bytes",
    "mean": "mean.bytes",
    "logvar": "logvar.bytes",
}
KEY_COLUMN = "__key__"
TIMESTEP_COLUMN = "timestep"


@dataclass(frozen=True)
class RecordShapes:
    """Per-sample tensor shapes; the defaults are the official Flux.1-schnell preprocessed shapes."""

    t5_len: int = 256
    t5_dim: int = 4096
    clip_dim: int = 768
    latent_channels: int = 16
    latent_size: int = 32

    def fields(self) -> dict[str, tuple[int, ...]]:
        """Column name -> per-sample shape."""
        lat = (self.latent_channels, self.latent_size, self.latent_size)
        return {
            "t5_encodings": (self.t5_len, self.t5_dim),
            "clip_encodings": (self.clip_dim,),
            "mean": lat,
            "logvar": lat,
        }

    @classmethod
    def for_model(
        cls,
        *,
        context_in_dim: int,
        vec_in_dim: int,
        in_channels: int,
        t5_len: int = 256,
        latent_size: int = 32,
    ) -> RecordShapes:
        """Shapes the model expects: T5 dim = ``context_in_dim``, CLIP = ``vec_in_dim``, latent channels =
        ``in_channels / 4`` (2x2 patches are packed into the channel dim)."""
        if in_channels % 4:
            raise ValueError(f"in_channels {in_channels} is not a multiple of 4 (2x2 packed latent channels)")
        return cls(t5_len, context_in_dim, vec_in_dim, in_channels // 4, latent_size)

    def record_bytes(self) -> int:
        """Payload bytes of one record (bf16 tensors, without npy headers)."""
        return 2 * sum(int(np.prod(s)) for s in self.fields().values())


OFFICIAL_SHAPES = RecordShapes()
FIELDS: dict[str, tuple[int, ...]] = OFFICIAL_SHAPES.fields()


# --------------------------------------------------------------------------------------------------------------
# tensor <-> npy bytes


def encode_tensor(t: torch.Tensor) -> bytes:
    """Bytes of ``np.save`` of ``t`` (cast to bf16 if floating) viewed as uint16: the official cell payload."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"encode_tensor expects a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bfloat16:
        if not t.dtype.is_floating_point:
            raise TypeError(f"encode_tensor expects a floating tensor, got {t.dtype}")
        t = t.to(torch.bfloat16)
    arr = t.detach().cpu().contiguous().view(torch.uint16).numpy()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_HEADER_CACHE: dict[bytes, tuple[str, bool, tuple[int, ...]]] = {}


def _parse_npy_header(b, where: str) -> tuple[int, str, bool, tuple[int, ...]]:
    """(payload offset, descr, fortran_order, shape) of npy bytes; ValueError naming ``where`` if malformed."""
    mv = memoryview(b)
    if len(mv) < 10 or bytes(mv[:6]) != NPY_MAGIC:
        raise ValueError(f"{where}: not a .npy payload (bad magic, {len(mv)} bytes)")
    major = mv[6]
    if major == 1:
        hlen, start = int.from_bytes(mv[8:10], "little"), 10
    elif major in (2, 3):
        if len(mv) < 12:
            raise ValueError(f"{where}: truncated .npy header")
        hlen, start = int.from_bytes(mv[8:12], "little"), 12
    else:
        raise ValueError(f"{where}: unsupported .npy version {major}")
    end = start + hlen
    if len(mv) < end:
        raise ValueError(f"{where}: truncated .npy header ({len(mv)} bytes, header ends at {end})")
    raw = bytes(mv[start:end])
    parsed = _HEADER_CACHE.get(raw)
    if parsed is None:
        try:
            d = ast.literal_eval(raw.decode("latin1").strip())
            parsed = (str(d["descr"]), bool(d["fortran_order"]), tuple(int(x) for x in d["shape"]))
        except Exception as e:  # noqa: BLE001 - any parse failure is corrupt data
            raise ValueError(f"{where}: corrupt .npy header ({e})") from None
        if len(_HEADER_CACHE) < 1024:
            _HEADER_CACHE[raw] = parsed
    return (end, *parsed)


def payload_view(b, shape: tuple[int, ...], *, where: str) -> np.ndarray:
    """Zero-copy read-only uint16 view ``shape`` of npy bytes ``b`` (bytes, memoryview or pyarrow Buffer).

    Raises ValueError naming ``where`` on wrong dtype, wrong shape, Fortran order or wrong payload size.
    """
    off, descr, fortran, got = _parse_npy_header(b, where)
    if descr != "<u2":
        raise ValueError(f"{where}: dtype {descr!r}, expected '<u2' (bf16 bits viewed as uint16)")
    if fortran:
        raise ValueError(f"{where}: Fortran-ordered array, expected C order")
    shape = tuple(int(s) for s in shape)
    if got != shape:
        raise ValueError(f"{where}: shape {got}, expected {shape}")
    n = 1
    for s in shape:
        n *= s
    size = len(memoryview(b)) - off
    if size != 2 * n:
        raise ValueError(f"{where}: payload has {size} bytes, expected {2 * n} for shape {shape} (corrupt)")
    return np.frombuffer(b, dtype=np.uint16, count=n, offset=off).reshape(shape)


def decode_tensor(b, shape: tuple[int, ...], *, where: str) -> torch.Tensor:
    """Decode one cell into a new bf16 tensor of ``shape``; ValueError naming ``where`` if it does not fit."""
    arr = payload_view(b, shape, where=where)
    return torch.from_numpy(arr.copy()).view(torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# row normalisation shared by the writers


def _row_cells(
    row: dict, fields: dict[str, tuple[int, ...]], i: int
) -> tuple[str, dict[str, bytes], int | None]:
    """(key, column -> npy bytes, timestep or None) of one input row; tensors are encoded, bytes validated."""
    key = row.get(KEY_COLUMN, row.get("key"))
    if key is None:
        key = f"{i:09d}"
    cells = {}
    for col, shape in fields.items():
        if col not in row:
            raise KeyError(f"row {i} (key {key!r}): missing column {col!r}")
        v = row[col]
        if isinstance(v, torch.Tensor):
            if tuple(v.shape) != tuple(shape):
                raise ValueError(
                    f"row {i} (key {key!r}) column {col}: shape {tuple(v.shape)}, expected {shape}"
                )
            v = encode_tensor(v)
        else:
            payload_view(v, shape, where=f"row {i} (key {key!r}) column {col}")
            v = bytes(v)
        cells[col] = v
    ts = row.get(TIMESTEP_COLUMN)
    return str(key), cells, (None if ts is None else int(ts))


def _features_json(with_timestep: bool) -> dict:
    feats = {KEY_COLUMN: {"dtype": "string", "_type": "Value"}}
    for col in TENSOR_COLUMNS:
        feats[col] = {"dtype": "binary", "_type": "Value"}
    if with_timestep:
        feats[TIMESTEP_COLUMN] = {"dtype": "int32", "_type": "Value"}
    return feats


def write_arrow_dataset(
    out_dir: str | os.PathLike,
    rows: Iterable[dict],
    shapes: RecordShapes = OFFICIAL_SHAPES,
    *,
    rows_per_file: int | None = None,
    rows_per_batch: int = 32,
    with_timestep: bool = True,
) -> int:
    """Write ``rows`` as an HF ``save_to_disk`` Arrow dataset, streaming (constant memory); returns the row count.

    Each row is a dict with ``__key__`` (or ``key``), the four tensor columns (bf16 tensors of the ``shapes`` or
    ready npy bytes) and optionally ``timestep`` (int or None -> null). ``with_timestep=False`` omits the column
    (as CC12M may). ``rows_per_file`` defaults to ~500 MiB files (HF's default ``max_shard_size``: 242 official
    records). Readable by ``datasets.load_from_disk`` and by ``flux_nemo.data.readers``.
    """
    if rows_per_file is None:
        rows_per_file = max(1, (500 << 20) // shapes.record_bytes())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = shapes.fields()
    feats = _features_json(with_timestep)
    pa_fields = [pa.field(KEY_COLUMN, pa.string())] + [pa.field(c, pa.binary()) for c in TENSOR_COLUMNS]
    if with_timestep:
        pa_fields.append(pa.field(TIMESTEP_COLUMN, pa.int32()))
    schema = pa.schema(pa_fields, metadata={"huggingface": json.dumps({"info": {"features": feats}})})

    tmp_names: list[str] = []
    writer = sink = None
    pending: dict[str, list] = {f.name: [] for f in pa_fields}
    n_total = n_in_file = 0

    def flush():
        if pending[KEY_COLUMN]:
            arrays = [pa.array(pending[f.name], type=f.type) for f in pa_fields]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            for v in pending.values():
                v.clear()

    def close_file():
        nonlocal writer, sink
        if writer is not None:
            flush()
            writer.close()
            sink.close()
            writer = sink = None

    for i, row in enumerate(rows):
        if writer is None:
            name = f"tmp-{len(tmp_names):05d}.arrow"
            tmp_names.append(name)
            sink = pa.OSFile(str(out / name), "wb")
            writer = pa.ipc.new_stream(sink, schema)
            n_in_file = 0
        key, cells, ts = _row_cells(row, fields, i)
        pending[KEY_COLUMN].append(key)
        for c in TENSOR_COLUMNS:
            pending[c].append(cells[c])
        if with_timestep:
            pending[TIMESTEP_COLUMN].append(ts)
        n_total += 1
        n_in_file += 1
        if len(pending[KEY_COLUMN]) >= rows_per_batch:
            flush()
        if n_in_file >= rows_per_file:
            close_file()
    if writer is None and not tmp_names:  # empty dataset: one empty file, as save_to_disk does
        tmp_names.append("tmp-00000.arrow")
        sink = pa.OSFile(str(out / tmp_names[0]), "wb")
        writer = pa.ipc.new_stream(sink, schema)
    close_file()

    n_files = len(tmp_names)
    names = [f"data-{k:05d}-of-{n_files:05d}.arrow" for k in range(n_files)]
    for tmp, final in zip(tmp_names, names, strict=True):
        os.replace(out / tmp, out / final)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": f"flux-nemo-{n_total}",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {"citation": "", "description": "", "features": feats, "homepage": "", "license": ""}
    (out / "state.json").write_text(json.dumps(state, indent=2))
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return n_total


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    out_dir: str | os.PathLike,
    rows: Iterable[dict],
    shapes: RecordShapes = OFFICIAL_SHAPES,
    samples_per_shard: int = 10_000,
) -> int:
    """Write ``rows`` as webdataset tar shards ``shard-000000.tar``...; returns the row count.

    Member names use the row index (``000000123``) as the webdataset key, so any ``__key__`` string is safe;
    the original key and the timestep (or null) go into ``<k>.json``. Deterministic bytes (mtime 0).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    fields = shapes.fields()
    tar = None
    n = 0
    for i, row in enumerate(rows):
        if i % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(
                out / f"shard-{i // samples_per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT
            )
        key, cells, ts = _row_cells(row, fields, i)
        wkey = f"{i:09d}"
        _add_member(tar, f"{wkey}.json", json.dumps({"key": key, "timestep": ts}).encode())
        for c in TENSOR_COLUMNS:
            _add_member(tar, f"{wkey}.{WDS_EXT[c]}", cells[c])
        n += 1
    if tar is not None:
        tar.close()
    return n


# --------------------------------------------------------------------------------------------------------------
# empty-prompt encodings


def save_empty_encodings(out_dir: str | os.PathLike, t5: torch.Tensor, clip: torch.Tensor) -> None:
    """Write ``t5_empty.npy`` ([1, L, D]) and ``clip_empty.npy`` ([1, D]) as float16, as the reference does."""
    if t5.dim() != 3 or t5.shape[0] != 1:
        raise ValueError(f"t5 empty encoding must be [1, L, D], got {tuple(t5.shape)}")
    if clip.dim() != 2 or clip.shape[0] != 1:
        raise ValueError(f"clip empty encoding must be [1, D], got {tuple(clip.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "t5_empty.npy", t5.detach().cpu().to(torch.float16).numpy())
    np.save(out / "clip_empty.npy", clip.detach().cpu().to(torch.float16).numpy())


def _load_empty(path: Path, ndim: int, expect: tuple[int, ...] | None) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"empty encoding file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read .npy ({e})") from None
    if arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"{path}: dtype {arr.dtype}, expected float16")
    if arr.ndim != ndim or arr.shape[0] != 1:
        raise ValueError(f"{path}: shape {arr.shape}, expected {ndim} dims with a leading 1")
    if expect is not None and tuple(arr.shape) != expect:
        raise ValueError(f"{path}: shape {arr.shape}, expected {expect}")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)


def load_empty_encodings(
    directory: str | os.PathLike, shapes: RecordShapes | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(t5_empty [1, L, D], clip_empty [1, D])`` as bf16 from ``directory``; shapes checked if given."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"empty encodings directory not found: {d}")
    t5_shape = None if shapes is None else (1, shapes.t5_len, shapes.t5_dim)
    clip_shape = None if shapes is None else (1, shapes.clip_dim)
    return _load_empty(d / "t5_empty.npy", 3, t5_shape), _load_empty(d / "clip_empty.npy", 2, clip_shape)


def iter_rows_from_tensors(
    keys: list[str], tensors: dict[str, torch.Tensor], timesteps: list[int | None] | None = None
) -> Iterator[dict]:
    """Rows for the writers from batch-first tensors (column -> [N, ...]); a convenience for tests and tools."""
    for i, k in enumerate(keys):
        row = {KEY_COLUMN: k, **{c: tensors[c][i] for c in TENSOR_COLUMNS}}
        row[TIMESTEP_COLUMN] = None if timesteps is None else timesteps[i]
        yield row
