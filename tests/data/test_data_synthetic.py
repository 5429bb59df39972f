"""Synthetic data: deterministic, official format, and the intended learnable structure."""

import hashlib
import math

import numpy as np
import pytest
import torch

from flux_nemo.data import synthetic as syn
from flux_nemo.data.format import RecordShapes, load_empty_encodings
from flux_nemo.data.loader import build_eval_loader, build_train_loader
from flux_nemo.data.readers import open_source

SHAPES = RecordShapes(t5_len=4, t5_dim=8, clip_dim=12, latent_channels=16, latent_size=8)


def digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_given_seed(tmp_path):
    syn.write_synthetic(tmp_path / "a", 6, 5, SHAPES, seed=3)
    syn.write_synthetic(tmp_path / "b", 6, 5, SHAPES, seed=3)
    syn.write_synthetic(tmp_path / "c", 6, 5, SHAPES, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    # sample i does not depend on the split size
    syn.write_synthetic(tmp_path / "d", 3, 2, SHAPES, seed=3)
    a, d = open_source(tmp_path / "a" / "train", SHAPES), open_source(tmp_path / "d" / "train", SHAPES)
    out_a = {c: np.zeros((1, *s), np.uint16) for c, s in SHAPES.fields().items()}
    out_d = {c: np.zeros((1, *s), np.uint16) for c, s in SHAPES.fields().items()}
    a.fill(2, out_a, 0)
    d.fill(2, out_d, 0)
    assert all(np.array_equal(out_a[c], out_d[c]) for c in out_a)


def test_formats_and_cli(tmp_path):
    syn.main(["--out", str(tmp_path / "w"), "--train", "5", "--eval", "9", "--t5-len", "4", "--t5-dim", "8",
              "--clip-dim", "12", "--latent-size", "8", "--seed", "1", "--format", "webdataset",
              "--samples-per-shard", "4"])  # fmt: skip
    paths = syn.write_synthetic(tmp_path / "a", 5, 9, SHAPES, seed=1)
    assert sorted(p.name for p in (tmp_path / "w" / "eval").iterdir()) == [
        f"shard-00000{i}.tar" for i in range(3)
    ]
    assert not (tmp_path / "a" / "train" / "data-00000-of-00001.arrow").stat().st_size == 0
    ea = list(build_eval_loader(paths["eval_path"], dp_rank=0, dp_world=1, micro_batch_size=4, shapes=SHAPES))
    ew = list(
        build_eval_loader(tmp_path / "w" / "eval", dp_rank=0, dp_world=1, micro_batch_size=4, shapes=SHAPES)
    )
    for ba, bw in zip(ea, ew, strict=True):
        for k in ba:
            assert torch.equal(ba[k], bw[k]), k
    assert torch.cat([b["timestep"][b["valid"]] for b in ea]).tolist() == [i % 8 for i in range(9)]
    tb = next(
        iter(
            build_train_loader(paths["train_path"], dp_rank=0, dp_world=1, micro_batch_size=5, shapes=SHAPES)
        )
    )
    assert tb["timestep"].tolist() == [-1] * 5  # CC12M-like: no timestep column
    t5e, clipe = load_empty_encodings(paths["empty_encodings_path"], SHAPES)
    assert t5e.shape == (1, 4, 8) and clipe.shape == (1, 12) and t5e.dtype == torch.bfloat16
    assert np.load(paths["empty_encodings_path"] / "t5_empty.npy").dtype == np.float16
    with pytest.raises(ValueError, match="unknown format"):
        syn.write_synthetic(tmp_path / "x", 1, 1, SHAPES, fmt="parquet")


def test_structure_is_learnable_from_text(tmp_path):
    """x0's per-channel offset is a linear function of the CLIP vector; the residual is small and i.i.d."""
    n = 96
    paths = syn.write_synthetic(tmp_path, n, 0, SHAPES, seed=0)
    b = next(
        iter(
            build_train_loader(paths["train_path"], dp_rank=0, dp_world=1, micro_batch_size=n, shapes=SHAPES)
        )
    )
    x0 = (b["mean"].float() - syn.LATENT_SHIFT) * syn.LATENT_SCALE  # [n, C, S, S]
    chan = x0.mean(dim=(2, 3))  # [n, C]
    resid = x0 - chan[:, :, None, None]
    assert abs(resid.std().item() - syn.SIGMA_RESID) < 0.01
    assert abs(chan.std().item() - syn.SIGMA_TEXT) < 0.2
    # least squares from the CLIP (and, separately, the T5) features: almost all variance explained
    for feats in (b["clip"].float(), b["t5"].float().flatten(1)):
        x = torch.cat([feats, torch.ones(n, 1)], dim=1)
        coef = torch.linalg.lstsq(x, chan).solution
        r2 = 1 - ((x @ coef - chan) ** 2).sum() / ((chan - chan.mean(0)) ** 2).sum()
        assert r2 > 0.99, r2
    lv = b["logvar"].float()
    assert lv.min() >= syn.LOGVAR_RANGE[0] - 0.05 and lv.max() <= syn.LOGVAR_RANGE[1] + 0.05
    # the velocity-MSE scale of the docstring: the text-aware rule beats the target, ignoring the text does not
    g = torch.Generator().manual_seed(0)
    z = b["mean"].float() + torch.exp(0.5 * lv) * torch.randn(x0.shape, generator=g)
    x0s = (z - syn.LATENT_SHIFT) * syn.LATENT_SCALE
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(n, 1, 1, 1, generator=g)
    xt, v = (1 - t) * x0s + t * noise, noise - x0s
    mse_text = ((v - (xt - chan[:, :, None, None])) ** 2).mean().item()
    mse_blind = ((v - xt) ** 2).mean().item()
    assert mse_text < 0.5 < 0.586 < 1.0 < mse_blind
    rho = math.sqrt(syn.SIGMA_RESID**2 + (syn.LATENT_SCALE * math.exp(-2.5)) ** 2)
    assert math.pi / 2 * rho < 0.2  # the per-t optimum given the text is far below the target


def test_empty_encodings_are_the_text_of_a_zero_code():
    m = syn.SyntheticMaps(SHAPES, seed=0)
    t5e, clipe = m.empty()
    assert t5e.shape == (1, 4, 8) and clipe.shape == (1, 12)
    assert clipe.abs().max() < 0.1 and t5e.abs().max() < 0.1  # only the small text noise
    r = m.sample("train", 0)
    assert r["clip_encodings"].abs().max() > 0.3


def test_difficulty_knobs():
    m = syn.SyntheticMaps(SHAPES, seed=0, sigma_text=0.2, sigma_resid=0.3)
    x0 = torch.stack(
        [(m.sample("train", i)["mean"] - syn.LATENT_SHIFT) * syn.LATENT_SCALE for i in range(64)]
    )
    chan = x0.mean(dim=(2, 3))
    assert abs((x0 - chan[:, :, None, None]).std().item() - 0.3) < 0.02
    assert abs(chan.std().item() - 0.2) < 0.08


def test_module_cli(tmp_path):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-W",
        "error::RuntimeWarning",
        "-m",
        "flux_nemo.data.synthetic",
        "--out",
        str(tmp_path),
    ]
    cmd += [
        "--train",
        "3",
        "--eval",
        "2",
        "--t5-len",
        "2",
        "--t5-dim",
        "4",
        "--clip-dim",
        "3",
        "--latent-size",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"data.train_path={tmp_path / 'train'}" in proc.stdout
    assert len(open_source(tmp_path / "eval", RecordShapes(2, 4, 3, 16, 2))) == 2
