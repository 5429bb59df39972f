"""Random-access readers of the official preprocessed records (Arrow ``save_to_disk`` or webdataset tars).

Both readers expose the same small interface, used by the loaders:

* ``len(source)``: number of samples, in the published order (Arrow files in ``state.json`` order; tar shards
  sorted by name, members in tar order);
* ``source.fill(index, out, row)``: copy sample ``index``'s four tensors into row ``row`` of the uint16 numpy
  arrays ``out[column]`` (one copy from the page cache, no intermediate tensors) and return its timestep
  (-1 when the dataset has no timestep or the cell is null);
* ``source.key(index)``, ``source.where(index)`` (file, row and key, for error messages) and
  ``source.check(index)`` (decode one sample fully, raising on any problem).

Arrow files are memory-mapped (``pa.memory_map`` + IPC stream read, zero copy); tar shards are memory-mapped and
indexed once by scanning their 512-byte headers. Any problem raises ``ValueError`` naming the file and the row
or key; nothing is ever skipped.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format import (
    KEY_COLUMN,
    OFFICIAL_SHAPES,
    TENSOR_COLUMNS,
    TIMESTEP_COLUMN,
    WDS_EXT,
    RecordShapes,
    payload_view,
)


class _Source:
    shapes: RecordShapes
    path: str

    def __len__(self) -> int:
        raise NotImplementedError

    def check(self, index: int) -> None:
        """Decode sample ``index`` into scratch buffers; raises ValueError naming file and row/key on any problem."""
        out = {c: np.empty((1, *s), np.uint16) for c, s in self.shapes.fields().items()}
        self.fill(index, out, 0)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: sample {index} out of range [0, {len(self)})")


# --------------------------------------------------------------------------------------------------------------
# Arrow (HF save_to_disk)


def _arrow_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".arrow":
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Arrow dataset not found: {path}")
    if (path / "dataset_dict.json").exists():
        raise ValueError(f"{path} is a DatasetDict; pass the split directory (e.g. {path}/train)")
    state = path / "state.json"
    if state.exists():
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{state}: unreadable save_to_disk state ({e})") from None
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise ValueError(f"{path}: no .arrow files (not a save_to_disk dataset)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{path}: data file listed in state.json is missing: {f.name}")
    return files


class _OpenFiles:
    """A small LRU of opened (mapped) files, so that datasets with thousands of files keep few maps and fds.

    Eviction only drops the reference: a thread still copying from an evicted map keeps it alive until done.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._lru: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, i: int, f):
        with self._lock:
            st = f.state
            if st is not None:
                self._lru.move_to_end(i)
                return st
        st = f.load()  # outside the lock; two threads may both load, which is harmless
        with self._lock:
            f.state = st
            self._lru[i] = f
            self._lru.move_to_end(i)
            while len(self._lru) > self.capacity:
                _, old = self._lru.popitem(last=False)
                old.state = None
        return st


class _ArrowMaps:
    """The mapped buffers of one Arrow file: per column, per record batch (offsets, data buffer, nullable)."""

    def __init__(self, table: pa.Table):
        self.keys = table.column(KEY_COLUMN) if KEY_COLUMN in table.schema.names else None
        self.starts: list[int] = []
        self.cols: dict[str, list[tuple[np.ndarray, pa.Buffer, object]]] = {c: [] for c in TENSOR_COLUMNS}
        for col in TENSOR_COLUMNS:
            pos = 0
            for chunk in table.column(col).chunks:
                if col == TENSOR_COLUMNS[0]:
                    self.starts.append(pos)
                _validity, offsets, data = chunk.buffers()
                odt = np.int64 if chunk.type == pa.large_binary() else np.int32
                offs = np.frombuffer(offsets, dtype=odt)[chunk.offset : chunk.offset + len(chunk) + 1]
                self.cols[col].append((offs, data, chunk if chunk.null_count else None))
                pos += len(chunk)


class _ArrowFile:
    """One Arrow IPC stream file: validated and counted at open, its buffers mapped on demand (``load``)."""

    def __init__(self, path: Path, shapes: RecordShapes):
        self.path, self.shapes, self.state = path, shapes, None
        table = self._read()
        names = table.schema.names
        for col in TENSOR_COLUMNS:
            if col not in names:
                raise ValueError(f"{path}: missing column {col!r} (columns: {names})")
            typ = table.schema.field(col).type
            if typ not in (pa.binary(), pa.large_binary()):
                raise ValueError(f"{path}: column {col!r} has type {typ}, expected binary")
        self.n = table.num_rows
        if TIMESTEP_COLUMN in names:
            ts = table.column(TIMESTEP_COLUMN)
            if not pa.types.is_integer(ts.type):
                raise ValueError(f"{path}: column 'timestep' has type {ts.type}, expected int32")
            self.timesteps = pc.fill_null(ts, -1).to_numpy().astype(np.int64)
        else:
            self.timesteps = np.full(self.n, -1, dtype=np.int64)

    def _read(self) -> pa.Table:
        try:
            with pa.memory_map(str(self.path), "r") as mm:  # the map outlives the fd: buffers keep it alive
                try:
                    return pa.ipc.open_stream(mm).read_all()  # what save_to_disk writes
                except pa.ArrowInvalid:
                    mm.seek(0)
                    return pa.ipc.open_file(mm).read_all()  # the Arrow IPC file format, also accepted
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: corrupt or unreadable Arrow file ({e})") from None

    def load(self) -> _ArrowMaps:
        return _ArrowMaps(self._read())

    def key(self, st: _ArrowMaps, r: int) -> str:
        return f"row{r}" if st.keys is None else str(st.keys[r].as_py())

    def fill(self, st: _ArrowMaps, r: int, out: dict[str, np.ndarray], row: int) -> int:
        b = bisect.bisect_right(st.starts, r) - 1
        lr = r - st.starts[b]
        fields = self.shapes.fields()
        for col in TENSOR_COLUMNS:
            offs, data, nullable = st.cols[col][b]
            if nullable is not None and not nullable[lr].is_valid:
                raise ValueError(f"{self.path} row {r} (key {self.key(st, r)!r}) column {col}: null cell")
            s, e = int(offs[lr]), int(offs[lr + 1])
            cell = memoryview(data)[s:e] if data is not None else b""
            try:
                view = payload_view(cell, fields[col], where="")
            except ValueError as err:
                where = f"{self.path} row {r} (key {self.key(st, r)!r}) column {col}"
                raise ValueError(f"{where}{err}") from None
            out[col][row] = view
        return int(self.timesteps[r])


class ArrowSource(_Source):
    """An HF ``save_to_disk`` dataset directory (or a single ``.arrow`` stream file), memory-mapped."""

    def __init__(self, path: str | os.PathLike, shapes: RecordShapes = OFFICIAL_SHAPES, max_open: int = 16):
        self.path = str(path)
        self.shapes = shapes
        self.max_open = max_open
        self._files_paths = _arrow_files(Path(path))
        self._open()

    def _open(self) -> None:
        self._files = [_ArrowFile(p, self.shapes) for p in self._files_paths]
        self._starts = np.cumsum([0] + [f.n for f in self._files]).tolist()
        self._maps = _OpenFiles(self.max_open)

    def __getstate__(self):  # pickled into spawned processes: reopen there
        return {
            "path": self.path,
            "shapes": self.shapes,
            "max_open": self.max_open,
            "_files_paths": self._files_paths,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[_ArrowFile, _ArrowMaps, int]:
        self._check_index(index)
        i = bisect.bisect_right(self._starts, index) - 1
        f = self._files[i]
        return f, self._maps.get(i, f), index - self._starts[i]

    def key(self, index: int) -> str:
        f, st, r = self._locate(index)
        return f.key(st, r)

    def where(self, index: int) -> str:
        f, st, r = self._locate(index)
        return f"{f.path} row {r} (key {f.key(st, r)!r})"

    def fill(self, index: int, out: dict[str, np.ndarray], row: int) -> int:
        f, st, r = self._locate(index)
        return f.fill(st, r, out, row)


# --------------------------------------------------------------------------------------------------------------
# webdataset tar shards


def _tar_files(path) -> list[Path]:
    if isinstance(path, list | tuple):
        files = [Path(p) for p in path]
    else:
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(p.glob("*.tar"))
        else:
            files = sorted(Path(p.parent).glob(p.name)) if p.parent.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no webdataset .tar shards at {path}")
    return files


def _split_name(name: str) -> tuple[str, str]:
    """webdataset rule: key = path up to the first dot of the basename, ext = the rest."""
    d, _, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    return (f"{d}/{k}" if d else k), ext


def _scan_tar(path: Path, mm) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of a tar, in order; fast path for plain ustar."""
    members = []
    pos, n = 0, len(mm)
    while pos + 512 <= n:
        hdr = mm[pos : pos + 512]
        if hdr == b"\0" * 512:
            return members
        typ = hdr[156:157]
        if typ not in (b"0", b"\0") or hdr[257:262] != b"ustar":
            return _scan_tar_slow(path)  # pax / GNU long names etc.: let tarfile handle them
        chk = hdr[148:156].rstrip(b"\0 ")
        if not chk or int(chk, 8) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError(f"{path}: corrupt tar header at byte {pos}")
        name = hdr[0:100].split(b"\0", 1)[0].decode()
        prefix = hdr[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
        size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
        if pos + 512 + size > n:
            raise ValueError(f"{path}: truncated tar (member {name!r} runs past the end of the file)")
        members.append((name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
    if pos != n or not members and n:
        raise ValueError(f"{path}: truncated tar (no end-of-archive marker)")
    return members


def _scan_tar_slow(path: Path) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, "r:") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt tar shard ({e})") from None


def _map_file(path: Path):
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return b""
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


class _TarShard:
    """One tar shard: indexed at open (member offsets per sample), mapped on demand (``load``)."""

    def __init__(self, path: Path):
        self.path, self.state = path, None
        mm = _map_file(path)
        wanted = {ext: i for i, ext in enumerate(["json"] + [WDS_EXT[c] for c in TENSOR_COLUMNS])}
        keys: list[str] = []
        loc: list[list[int]] = []
        for name, off, size in _scan_tar(path, mm):
            k, ext = _split_name(name)
            if ext not in wanted:
                continue
            if not keys or keys[-1] != k:
                keys.append(k)
                loc.append([-1] * (2 * len(wanted)))
            j = wanted[ext]
            loc[-1][2 * j], loc[-1][2 * j + 1] = off, size
        self.keys = keys
        self.loc = np.asarray(loc, dtype=np.int64).reshape(len(keys), 2 * len(wanted))
        for i, k in enumerate(keys):
            for ext, j in wanted.items():
                if ext != "json" and self.loc[i, 2 * j] < 0:
                    raise ValueError(f"{path} key {k!r}: missing member {k}.{ext}")

    def load(self):
        return _map_file(self.path)

    def meta(self, mm, i: int) -> tuple[str, int]:
        off, size = self.loc[i, 0], self.loc[i, 1]
        if off < 0:
            return self.keys[i], -1
        try:
            d = json.loads(bytes(mm[off : off + size]))
        except ValueError as e:
            raise ValueError(f"{self.path} key {self.keys[i]!r}: corrupt .json member ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{self.path} key {self.keys[i]!r}: .json member is not an object")
        ts = d.get(TIMESTEP_COLUMN)
        key = next((d[k] for k in ("key", KEY_COLUMN, "id") if d.get(k) is not None), self.keys[i])
        return str(key), (-1 if ts is None else int(ts))


class WebDatasetSource(_Source):
    """Webdataset tar shards (a directory of ``*.tar``, a glob, a file or a list), memory-mapped and indexed."""

    def __init__(self, path, shapes: RecordShapes = OFFICIAL_SHAPES, max_open: int = 16):
        self.path = str(path)
        self.shapes = shapes
        self.max_open = max_open
        self._paths = _tar_files(path)
        self._open()

    def _open(self) -> None:
        self._shards = [_TarShard(p) for p in self._paths]
        self._starts = np.cumsum([0] + [len(s.keys) for s in self._shards]).tolist()
        self._maps = _OpenFiles(self.max_open)

    def __getstate__(self):
        return {"path": self.path, "shapes": self.shapes, "max_open": self.max_open, "_paths": self._paths}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int):
        self._check_index(index)
        s = bisect.bisect_right(self._starts, index) - 1
        sh = self._shards[s]
        return sh, self._maps.get(s, sh), index - self._starts[s]

    def key(self, index: int) -> str:
        sh, mm, i = self._locate(index)
        return sh.meta(mm, i)[0]

    def where(self, index: int) -> str:
        sh, mm, i = self._locate(index)
        return f"{sh.path} sample {i} (key {sh.meta(mm, i)[0]!r})"

    def fill(self, index: int, out: dict[str, np.ndarray], row: int) -> int:
        sh, mm, i = self._locate(index)
        fields = self.shapes.fields()
        for j, col in enumerate(TENSOR_COLUMNS, start=1):
            off, size = int(sh.loc[i, 2 * j]), int(sh.loc[i, 2 * j + 1])
            cell = memoryview(mm)[off : off + size]
            try:
                out[col][row] = payload_view(cell, fields[col], where="")
            except ValueError as err:
                raise ValueError(f"{sh.path} key {sh.keys[i]!r} member .{WDS_EXT[col]}{err}") from None
        return sh.meta(mm, i)[1]


def open_source(path, shapes: RecordShapes = OFFICIAL_SHAPES, fmt: str = "auto") -> _Source:
    """Open ``path`` as ``"arrow"``, ``"webdataset"`` or ``"auto"`` (state.json / *.arrow -> Arrow; *.tar -> wds)."""
    if fmt == "auto":
        p = Path(path) if not isinstance(path, list | tuple) else None
        if p is None or p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
            fmt = "webdataset"
        elif p.suffix == ".arrow" or (p.is_dir() and ((p / "state.json").exists() or any(p.glob("*.arrow")))):
            fmt = "arrow"
        else:
            raise FileNotFoundError(f"{path}: neither an Arrow save_to_disk dataset nor webdataset shards")
    if fmt == "arrow":
        return ArrowSource(path, shapes)
    if fmt == "webdataset":
        return WebDatasetSource(path, shapes)
    raise ValueError(f"unknown data format {fmt!r}; expected 'arrow', 'webdataset' or 'auto'")
