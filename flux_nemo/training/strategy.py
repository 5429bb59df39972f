"""``MegatronStrategy``: a Lightning strategy that runs the Flux module under Megatron-Core.

* Process group and Megatron parallel state through ``flux_nemo.shims.initialize_megatron`` (tensor / context
  parallel sizes from ``cfg.parallel``), with the run's single integer seed broadcast from rank 0.
* GPU: the network is wrapped in Megatron ``DistributedDataParallel`` (bucketed, overlapped grad reduce and param
  gather, fp32 grad reduction by default) over a bf16 ``Float16Module``, and optimised by
  ``get_megatron_optimizer`` (fp32 main params, distributed optimizer).
* CPU: the same LightningModule in one process (gloo), fp32 parameters, torch AdamW.
Checkpoints are Megatron distributed checkpoints (``flux_nemo.training.checkpoint``), written and read through
``save_checkpoint`` / ``load_checkpoint`` so that NeMo's checkpoint callback and ``resume_if_exists`` work.
It subclasses Lightning's ``DDPStrategy`` for its launcher, collectives and cluster-environment handling only.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig

from flux_nemo import shims
from flux_nemo.mlperf.logger import seed_from_urandom
from flux_nemo.training import checkpoint as ckpt
from flux_nemo.training.optim import (
    build_megatron_optimizer,
    build_torch_adamw,
    clip_and_step,
    megatron_optimizer_config,
)


def broadcast_seed(seed: int | None) -> int:
    """The run's one integer seed: ``seed`` if given, else fresh from /dev/urandom on rank 0, same on all ranks."""
    value = [seed if seed is not None else seed_from_urandom()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return int(value[0])


def wrap_megatron_ddp(flux: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """Megatron DDP (+ bf16 ``Float16Module``) around the network, configured from ``cfg.parallel/precision``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        num_distributed_optimizer_instances=par.num_distributed_optimizer_instances,
        bucket_size=par.bucket_size,
        check_for_nan_in_grad=False,  # the trainer stops on a non-finite loss / grad norm itself
    )
    module = Float16Module(flux.config, flux) if flux.config.bf16 else flux
    model = DistributedDataParallel(flux.config, ddp_config, module)
    model.broadcast_params()  # identical start on every data-parallel rank regardless of init RNG
    return model


class MegatronStrategy(DDPStrategy):
    """Megatron-Core DDP + distributed optimizer on GPU; one gloo process with torch AdamW on CPU."""

    strategy_name = "flux_megatron"

    def __init__(self, cfg: DictConfig, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.seed: int | None = None
        self._params_synced = False  # Megatron DDP forward pre-hooks disabled, parameters gathered

    @property
    def megatron(self) -> bool:
        """True on the GPU path (Megatron DDP and optimizer)."""
        return self.root_device.type == "cuda"

    # ------------------------------------------------------------------ distributed setup
    def setup_distributed(self) -> None:
        self.set_world_ranks()
        env = self.cluster_environment
        os.environ.update(
            RANK=str(self.global_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
        )
        if not self.megatron and self.world_size > 1:  # e.g. torchrun with a CPU system: see build_trainer
            raise RuntimeError(
                f"{self.world_size} CPU processes: the CPU path trains in one process (no gradient reduction)"
            )
        backend = self._get_process_group_backend()
        shims.init_process_group(backend)
        self.seed = broadcast_seed(self.cfg.train.seed)
        par = self.cfg.parallel
        shims.initialize_megatron(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            context_parallel_size=par.context_parallel_size,
            seed=self.seed,
            backend=backend,
        )

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.configure_ddp()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        if self.megatron:
            module = self.lightning_module
            module.flux = wrap_megatron_ddp(module.flux, self.cfg)

    def setup_optimizers(self, trainer) -> None:
        self.optimizers = [self.lightning_module.configure_optimizers()]
        self.lr_scheduler_configs = []

    def build_optimizer(self):
        """Megatron optimizer over the DDP-wrapped model (GPU) or torch AdamW (CPU); LR set per step."""
        module = self.lightning_module
        if self.megatron:
            config = megatron_optimizer_config(
                module.lr,
                module.dtype_compute,
                self.cfg.parallel.use_distributed_optimizer,
                precision_aware=self.cfg.precision.precision_aware_optimizer,
                moments_dtype=self.cfg.precision.adam_moments_dtype,
                param_remainders=self.cfg.precision.store_param_remainders,
                overlap_param_gather=self.cfg.parallel.overlap_param_gather,
            )
            return build_megatron_optimizer(
                [module.flux], config, per_block_groups=self.cfg.parallel.optimizer_groups_per_block
            )
        if self.cfg.precision.precision_aware_optimizer:
            raise ValueError(
                "precision.precision_aware_optimizer=true needs the GPU path (Megatron distributed optimizer)"
            )
        if self.cfg.parallel.optimizer_groups_per_block:
            raise ValueError(
                "parallel.optimizer_groups_per_block=true needs the GPU path (Megatron optimizer)"
            )
        return build_torch_adamw(module.flux.parameters(), module.lr)

    # ------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        """Clear gradients (Megatron DDP: also its contiguous grad buffers)."""
        if self.megatron:
            self.lightning_module.flux.zero_grad_buffer()
        self.optimizers[0].zero_grad(set_to_none=True)

    def grad_sync(self, enabled: bool):
        """Context for one micro-batch: gradient reduction only on the last micro-batch of a step."""
        if enabled or not self.megatron:
            return contextlib.nullcontext()
        return self.lightning_module.flux.no_sync()

    def finish_grad_sync(self) -> None:
        """Megatron: data-parallel grad reduction, plus the tensor-parallel sum of the QK-norm weight grads."""
        if self.megatron:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.lightning_module.flux])

    def optimizer_step(self, optimizer, closure, model=None, **kwargs) -> torch.Tensor:
        """Clip to global L2 norm 1.0 and step; returns the pre-clip grad norm as a tensor on the device.

        CPU: no host sync. GPU: Megatron's optimizer computes the norm on the host (as Megatron always does).
        """
        closure()
        if self.megatron:
            _, grad_norm, _ = optimizer.step()
            return torch.tensor(float("nan") if grad_norm is None else grad_norm, device=self.root_device)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return clip_and_step(optimizer, params)

    def eval_mode(self, enabled: bool) -> None:
        """Around evaluation and checkpoint saves: gather parameters synchronously instead of in forward
        pre-hooks (Megatron DDP with overlapped param gather). Idempotent: a save during evaluation nests."""
        if not (self.megatron and self.cfg.parallel.overlap_param_gather) or enabled == self._params_synced:
            return
        flux = self.lightning_module.flux
        if enabled:
            flux.disable_forward_pre_hook(param_sync=True)
        else:
            flux.enable_forward_pre_hook()
        self._params_synced = enabled

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        was_synced = self._params_synced
        self.eval_mode(True)
        ckpt.save(self, checkpoint, filepath)
        self.eval_mode(was_synced)

    def load_checkpoint(self, checkpoint_path) -> dict:
        return ckpt.load(self, checkpoint_path)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Model weights are restored by ``load_checkpoint`` (distributed checkpoint) already."""

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Optimizer state is restored by ``load_checkpoint`` (distributed checkpoint) already."""

    def remove_checkpoint(self, filepath) -> None:
        ckpt.remove(self, filepath)

    def lightning_module_state_dict(self) -> dict:
        """Weights go into the distributed checkpoint, not into Lightning's dict."""
        return {}

    def optimizer_state(self, optimizer) -> dict:
        """Optimizer state goes into the distributed checkpoint, not into Lightning's dict."""
        return {}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Load checkpoints into the wrapped model and the built optimizer."""
        return True
