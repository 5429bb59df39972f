"""AdamW as the MLPerf rules fix it, and the reference learning-rate schedule.

AdamW: betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on EVERY parameter (biases and norm weights too, as the
reference's single param group does), global-L2 gradient clipping at 1.0. Schedule: ``lr * k / W`` at optimizer
step k = 1..W, then ``lr`` (no decay).

On GPU this is Megatron's optimizer (``get_megatron_optimizer``: fp32 main params, distributed optimizer); on CPU
a torch ``AdamW`` over the fp32 parameters. Both are driven through :func:`set_lr` and the strategy's
``optimizer_step``.
"""

from __future__ import annotations

import re

import torch

from flux_nemo.mlperf import constants as C

# precision.adam_moments_dtype -> the Adam moments' torch dtype (bf16 only with the precision-aware optimizer)
MOMENTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def warmup_constant_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup over ``warmup_steps``, then constant."""
    if step < 1:
        raise ValueError(f"optimizer steps are 1-based, got {step}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return lr * step / warmup_steps


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every param group (torch and Megatron optimizers alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_torch_adamw(params, lr: float) -> torch.optim.AdamW:
    """The CPU optimizer: torch AdamW with the fixed MLPerf hyper-parameters, one param group (all decayed)."""
    return torch.optim.AdamW(
        list(params),
        lr=lr,
        betas=(C.ADAMW_BETA_1, C.ADAMW_BETA_2),
        eps=C.ADAMW_EPSILON,
        weight_decay=C.ADAMW_WEIGHT_DECAY,
        foreach=True,
    )


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """Clip the global L2 grad norm to 1.0 and step; returns the pre-clip norm as a device tensor (no sync)."""
    norm = torch.nn.utils.clip_grad_norm_(params, C.GRADIENT_CLIP_NORM, foreach=True)
    optimizer.step()
    return norm


def megatron_optimizer_config(
    lr: float,
    compute_dtype: torch.dtype,
    use_distributed_optimizer: bool,
    precision_aware: bool = False,
    moments_dtype: str = "fp32",
    param_remainders: bool = False,
    **kw,
):
    """``OptimizerConfig`` of the MLPerf AdamW (Megatron ``optimizer="adam"`` with decoupled weight decay).

    ``precision_aware``: Megatron's precision-aware optimizer with every optimizer tensor in fp32 and the full fp32
    master weights kept (unless ``param_remainders``), so only the kernels change:
    TE's FusedAdam updates the master weight and writes the bf16 parameter in one pass. ``moments_dtype="bf16"``
    (precision-aware only) keeps Adam's exp_avg and exp_avg_sq in bf16: master weights stay fp32.
    ``param_remainders`` (precision-aware only, ``precision.store_param_remainders``): Megatron's
    ``store_param_remainders``, the fp32 master weight kept as the bf16 parameter plus an int16 remainder.
    """
    from megatron.core.optimizer import OptimizerConfig

    if moments_dtype not in MOMENTS_DTYPES:
        raise ValueError(f"Adam moments dtype {moments_dtype!r}; expected one of {list(MOMENTS_DTYPES)}")
    if moments_dtype != "fp32" and not precision_aware:
        raise ValueError(f"Adam moments in {moments_dtype} need the precision-aware optimizer")
    if param_remainders and not precision_aware:
        raise ValueError(
            "precision.store_param_remainders=true needs precision.precision_aware_optimizer=true "
            "(TE FusedAdam keeps the remainders)"
        )
    if precision_aware:
        moments = MOMENTS_DTYPES[moments_dtype]
        kw.update(
            use_precision_aware_optimizer=True,
            store_param_remainders=param_remainders,
            exp_avg_dtype=moments,
            exp_avg_sq_dtype=moments,
        )

    return OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=0.0,
        weight_decay=C.ADAMW_WEIGHT_DECAY,
        decoupled_weight_decay=True,
        adam_beta1=C.ADAMW_BETA_1,
        adam_beta2=C.ADAMW_BETA_2,
        adam_eps=C.ADAMW_EPSILON,
        clip_grad=C.GRADIENT_CLIP_NORM,
        bf16=compute_dtype == torch.bfloat16,
        params_dtype=compute_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        **kw,
    )


def build_megatron_optimizer(model_chunks: list, config, per_block_groups: bool = False):
    """Megatron optimizer over Megatron-DDP-wrapped chunks, weight decay on all params (GPU only).

    ``config_overrides={}`` replaces Megatron's default overrides, which would exempt biases and 1-D params
    from weight decay (``get_standard_config_overrides``); the reference decays everything. ``per_block_groups``:
    one param group per block (:func:`per_block_overrides`).
    """
    from megatron.core.optimizer import get_megatron_optimizer

    overrides = per_block_overrides(model_chunks) if per_block_groups else {}
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


_BLOCK = re.compile(r"(?:^|\.)((?:double|single)_blocks\.\d+)\.")
GROUP_KEY = "flux_param_group"


def per_block_overrides(model_chunks: list) -> dict:
    """Megatron ``config_overrides`` that give each Flux block (``double_blocks.i``, then ``single_blocks.j``) its
    own param group, and everything else (embedders, final layer) one more, last. Every group keeps the same
    hyper-parameters: the override only adds its index under ``flux_param_group`` (Megatron's
    ``ParamGroupOverride`` allows keys of one's own; the optimizer ignores it), so the update is the same.

    What it is for: TE's FusedAdam builds its per-parameter tensor lists for a group on the host, then launches
    that group's kernels. Megatron's step reads the grad norm on the host first, so the GPU waits for the list
    building of the whole model (2.5-4 ms per step at 2 + 4 blocks, H100 timeline). Per group, the GPU runs a
    block's Adam while the host builds the next block's lists.
    """
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    blocks = []  # block prefixes in model order
    for chunk in model_chunks:
        for name, _ in chunk.named_parameters():
            match = _BLOCK.search(name)
            if match and match.group(1) not in blocks:
                blocks.append(match.group(1))
    overrides = {ParamKey(name=f"*{prefix}.*"): {GROUP_KEY: i} for i, prefix in enumerate(blocks)}
    rest = ParamWithNamePredicate(name="flux_outside_blocks", fn=lambda _param, name: not _BLOCK.search(name))
    overrides[ParamKey(with_name_predicate=rest)] = {GROUP_KEY: len(blocks)}
    return overrides


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers holding the state: itself, or those inside a (chained) Megatron optimizer."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]
