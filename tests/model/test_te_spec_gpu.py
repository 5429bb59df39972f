"""The ``te`` spec computes what the ``local`` spec computes (GPU, Transformer Engine, bf16).

Both backends get the same weights (the state-dict contract is backend-independent, ``_extra_state`` aside);
forward outputs and every parameter gradient must agree within bf16 tolerance. Relative errors are printed.
"""

import pytest
import torch
from flux_testing import make_inputs, randomize_

from flux_nemo.model import FluxConfig, build_flux

pytestmark = pytest.mark.gpu

# bf16 with different kernels (TE GEMMs, fused attention and RoPE vs torch) through 4 blocks; a layout or
# formula mismatch shows as O(1). Tighten once measured numbers are known.
OUT_TOL = 5e-2  # relative max error of the output
GRAD_TOL = 1e-1  # relative L2 error of each parameter gradient


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def models(megatron_world):
    pytest.importorskip("transformer_engine")
    config = FluxConfig.from_flavor("tiny", params_dtype=torch.bfloat16, bf16=True)
    torch.manual_seed(0)
    local = randomize_(build_flux(config, backend="local"), seed=0)
    te = build_flux(config, backend="te")
    # Same weights; TE keeps its own (FP8 metadata) extra state. strict: the names must match exactly.
    te_extra = {k: v for k, v in te.state_dict().items() if k.endswith("_extra_state")}
    te.load_state_dict(weights(local) | te_extra, strict=True)
    return local.cuda(), te.cuda()


def test_same_parameter_names_and_shapes(models):
    local, te = models
    assert {k: v.shape for k, v in weights(local).items()} == {k: v.shape for k, v in weights(te).items()}


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().amax() / b.float().abs().amax()).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# Ids shared over the batch (batch 1) take TE's fused RoPE; per-sample ids take the torch RoPE.
@pytest.mark.parametrize("shared_ids", [True, False])
def test_forward_and_gradients_match_local(models, shared_ids):
    local, te = models
    inputs = {k: v.cuda() for k, v in make_inputs(local.config, batch=2, h=16, w=16, txt_len=256).items()}
    if shared_ids:
        inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][:1], inputs["txt_ids"][:1]
    probe = torch.randn(2, 256, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    outputs = []
    for model in (local, te):
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        (out.float() * probe).sum().backward()
        outputs.append(out)
    out_err = rel_max(outputs[1], outputs[0])
    print(f"shared_ids={shared_ids}: output relative max error {out_err:.3e}")
    assert out_err < OUT_TOL

    te_params = dict(te.named_parameters())
    grad_errs = {n: rel_l2(te_params[n].grad, p.grad) for n, p in local.named_parameters()}
    worst = sorted(grad_errs.items(), key=lambda kv: -kv[1])[:5]
    print("worst gradient relative L2 errors:", ", ".join(f"{n}={e:.3e}" for n, e in worst))
    assert max(grad_errs.values()) < GRAD_TOL, worst


def test_te_fresh_model_outputs_exactly_zero(megatron_world):
    pytest.importorskip("transformer_engine")
    config = FluxConfig.from_flavor("tiny", params_dtype=torch.bfloat16, bf16=True)
    model = build_flux(config, backend="te")
    inputs = {k: v.cuda() for k, v in make_inputs(config, batch=2, h=4, w=4, txt_len=8).items()}
    with torch.no_grad():
        assert torch.count_nonzero(model(**inputs)) == 0


def test_te_schnell_builds_on_meta_with_the_reference_parameter_count(megatron_world):
    pytest.importorskip("transformer_engine")
    # TE takes its device from the config: meta needs init_model_with_meta_device (not CPU initialisation).
    config = FluxConfig.from_flavor("schnell", init_model_with_meta_device=True, use_cpu_initialization=False)
    with torch.device("meta"):
        model = build_flux(config, backend="te")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 11_891_178_560
