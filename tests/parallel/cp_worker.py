"""One context-parallel rank (run by tests/parallel/test_context_parallel.py, two processes).

Loads the unsharded weights, inputs, output and gradients of a CP=1 run, runs this rank's slice of the sequence
with context_parallel_size=2, and checks its output slice and the CP-summed gradients against the CP=1 run.
"""

import faulthandler
import sys

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(300, exit=True)  # fail, never hang, if a collective stalls

from flux_nemo.shims import initialize_megatron  # noqa: E402

data = torch.load(sys.argv[1])
backend = data["backend"]
initialize_megatron(context_parallel_size=2)

from megatron.core import parallel_state  # noqa: E402

from flux_nemo.flow_matching import ModelInputs  # noqa: E402
from flux_nemo.model import FluxConfig, build_flux  # noqa: E402
from flux_nemo.training.context_parallel import shard_inputs  # noqa: E402

device = torch.device("cuda" if backend == "te" else "cpu")
config = FluxConfig.from_flavor("tiny", context_parallel_size=2, **data["config"])
model = build_flux(config, backend=backend).to(device)
missing, unexpected = model.load_state_dict(data["weights"], strict=False)
assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

inputs = ModelInputs(**{k: v.to(device) for k, v in data["inputs"].items()})
local = shard_inputs(inputs)
out = model(local.img, local.txt, local.y, local.timesteps, local.img_ids, local.txt_ids)
# The CP=1 run's loss was sum(output * target); target is sliced like the image tokens.
(out.float() * local.target.float()).sum().backward()

rank = parallel_state.get_context_parallel_rank()
expected = data["output"].to(device).chunk(2, dim=1)[rank]
out_err = ((out.float() - expected.float()).abs().amax() / expected.float().abs().amax()).item()
worst = 0.0
for name, p in model.named_parameters():
    grad = p.grad.detach().clone()
    dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
    ref = data["grads"][name].to(device).float()
    err = ((grad.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    worst = max(worst, err)
print(f"rank {rank}: output relative max error {out_err:.3e}, worst gradient relative L2 error {worst:.3e}")
assert out_err < data["tol_out"], out_err
assert worst < data["tol_grad"], worst
print("CP-OK")
