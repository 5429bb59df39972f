"""Two ranks reproduce the single-rank output and gradients of Flux under
  * context parallelism (each rank holds half of the text and half of the image tokens), and
  * tensor parallelism (each rank holds half of the heads and of the MLP width),
on CPU (gloo + the local spec in float64, exact) and on GPU (NCCL + Transformer Engine in bf16)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flux_testing import randomize_

from flux_nemo import flow_matching as fm
from flux_nemo.flow_matching import ModelInputs
from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.shims import free_port

WORKER = Path(__file__).with_name("parallel_worker.py")


def reference_run(backend: str, dtype: torch.dtype, device: str) -> dict:
    """A CP=1 forward/backward of a tiny model with random non-zero weights; what the ranks must reproduce."""
    config_fields = dict(
        params_dtype=dtype, context_in_dim=32, vec_in_dim=16, num_double_blocks=1, num_single_blocks=1
    )
    if device == "cuda":
        config_fields.update(bf16=True, use_cpu_initialization=False)
    config = FluxConfig.from_flavor("tiny", **config_fields)
    model = build_flux(config, backend=backend).to(device)
    randomize_(model, seed=0)
    b, h, w, txt_len = 2, 4, 4, 8  # 16 image tokens and 8 text tokens, split in two
    kw = {"generator": torch.Generator().manual_seed(1), "dtype": dtype}
    inputs = ModelInputs(
        img=torch.randn(b, h * w, config.in_channels, **kw),
        txt=torch.randn(b, txt_len, config.context_in_dim, **kw),
        y=torch.randn(b, config.vec_in_dim, **kw),
        timesteps=torch.rand(b, **kw),
        img_ids=fm.image_ids(1, h, w),
        txt_ids=fm.text_ids(1, txt_len),
        target=torch.randn(b, h * w, config.in_channels, **kw),
    )
    dev = ModelInputs(*(t.to(device) for t in inputs))
    out = model(dev.img, dev.txt, dev.y, dev.timesteps, dev.img_ids, dev.txt_ids)
    (out.double() * dev.target.double()).sum().backward()
    weights = {k: v.cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    return {
        "backend": backend,
        "config": config_fields,
        "weights": weights,
        "inputs": inputs._asdict(),
        "output": out.detach().cpu(),
        "grads": grads,
    }


def run_ranks(data: dict, tmp_path: Path) -> list[str]:
    torch.save(data, tmp_path / "data.pt")
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / "data.pt")],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=360)
        print(stdout)
        assert worker.returncode == 0, stderr[-4000:]
        assert "PARALLEL-OK" in stdout
        outputs.append(stdout)
    return outputs


@pytest.mark.parametrize("mode", ["cp", "tp"])
def test_two_ranks_match_one_on_cpu(megatron_world, tmp_path, mode):
    data = reference_run("local", torch.float64, "cpu")
    data.update(mode=mode, tol_out=1e-10, tol_grad=1e-10)
    run_ranks(data, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["cp", "tp"])
def test_two_ranks_match_one_with_transformer_engine(megatron_world, tmp_path, mode):
    pytest.importorskip("transformer_engine")
    data = reference_run("te", torch.bfloat16, "cuda")
    # bf16: partial softmaxes (CP ring) and partial GEMM sums (TP all-reduce) round in another order.
    data.update(mode=mode, tol_out=3e-2, tol_grad=5e-2)
    run_ranks(data, tmp_path)
