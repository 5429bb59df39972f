"""One rank of a parallel-vs-unsharded check (run by tests/parallel/test_parallel.py).

Loads the unsharded weights, inputs, output, gradients and AdamW-stepped weights of a single-rank run, loads this
rank's Megatron shard of every weight in the layout of ``mode`` (:data:`MODES`), runs this rank's part of the batch
(one micro-batch per sample, through the training step's ``accumulate``) and checks, each against the matching part
of the single-rank run:
  * the output: this rank's slice of the tokens under context parallelism, else the whole output (tensor
    parallelism, with or without sequence parallelism, replicates it);
  * this rank's shard of every gradient after the reductions of training: summed over the context-parallel group
    (Megatron DDP reduces over data x context ranks), then Megatron's own tensor-parallel reduction of
    ``finalize_model_grads`` (QK-norm weights; with sequence parallelism every parameter marked
    ``sequence_parallel``);
  * one step of the training AdamW on those gradients: the stepped shards, measured against the size of the step.
With sequence parallelism it first checks that a sequence length that does not split over the tensor-parallel
ranks fails, naming the tensor. On CUDA it first saves and reloads the shards through Megatron's distributed
checkpoint (each rank must get its own shards back).
"""

import faulthandler
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: flux_testing

from flux_nemo.shims import initialize_megatron  # noqa: E402

MODES = {
    "cp": dict(context_parallel_size=2),
    "tp": dict(tensor_model_parallel_size=2),
    "sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp_sp": dict(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
    "tp4_sp": dict(tensor_model_parallel_size=4, sequence_parallel=True),
    "cp_sp_qk_fused": dict(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
}


def check_dist_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Megatron's distributed checkpoint (CUDA only) round trip: every rank gets its own shards back."""
    from megatron.core import dist_checkpointing

    path.mkdir(exist_ok=True)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    wrong = [name for name, p in model.named_parameters() if not torch.equal(p, saved[name])]
    assert not wrong, f"rank {dist.get_rank()}: the checkpoint gave back other values for {wrong[:5]}"


def main() -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # fail, never hang, if a collective stalls
    data = torch.load(sys.argv[1])
    backend, mode = data["backend"], data["mode"]
    layout = MODES[mode]
    initialize_megatron(
        tensor_model_parallel_size=layout.get("tensor_model_parallel_size", 1),
        context_parallel_size=layout.get("context_parallel_size", 1),
        backend="nccl" if data["device"] == "cuda" else "gloo",
    )

    from flux_testing import adamw_step
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )

    from flux_nemo.flow_matching import ModelInputs
    from flux_nemo.model import FluxConfig, build_flux
    from flux_nemo.training.context_parallel import shard_inputs
    from flux_nemo.training.micro_batches import accumulate

    device = torch.device(data["device"])
    config = FluxConfig.from_flavor("tiny", **layout, **data["config"])
    model = build_flux(config, backend=backend).to(device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_size = parallel_state.get_context_parallel_world_size()

    def shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of an unsharded tensor: Megatron's split for tensor-parallel weights, else all of it."""
        if getattr(p, "tensor_model_parallel", False):
            return full.chunk(tp_size, dim=p.partition_dim)[tp_rank]
        return full

    def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
        return ((x.double() - ref.double()).norm() / scale.double().norm().clamp_min(1e-30)).item()

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard(p, data["weights"][name]))

    if device.type == "cuda":
        check_dist_checkpoint(model, Path(sys.argv[1]).parent / "dist_ckpt")

    inputs = ModelInputs(**{k: v.to(device) for k, v in data["inputs"].items()})
    local = shard_inputs(inputs)  # identity unless context parallel

    if config.sequence_parallel:
        for name in ("img", "txt"):  # one token too few: the length no longer splits over the ranks
            short = {name: getattr(local, name)[:, 1:], f"{name}_ids": getattr(local, f"{name}_ids")[:, 1:]}
            bad = local._replace(**short)
            try:
                model(bad.img, bad.txt, bad.y, bad.timesteps, bad.img_ids, bad.txt_ids)
            except ValueError as e:
                assert f"{name} has " in str(e) and f"tensor_model_parallel_size={tp_size}" in str(e), e
            else:
                raise AssertionError(f"an odd {name} length ran under sequence parallelism")

    # As the training step runs it: two micro-batches of one sample each, the adaLN modulations computed once for
    # both (flux_nemo.training.micro_batches); the gradients must still be the single-rank, single-batch run's.
    # That run's loss was sum(output * target); target is sliced like the image tokens.
    micro_batches = [
        local._replace(
            **{f: getattr(local, f)[i : i + 1] for f in ("img", "txt", "y", "timesteps", "target")}
        )
        for i in range(len(local.y))
    ]
    outputs = []

    def loss_fn(x, conditioning):
        outputs.append(model(x.img, x.txt, x.y, x.timesteps, x.img_ids, x.txt_ids, conditioning=conditioning))
        return len(micro_batches) * (outputs[-1].double() * x.target.double()).sum()  # accumulate divides

    accumulate(model, micro_batches, loss_fn)
    out = torch.cat(outputs)

    expected = data["output"].to(device)
    if cp_size > 1:
        expected = expected.chunk(cp_size, dim=1)[cp_rank]
    out_err = ((out.double() - expected.double()).abs().amax() / expected.double().abs().amax()).item()

    if cp_size > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=parallel_state.get_context_parallel_group())
    # The tensor-parallel part of Megatron's finalize_model_grads, which reads the ddp_config of the DDP wrapper.
    _allreduce_non_tensor_model_parallel_grads(
        [SimpleNamespace(module=model, ddp_config=DistributedDataParallelConfig())], config
    )

    grad_err, grads = 0.0, {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.detach()
        ref = shard(p, data["grads"][name].to(device))
        grad_err = max(grad_err, rel_err(grads[name], ref, ref))

    stepped, step_err = adamw_step(dict(model.named_parameters()), grads), 0.0
    for name, p in model.named_parameters():
        ref, before = (shard(p, data[key][name].to(device)) for key in ("stepped", "weights"))
        step_err = max(step_err, rel_err(stepped[name], ref, ref.double() - before.double()))
    print(
        f"{mode} rank {dist.get_rank()}: output relative max error {out_err:.3e}, worst gradient relative L2 error "
        f"{grad_err:.3e}, worst AdamW step relative L2 error {step_err:.3e}"
    )
    assert out_err < data["tol_out"], out_err
    assert grad_err < data["tol_grad"], grad_err
    assert step_err < data["tol_step"], step_err
    print("PARALLEL-OK")


if __name__ == "__main__":  # Megatron's checkpoint writer starts a "spawn" process, which imports this module
    main()
