"""Loaders: contiguous DP sharding, infinite in-order train with exact state, padded equal-length eval."""

import itertools

import pytest
import torch

from flux_nemo.data.format import RecordShapes, write_arrow_dataset, write_webdataset
from flux_nemo.data.loader import build_eval_loader, build_train_loader, contiguous_chunk, eval_num_batches

SHAPES = RecordShapes(t5_len=2, t5_dim=4, clip_dim=3, latent_channels=1, latent_size=2)


def rows(n, timesteps=True):
    # sample i is recognisable from any of its tensors: clip = [i, i, i]
    for i in range(n):
        f = SHAPES.fields()
        yield {
            "__key__": str(i),
            "t5_encodings": torch.full(f["t5_encodings"], float(i)),
            "clip_encodings": torch.full(f["clip_encodings"], float(i)),
            "mean": torch.full(f["mean"], float(-i)),
            "logvar": torch.full(f["logvar"], 0.5 * i),
            "timestep": (i % 8) if timesteps else None,
        }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_arrow_dataset(root / "a23", rows(23), SHAPES, rows_per_file=5)
    write_webdataset(root / "w23", rows(23), SHAPES, samples_per_shard=6)
    write_arrow_dataset(root / "cc", rows(10, timesteps=False), SHAPES, with_timestep=False)
    write_arrow_dataset(root / "nulls", rows(10, timesteps=False), SHAPES, with_timestep=True)
    return root


def ids(batch):
    """Sample ids of a batch (from clip), checked consistent with the other tensors."""
    i = batch["clip"][:, 0].float()
    assert torch.equal(batch["t5"][:, 0, 0].float(), i)
    assert torch.equal(batch["mean"][:, 0, 0, 0].float(), -i)
    return [int(x) for x in i]


@pytest.mark.parametrize("n,world", [(23, 1), (23, 4), (10, 3), (2, 5), (1099776, 7), (29696, 48)])
def test_contiguous_chunk_matches_hf_shard(n, world):
    chunks = [contiguous_chunk(n, r, world) for r in range(world)]
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    sizes = [b - a for a, b in chunks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    if n < 100:  # the HF oracle
        import datasets

        ds = datasets.Dataset.from_dict({"i": list(range(n))})
        for r, (a, b) in enumerate(chunks):
            if a == b:  # HF raises on an empty shard
                continue
            assert ds.shard(world, r, contiguous=True)["i"][:] == list(range(a, b))
    with pytest.raises(ValueError):
        contiguous_chunk(n, world, world)


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
@pytest.mark.parametrize("workers", [0, 2])
def test_train_order_is_infinite_contiguous_without_duplicates(data, fmt, workers):
    path = data / ("a23" if fmt == "arrow" else "w23")
    # rank 1 of 4 over 23 samples owns [6, 12): 6 samples; batches of 4 straddle the wrap
    tl = build_train_loader(
        path, dp_rank=1, dp_world=4, micro_batch_size=4, num_workers=workers, shapes=SHAPES, fmt=fmt
    )
    got = [ids(b) for b in itertools.islice(tl, 5)]
    want = [6 + k % 6 for k in range(20)]
    assert got == [want[i : i + 4] for i in range(0, 20, 4)]
    assert tl.state_dict()["samples_seen"] == 20 and tl.position == 2 and tl.epoch == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_train_state_restores_exactly(data, workers):
    def make():
        return build_train_loader(
            data / "a23", dp_rank=0, dp_world=2, micro_batch_size=5, num_workers=workers, shapes=SHAPES
        )

    ref = [ids(b) for b in itertools.islice(make(), 9)]
    tl = make()
    it = iter(tl)
    first = [ids(next(it)) for _ in range(4)]
    state = tl.state_dict()
    [ids(next(it)) for _ in range(2)]  # consumed after the checkpoint: must be replayed after restore
    del it
    resumed = make()
    resumed.load_state_dict(state)
    rest = [ids(b) for b in itertools.islice(resumed, 5)]
    assert first + rest == ref
    assert ref[2] == [10, 11, 0, 1, 2]  # rank 0 owns [0, 12)


def test_train_state_validation(data):
    tl = build_train_loader(
        data / "a23", dp_rank=0, dp_world=2, micro_batch_size=2, num_workers=0, shapes=SHAPES
    )
    other = build_train_loader(
        data / "a23", dp_rank=0, dp_world=4, micro_batch_size=2, num_workers=0, shapes=SHAPES
    )
    with pytest.raises(ValueError, match="data-parallel world size 4, this run has 2"):
        tl.load_state_dict(other.state_dict())
    small = build_train_loader(
        data / "cc", dp_rank=0, dp_world=2, micro_batch_size=2, num_workers=0, shapes=SHAPES
    )
    with pytest.raises(ValueError, match="dataset of 10 samples"):
        tl.load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="no data"):
        build_train_loader(data / "cc", dp_rank=11, dp_world=12, micro_batch_size=1, shapes=SHAPES)


@pytest.mark.parametrize("world,mbs", [(1, 4), (3, 4), (4, 2), (5, 16), (30, 1)])
def test_eval_equal_batch_counts_and_exact_coverage(data, world, mbs):
    seen = []
    counts = set()
    for rank in range(world):
        el = build_eval_loader(
            data / "a23",
            dp_rank=rank,
            dp_world=world,
            micro_batch_size=mbs,
            num_workers=rank % 2,
            shapes=SHAPES,
        )
        batches = list(el)
        assert len(batches) == len(el) == eval_num_batches(23, world, mbs)
        counts.add(len(batches))
        for b in batches:
            assert b["t5"].shape == (mbs, 2, 4) and b["valid"].dtype == torch.bool
            v = b["valid"]
            seen += [i for i, ok in zip(ids(b), v.tolist(), strict=True) if ok]
            assert torch.equal(
                b["timestep"][v],
                torch.tensor([i % 8 for i, ok in zip(ids(b), v.tolist(), strict=True) if ok]),
            )
            assert not b["mean"][~v].any() and (b["timestep"][~v] == 0).all()
    assert len(counts) == 1
    assert seen == list(range(23))  # every sample exactly once, in order


def test_eval_on_webdataset_is_identical(data):
    a = list(build_eval_loader(data / "a23", dp_rank=1, dp_world=3, micro_batch_size=3, shapes=SHAPES))
    w = list(
        build_eval_loader(
            data / "w23", dp_rank=1, dp_world=3, micro_batch_size=3, shapes=SHAPES, fmt="webdataset"
        )
    )
    for ba, bw in zip(a, w, strict=True):
        for k in ba:
            assert torch.equal(ba[k], bw[k]), k


@pytest.mark.parametrize("name", ["cc", "nulls"])
def test_missing_or_null_timestep_is_minus_one(data, name):
    b = next(iter(build_train_loader(data / name, dp_rank=0, dp_world=1, micro_batch_size=4, shapes=SHAPES)))
    assert b["timestep"].dtype == torch.int64 and b["timestep"].tolist() == [-1] * 4
    assert b["valid"].all()


def test_batch_contract_dtypes(data):
    b = next(iter(build_train_loader(data / "a23", dp_rank=0, dp_world=1, micro_batch_size=3, shapes=SHAPES)))
    assert set(b) == {"t5", "clip", "mean", "logvar", "timestep", "valid"}
    for k in ("t5", "clip", "mean", "logvar"):
        assert b[k].dtype == torch.bfloat16 and b[k].is_contiguous()
    assert b["mean"].shape == (3, 1, 2, 2) and b["clip"].shape == (3, 3)
    assert torch.equal(b["logvar"][:, 0, 0, 0].float(), torch.tensor([0.0, 0.5, 1.0]))


def test_state_is_in_samples_so_micro_batch_may_change(data):
    tl = build_train_loader(
        data / "a23", dp_rank=0, dp_world=1, micro_batch_size=3, num_workers=0, shapes=SHAPES
    )
    it = iter(tl)
    assert [ids(next(it)) for _ in range(3)][-1] == [6, 7, 8]
    resumed = build_train_loader(
        data / "a23", dp_rank=0, dp_world=1, micro_batch_size=5, num_workers=2, shapes=SHAPES
    )
    resumed.load_state_dict(tl.state_dict())
    assert [ids(b) for b in itertools.islice(resumed, 3)] == [
        [9, 10, 11, 12, 13],
        [14, 15, 16, 17, 18],
        [19, 20, 21, 22, 0],
    ]
