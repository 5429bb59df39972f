"""Two gloo ranks on CPU, with ``transformer_engine`` blocked from importing.

* Tensor parallelism: Megatron-sharded weights reproduce the unsharded model, and the reference init draws
  every shard with the bounds of the global (fused) shapes.
* No hard Transformer Engine dependency: ``flux_nemo.model`` imports and the local spec runs without it,
  while the ``te`` spec fails with ImportError instead of Megatron's silent mock.

Both run in the same worker processes because starting Python + Megatron is the slow part.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from flux_testing import make_inputs

from flux_nemo.shims import free_port

WORKER = """
import faulthandler, importlib.abc, math, sys
faulthandler.dump_traceback_later(150, exit=True)  # fail, never hang, if a collective stalls


class BlockTransformerEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformer_engine":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, BlockTransformerEngine())

import torch
from flux_nemo.shims import initialize_megatron
initialize_megatron(tensor_model_parallel_size=2)
from megatron.core import parallel_state
from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.model.specs import get_flux_spec

try:
    get_flux_spec("te")
except ImportError:
    print("TE-SPEC-IMPORT-ERROR")

data = torch.load(sys.argv[1])
rank = parallel_state.get_tensor_model_parallel_rank()
config = FluxConfig.from_flavor("tiny", tensor_model_parallel_size=2, **data["small"])
model = build_flux(config).eval()

# Reference init on shards: bounds of the global fused shapes (single-block qkv: [3h + mlp, h]).
h, mlp = config.hidden_size, config.ffn_hidden_size
qkv = model.single_blocks[0].self_attention.linear_qkv.weight
assert qkv.shape == (3 * h // 2, h), qkv.shape
bound = math.sqrt(6 / (4 * h + mlp))
assert 0.99 * bound < qkv.abs().amax() <= bound, (qkv.abs().amax(), bound)

# adaLN modulation linears are split by output rows (3.2B of Flux.1's 11.9B parameters).
mod = model.double_blocks[0].img_mod.linear.weight
assert mod.shape == (6 * h // 2, h) and mod.tensor_model_parallel and mod.partition_dim == 0, mod.shape
assert model.final_layer.adaLN_modulation.linear.weight.shape == (h, h)
# Distributed checkpoints hold every tensor-parallel weight as this rank's shard of the global tensor (inside the
# block lists too), and replicated weights whole.
sharded = model.sharded_state_dict()
for key, rows in [
    ("double_blocks.0.img_mod.linear.weight", 6 * h),
    ("single_blocks.1.modulation.linear.bias", 3 * h),
    ("double_blocks.1.self_attention.txt_linear_qkv.weight", 3 * h),
    ("single_blocks.0.mlp.linear_fc1.weight", mlp),
    ("final_layer.adaLN_modulation.linear.weight", 2 * h),
]:
    assert sharded[key].global_shape[0] == rows, (key, sharded[key])
    assert sharded[key].global_offset[0] == rank * rows // 2, (key, sharded[key])
for key in ("double_blocks.0.self_attention.img_linear_proj.bias", "txt_in.weight"):
    assert sharded[key].local_shape == sharded[key].global_shape, (key, sharded[key])

# Shard the unsharded weights the way Megatron splits them (whole heads: per-head QKV rows).
with torch.no_grad():
    for name, p in model.named_parameters():
        full = data["weights"][name]
        if getattr(p, "tensor_model_parallel", False):
            full = full.chunk(2, dim=p.partition_dim)[rank]
        p.copy_(full)
    out = model(**data["inputs"])
err = ((out - data["output"]).abs().amax() / data["output"].abs().amax()).item()
print(f"rank {rank}: relative error {err:.2e}")
assert err < 1e-10, err
print("TP-OK")
"""

# Narrow inputs keep the two worker processes quick; the blocks are the tiny flavor's.
SMALL = dict(params_dtype=torch.float64, context_in_dim=32, vec_in_dim=16)


def test_two_ranks_tensor_parallel_without_transformer_engine(build, tmp_path: Path):
    model = build(**SMALL)
    inputs = make_inputs(model.config, batch=2, h=2, w=3, txt_len=3, dtype=torch.float64)
    with torch.no_grad():
        output = model(**inputs)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"weights": weights, "inputs": inputs, "output": output, "small": SMALL}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)

    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.pt")],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [w.communicate(timeout=240) + (w.returncode,) for w in workers]
    for stdout, stderr, returncode in results:
        print(stdout)
        assert returncode == 0, stderr[-3000:]
        assert "TP-OK" in stdout and "TE-SPEC-IMPORT-ERROR" in stdout
