"""``modulation_fusion`` and ``qk_norm_rope_fusion``: the torch.compile'd block elementwise ops and QK norm + RoPE
compute what the eager ops and modules compute."""

import pytest
import torch
from flux_testing import make_inputs, randomize_

from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.model.attention import QK_NORM_EPS, RMSNorm
from flux_nemo.model.embeddings import apply_interleaved_rope, rope_cos_sin, rope_frequencies
from flux_nemo.model.fusions import EAGER, elementwise_ops, fused_ops, fused_qk_norm_rope, qk_norm_rope


def forward_backward(config: FluxConfig, backend: str, device: str, h: int, w: int, txt_len: int):
    """Output and parameter gradients of a randomised model (same weights for the same config shape)."""
    torch.manual_seed(0)
    model = randomize_(build_flux(config, backend=backend), seed=0).to(device)
    inputs = {
        k: v.to(device) for k, v in make_inputs(config, 2, h, w, txt_len, dtype=config.params_dtype).items()
    }
    out = model(**inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (out.float() * probe).sum().backward()
    return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_ops_are_selected_by_the_flag(megatron_world):
    assert elementwise_ops(False) is EAGER
    assert elementwise_ops(True) is fused_ops()
    model = build_flux(FluxConfig.from_flavor("tiny", modulation_fusion=True), backend="local")
    assert all(block.ops is fused_ops() for block in [*model.double_blocks, *model.single_blocks])


FUSIONS = [
    {"modulation_fusion": True},
    {"qk_norm_rope_fusion": True},
    {"modulation_fusion": True, "qk_norm_rope_fusion": True},
]


@pytest.mark.slow  # inductor compiles the fused kernels (forward + backward) on CPU: ~20-45 s
@pytest.mark.parametrize("fusion", FUSIONS[:2], ids=lambda f: "+".join(f))
def test_fused_model_matches_eager_on_cpu(megatron_world, fusion):
    """Whole model, fp32. For the QK norm + RoPE this also checks that each stream gets its own angles (text
    first in the joint sequence)."""
    fields = dict(context_in_dim=32, vec_in_dim=16, num_double_blocks=2, num_single_blocks=2)
    eager = forward_backward(FluxConfig.from_flavor("tiny", **fields), "local", "cpu", 4, 4, 8)
    fused = forward_backward(FluxConfig.from_flavor("tiny", **fusion, **fields), "local", "cpu", 4, 4, 8)
    # fp32, one rounding per fused kernel instead of one per op: agreement to fp32 accuracy.
    assert rel_l2(fused[0], eager[0]) < 1e-5
    errors = {n: rel_l2(fused[1][n], g) for n, g in eager[1].items()}
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_qk_norm_rope_rounds_like_the_norm_modules_then_rope(megatron_world, dtype):
    """The function behind ``qk_norm_rope_fusion`` (eager here) is bitwise the module path: RMSNorm in fp32
    rounded to the input dtype, then RoPE in fp32 rounded again."""
    config = FluxConfig.from_flavor("tiny")
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(12, 2, 3, config.head_dim, generator=gen).to(dtype) for _ in range(2))
    norms = [RMSNorm(config, config.head_dim, eps=QK_NORM_EPS) for _ in range(2)]
    for norm in norms:
        norm.weight.data = torch.rand(config.head_dim, generator=gen, dtype=norm.weight.dtype) + 0.5
    ids = torch.randint(0, 64, (1, 12, 3), generator=gen)
    pe = rope_frequencies(ids, config.axes_dim, config.theta)
    fused = qk_norm_rope(q, k, norms[0].weight, norms[1].weight, *rope_cos_sin(pe, dtype), QK_NORM_EPS)
    for out, t, norm in zip(fused, (q, k), norms, strict=True):
        assert out.dtype == dtype
        assert torch.equal(out, apply_interleaved_rope(norm(t), pe))


def test_qk_norm_rope_fusion_selects_the_fused_op(megatron_world):
    model = build_flux(FluxConfig.from_flavor("tiny", qk_norm_rope_fusion=True), backend="local")
    attentions = [b.self_attention for b in [*model.double_blocks, *model.single_blocks]]
    assert all(a.fused_norm_rope is fused_qk_norm_rope() for a in attentions)
    plain = build_flux(FluxConfig.from_flavor("tiny"), backend="local")
    assert all(b.self_attention.fused_norm_rope is None for b in plain.double_blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: "+".join(f))
def test_fused_te_model_matches_eager_te_model(megatron_world, fusion):
    pytest.importorskip("transformer_engine")
    fields = dict(params_dtype=torch.bfloat16, bf16=True)
    eager = forward_backward(FluxConfig.from_flavor("tiny", **fields), "te", "cuda", 16, 16, 256)
    fused = forward_backward(FluxConfig.from_flavor("tiny", **fusion, **fields), "te", "cuda", 16, 16, 256)
    # bf16: the fused kernels round once in fp32 where eager rounds each op to bf16.
    out_err = rel_l2(fused[0], eager[0])
    errors = {n: rel_l2(fused[1][n], g) for n, g in eager[1].items()}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    print(f"{fusion} vs eager (te, bf16): output relative L2 {out_err:.3e}; worst gradients {worst}")
    assert out_err < 2e-2
    assert max(errors.values()) < 5e-2, worst


@pytest.mark.slow  # two CPU compilations (static, then dynamic shapes): ~10-30 s
def test_fused_ops_serve_many_shapes_without_hitting_the_recompile_limit():
    ops = fused_ops()
    with torch.no_grad():
        for seq in range(2, 14):  # 12 sequence lengths (> dynamo's recompile limit of 8)
            x = torch.randn(seq, 2, 16)
            shift, scale = torch.randn(2, 1, 2, 16).unbind(0)
            torch.testing.assert_close(
                ops.norm_modulate(x, shift, scale, 1e-6), EAGER.norm_modulate(x, shift, scale, 1e-6)
            )
