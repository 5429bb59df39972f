"""One of two ranks of a parallel-vs-unsharded check (run by tests/parallel/test_parallel.py).

Loads the unsharded weights, inputs, output and gradients of a single-rank run, then
  * ``cp``: runs this rank's slice of the sequence with context_parallel_size=2 and checks its output slice and
    the CP-summed gradients;
  * ``tp``: loads this rank's Megatron shard of every weight with tensor_model_parallel_size=2 and checks the
    (replicated) output and this rank's shard of every gradient after ``finalize_model_grads`` semantics
    (QK-norm weight grads summed over the tensor-parallel group).
"""

import faulthandler
import sys

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(300, exit=True)  # fail, never hang, if a collective stalls

from flux_nemo.shims import initialize_megatron  # noqa: E402

data = torch.load(sys.argv[1])
backend, mode = data["backend"], data["mode"]
initialize_megatron(**{"tp": dict(tensor_model_parallel_size=2), "cp": dict(context_parallel_size=2)}[mode])

from megatron.core import parallel_state  # noqa: E402

from flux_nemo.flow_matching import ModelInputs  # noqa: E402
from flux_nemo.model import FluxConfig, build_flux  # noqa: E402
from flux_nemo.training.context_parallel import shard_inputs  # noqa: E402

device = torch.device("cuda" if backend == "te" else "cpu")
size_field = {"tp": "tensor_model_parallel_size", "cp": "context_parallel_size"}[mode]
config = FluxConfig.from_flavor("tiny", **{size_field: 2}, **data["config"])
model = build_flux(config, backend=backend).to(device)
tp_rank = parallel_state.get_tensor_model_parallel_rank()
tp_size = parallel_state.get_tensor_model_parallel_world_size()


def shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of an unsharded tensor: Megatron's split for tensor-parallel weights, else all of it."""
    if getattr(p, "tensor_model_parallel", False):
        return full.chunk(tp_size, dim=p.partition_dim)[tp_rank]
    return full


with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(shard(p, data["weights"][name]))

inputs = ModelInputs(**{k: v.to(device) for k, v in data["inputs"].items()})
local = shard_inputs(inputs)  # identity unless context parallel
out = model(local.img, local.txt, local.y, local.timesteps, local.img_ids, local.txt_ids)
# The CP=1 run's loss was sum(output * target); target is sliced like the image tokens.
(out.double() * local.target.double()).sum().backward()

rank = parallel_state.get_context_parallel_rank()
expected = data["output"].to(device)
if mode == "cp":
    expected = expected.chunk(2, dim=1)[rank]
out_err = ((out.double() - expected.double()).abs().amax() / expected.double().abs().amax()).item()
worst = 0.0
for name, p in model.named_parameters():
    grad = p.grad.detach().clone()
    if mode == "cp":
        dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
    elif "q_layernorm" in name or "k_layernorm" in name:  # each rank normalised only its own heads
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    ref = shard(p, data["grads"][name].to(device)).double()
    err = ((grad.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    worst = max(worst, err)
print(
    f"{mode} rank {dist.get_rank()}: output relative max error {out_err:.3e}, worst gradient relative L2 error {worst:.3e}"
)
assert out_err < data["tol_out"], out_err
assert worst < data["tol_grad"], worst
print("PARALLEL-OK")
