"""``FluxConfig.mlp_fusion``: the MLPs as Transformer Engine fusible operations compute what the TE module path
computes, with the same parameters, and write weight gradients where Megatron's DDP reads them (GPU)."""

import pytest
import torch
from flux_testing import make_inputs, randomize_

from flux_nemo.model import FluxConfig, build_flux

pytestmark = pytest.mark.gpu

# Both paths run the same TE GEMMs; they differ in the GELU kernel and, under FP8, in whether the GELU output is
# rounded to bf16 before it is quantized. A missing bias or a wrong activation shows as O(1).
TOL = {None: (1e-2, 2e-2), "current": (5e-2, 1e-1)}  # (output relative max, gradient relative L2)


def build(mlp_fusion: bool) -> torch.nn.Module:
    config = FluxConfig.from_flavor(
        "tiny",
        params_dtype=torch.bfloat16,
        bf16=True,
        mlp_fusion=mlp_fusion,
        gradient_accumulation_fusion=True,
    )
    torch.manual_seed(0)
    return randomize_(build_flux(config, backend="te"), seed=0).cuda()


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().amax() / b.float().abs().amax()).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def attach_main_grads(model: torch.nn.Module) -> None:
    """What Megatron's DDP gives every parameter: an fp32 ``main_grad`` and the flag TE sets when it wrote it."""
    for p in model.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        p.grad_added_to_main_grad = False


def gradient(p: torch.nn.Parameter) -> torch.Tensor:
    return p.main_grad if p.grad_added_to_main_grad else p.grad


@pytest.fixture(scope="module")
def pair(megatron_world):
    pytest.importorskip("transformer_engine")
    return build(False), build(True)


def test_same_parameters_and_state_dict(pair):
    plain, fused = pair
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert type(fused.double_blocks[0].img_mlp).__name__ == "TEFluxMLP"


@pytest.mark.parametrize("fp8", [None, "current"])
def test_fused_mlp_matches_module_path(pair, fp8):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    plain, fused = pair
    inputs = {k: v.cuda() for k, v in make_inputs(plain.config, batch=2, h=16, w=16, txt_len=256).items()}
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][:1], inputs["txt_ids"][:1]
    probe = torch.randn(2, 256, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fp8_recipe = recipe.Float8CurrentScaling() if fp8 == "current" else None
    outputs = []
    for model in (plain, fused):
        model.zero_grad(set_to_none=True)
        attach_main_grads(model)
        with te.fp8_autocast(enabled=fp8 is not None, fp8_recipe=fp8_recipe):
            out = model(**inputs)
        (out.float() * probe).sum().backward()
        outputs.append(out)
    out_tol, grad_tol = TOL[fp8]
    out_err = rel_max(outputs[1], outputs[0])
    print(f"fp8={fp8}: output relative max error {out_err:.3e}")
    assert out_err < out_tol

    fused_params = dict(fused.named_parameters())
    errs = {n: rel_l2(gradient(fused_params[n]), gradient(p)) for n, p in plain.named_parameters()}
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
    print("worst gradient relative L2 errors:", ", ".join(f"{n}={e:.3e}" for n, e in worst))
    assert max(errs.values()) < grad_tol, worst
    # The fused GEMMs wrote their weight gradients into main_grad, as the module path's TE linears do.
    for name, p in fused_params.items():
        if ".linear_fc1.weight" in name or ".linear_fc2.weight" in name:
            assert p.grad_added_to_main_grad, name
            assert p.main_grad.abs().amax() > 0, name


def test_fused_mlp_runs_the_linears_forward_pre_hooks(pair):
    """Megatron's DDP waits for a module's parameter all-gather in its forward pre-hook; the fused path, which
    never calls fc1 and fc2, runs their hooks itself."""
    _, fused = pair
    mlp = fused.single_blocks[0].mlp
    seen = []
    handles = [
        linear.register_forward_pre_hook(lambda module, args: seen.append(module))
        for linear in (mlp.linear_fc1, mlp.linear_fc2)
    ]
    try:
        mlp(torch.randn(8, 1, fused.config.hidden_size, device="cuda", dtype=torch.bfloat16))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [mlp.linear_fc1, mlp.linear_fc2]
