"""``modulation_fusion`` and ``qk_norm_rope_fusion``: the torch.compile'd block elementwise ops and QK norm + RoPE
compute what the eager ops and modules compute."""

import pytest
import torch
from flux_testing import make_inputs, randomize_

from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.model.attention import QK_NORM_EPS, RMSNorm
from flux_nemo.model.embeddings import apply_interleaved_rope, rope_cos_sin, rope_frequencies
from flux_nemo.model.fusions import (
    EAGER,
    elementwise_ops,
    fused_joint_qkv_norm_rope,
    fused_ops,
    fused_qkv_norm_rope,
    joint_qkv_norm_rope,
    qkv_norm_rope,
)


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


def qkv_case(dtype: torch.dtype, seq: int, seed: int):
    """A QKV projection ``[seq, 2, 3, 3 * hn]``, two QK norm modules with random weights, and RoPE angles."""
    config = FluxConfig.from_flavor("tiny")
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(seq, 2, 3, 3 * config.head_dim, generator=gen).to(dtype)
    norms = [RMSNorm(config, config.head_dim, eps=QK_NORM_EPS) for _ in range(2)]
    for norm in norms:
        norm.weight.data = torch.rand(config.head_dim, generator=gen, dtype=norm.weight.dtype) + 0.5
    pe = rope_frequencies(torch.randint(0, 64, (1, seq, 3), generator=gen), config.axes_dim, config.theta)
    return mixed, norms, pe


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_qkv_norm_rope_rounds_like_the_norm_modules_then_rope(megatron_world, dtype):
    """The function behind ``qk_norm_rope_fusion`` in the single blocks (eager here) is bitwise the module path:
    the per-head split of Megatron's QKV layout, RMSNorm in fp32 rounded to the input dtype, then RoPE in fp32
    rounded again; v unchanged. All three come out contiguous, as the core attention takes them."""
    mixed, norms, pe = qkv_case(dtype, 12, 0)
    bias = torch.randn(mixed.shape[-2:], generator=torch.Generator().manual_seed(4)).to(dtype).flatten()
    weights = (norms[0].weight, norms[1].weight)
    fused = qkv_norm_rope(mixed, bias, *weights, *rope_cos_sin(pe, dtype), QK_NORM_EPS)
    assert not torch.equal(fused[2], mixed.chunk(3, dim=-1)[2])  # the bias is added
    mixed = mixed + bias.view(mixed.shape[-2:])  # what a linear that adds its own bias gives
    assert all(
        map(torch.equal, qkv_norm_rope(mixed, None, *weights, *rope_cos_sin(pe, dtype), QK_NORM_EPS), fused)
    )
    q, k, v = mixed.chunk(3, dim=-1)
    expected = (apply_interleaved_rope(norms[0](q), pe), apply_interleaved_rope(norms[1](k), pe), v)
    for out, want in zip(fused, expected, strict=True):
        assert out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, want)


def test_joint_qkv_norm_rope_joins_the_streams_text_first(megatron_world):
    """The double blocks' op: each stream with its own norm weights and its own end of the joint angles (text
    first), concatenated along the sequence."""
    txt, txt_norms, _ = qkv_case(torch.bfloat16, 5, 1)
    img, img_norms, _ = qkv_case(torch.bfloat16, 7, 2)
    _, _, pe = qkv_case(torch.bfloat16, 12, 3)
    cos, sin = rope_cos_sin(pe, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    txt_bias, img_bias = (
        torch.randn(txt.shape[-2] * txt.shape[-1], generator=gen).bfloat16() for _ in range(2)
    )
    joint = joint_qkv_norm_rope(
        txt, txt_bias, *(n.weight for n in txt_norms), img, img_bias, *(n.weight for n in img_norms), cos, sin,
        QK_NORM_EPS,
    )  # fmt: skip
    each_txt = qkv_norm_rope(txt, txt_bias, *(n.weight for n in txt_norms), cos[:5], sin[:5], QK_NORM_EPS)
    each_img = qkv_norm_rope(img, img_bias, *(n.weight for n in img_norms), cos[5:], sin[5:], QK_NORM_EPS)
    for out, t, i in zip(joint, each_txt, each_img, strict=True):
        assert out.shape == (12, 2, 3, t.shape[-1])
        assert torch.equal(out, torch.cat([t, i]))


def test_qk_norm_rope_fusion_selects_the_fused_ops(megatron_world):
    model = build_flux(FluxConfig.from_flavor("tiny", qk_norm_rope_fusion=True), backend="local")
    assert all(b.self_attention.fused_norm_rope is fused_joint_qkv_norm_rope() for b in model.double_blocks)
    assert all(b.self_attention.fused_norm_rope is fused_qkv_norm_rope() for b in model.single_blocks)
    plain = build_flux(FluxConfig.from_flavor("tiny"), backend="local")
    assert all(b.self_attention.fused_norm_rope is None for b in [*plain.double_blocks, *plain.single_blocks])


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


@pytest.mark.slow  # CPU compilations of the joint QKV op (static, then dynamic shapes)
def test_fused_joint_qkv_op_serves_many_stream_lengths_without_hitting_the_recompile_limit(megatron_world):
    """Text and image lengths vary independently (train and eval batches, context and sequence parallel shards)."""
    fused = fused_joint_qkv_norm_rope()
    with torch.no_grad():
        for n_txt, n_img in [(2 + i, 3 + (5 * i) % 7) for i in range(10)]:
            txt, txt_norms, _ = qkv_case(torch.float32, n_txt, 1)
            img, img_norms, _ = qkv_case(torch.float32, n_img, 2)
            _, _, pe = qkv_case(torch.float32, n_txt + n_img, 3)
            args = (txt, None, *(n.weight for n in txt_norms), img, None, *(n.weight for n in img_norms))
            cos_sin = rope_cos_sin(pe, torch.float32)
            for out, want in zip(
                fused(*args, *cos_sin, QK_NORM_EPS),
                joint_qkv_norm_rope(*args, *cos_sin, QK_NORM_EPS),
                strict=True,
            ):
                torch.testing.assert_close(out, want)


def test_modulation_fusion_moves_the_fc1_bias_into_the_fused_gelu(megatron_world):
    """With the flag, fc1 returns its bias (``skip_bias_add``) to the compiled bias + GELU op; without it (or with
    another activation) fc1 adds it itself and the activation runs plainly."""
    fused = build_flux(FluxConfig.from_flavor("tiny", modulation_fusion=True), backend="local")
    mlps = [fused.double_blocks[0].img_mlp, fused.single_blocks[0].mlp]
    assert all(m.fused_bias_gelu is fused_ops().bias_gelu and m.linear_fc1.skip_bias_add for m in mlps)
    plain = build_flux(FluxConfig.from_flavor("tiny"), backend="local")
    assert plain.single_blocks[0].mlp.fused_bias_gelu is None
    assert not plain.single_blocks[0].mlp.linear_fc1.skip_bias_add
    relu = build_flux(
        FluxConfig.from_flavor("tiny", modulation_fusion=True, activation_func=torch.relu), "local"
    )
    assert relu.single_blocks[0].mlp.fused_bias_gelu is None
