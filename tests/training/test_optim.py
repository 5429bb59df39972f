"""AdamW as the rules fix it: schedule, weight decay on every parameter, global-norm clipping."""

import pytest
import torch

from flux_nemo.mlperf import constants as C
from flux_nemo.training.optim import build_torch_adamw, clip_and_step, set_lr, warmup_constant_lr


def test_linear_warmup_then_constant():
    assert [warmup_constant_lr(k, 1.0, 4) for k in (1, 2, 3, 4, 5, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_constant_lr(1, 2e-4, 0) == 2e-4
    with pytest.raises(ValueError, match="1-based"):
        warmup_constant_lr(0, 1.0, 4)


def test_torch_adamw_hyperparameters_and_decay_everywhere():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_torch_adamw(model.parameters(), 1e-3)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["betas"] == (C.ADAMW_BETA_1, C.ADAMW_BETA_2) == (0.9, 0.95)
    assert group["eps"] == 1e-8 and group["weight_decay"] == 0.1
    assert len(group["params"]) == 4  # weight, bias, norm weight, norm bias: all decayed
    set_lr(opt, 0.5)
    assert group["lr"] == 0.5


def test_decoupled_decay_applies_to_a_bias_with_zero_grad():
    bias = torch.nn.Parameter(torch.ones(3))
    opt = build_torch_adamw([bias], lr=0.1)
    bias.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.full((3,), 1 - 0.1 * 0.1))


def test_clip_to_global_norm_one_returns_pre_clip_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([a, b], lr=1.0)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_and_step(opt, [a, b])
    assert torch.is_tensor(norm) and norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6, 0.0]))  # grads scaled to norm 1
    torch.testing.assert_close(b.detach(), torch.tensor([-0.8]))


def test_megatron_param_groups_decay_biases_and_norms(megatron_world):
    """``config_overrides={}`` (what build_megatron_optimizer passes) keeps wd on 1-D params and biases."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1)
    ours = _get_param_groups([model], config, {})
    assert len(ours) == 1 and ours[0]["wd_mult"] == 1.0 and len(ours[0]["params"]) == 4
    default = _get_param_groups([model], config, None)
    assert {g["wd_mult"] for g in default} == {0.0, 1.0}  # Megatron's default would exempt them


def test_megatron_config_refuses_adam_moments_it_cannot_keep():
    """bf16 moments exist only in the precision-aware optimizer (TE FusedAdam); other dtypes are refused. (The
    precision-aware config itself imports TE: the GPU test checks the moments' dtype in the optimizer state.)"""
    from flux_nemo.training.optim import megatron_optimizer_config

    with pytest.raises(ValueError, match="Adam moments in bf16 need the precision-aware optimizer"):
        megatron_optimizer_config(1e-4, torch.bfloat16, True, moments_dtype="bf16")
    with pytest.raises(ValueError, match=r"Adam moments dtype 'fp16'; expected one of \['fp32', 'bf16'\]"):
        megatron_optimizer_config(1e-4, torch.bfloat16, True, precision_aware=True, moments_dtype="fp16")
    with pytest.raises(
        ValueError, match=r"precision.store_param_remainders=true needs precision.precision_aware"
    ):
        megatron_optimizer_config(1e-4, torch.bfloat16, True, param_remainders=True)
    config = megatron_optimizer_config(1e-4, torch.bfloat16, True)
    assert not config.use_precision_aware_optimizer
    assert config.exp_avg_dtype == config.exp_avg_sq_dtype == config.main_params_dtype == torch.float32


def test_per_block_groups_split_by_block_with_the_same_hyperparameters(megatron_world):
    """``parallel.optimizer_groups_per_block``: one param group per block in model order, then the rest; the groups
    differ only in their index (the update is the same as with one group)."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from flux_nemo.model import FluxConfig, build_flux
    from flux_nemo.training.optim import GROUP_KEY, per_block_overrides

    flux = build_flux(
        FluxConfig.from_flavor("tiny", num_double_blocks=2, num_single_blocks=11), backend="local"
    )
    chunk = torch.nn.ModuleDict({"module": flux})  # names as under Megatron DDP: "module.double_blocks.0...."
    groups = _get_param_groups(
        [chunk], OptimizerConfig(lr=1e-3, weight_decay=0.1), per_block_overrides([chunk])
    )
    assert [g[GROUP_KEY] for g in groups] == list(range(14))
    name_of = {p: n for n, p in chunk.named_parameters()}
    prefixes = [
        {n.split(".")[1] + "." + n.split(".")[2] for n in map(name_of.get, g["params"])} for g in groups[:13]
    ]
    assert prefixes == [{f"double_blocks.{i}"} for i in range(2)] + [
        {f"single_blocks.{i}"} for i in range(11)
    ]
    assert [len(g["params"]) for g in groups[:13]] == [
        len(list(b.parameters())) for b in flux.double_blocks
    ] + [
        len(list(b.parameters())) for b in flux.single_blocks
    ]  # single_blocks.1 does not take single_blocks.10's parameters
    rest = {name_of[p] for p in groups[13]["params"]}
    assert rest and not any("_blocks." in n for n in rest)
    assert sum(len(g["params"]) for g in groups) == len(list(flux.parameters()))
    settings = {tuple((k, v) for k, v in sorted(g.items()) if k not in ("params", GROUP_KEY)) for g in groups}
    assert len(settings) == 1  # same wd_mult, lr_mult, max_lr, min_lr, ... in every group
