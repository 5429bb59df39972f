"""The whole model against a direct, BFL-shaped implementation of the reference forward (float64).

The reference below is written from reference.md section 2.2 with plain tensor ops: BFL's fused single-block
``linear1`` / ``linear2`` (rebuilt by concatenating our split weights), 2x2 RoPE rotation matrices, an explicit
softmax attention and an explicit RMSNorm. Weights are random so every gate, bias and the final layer matter.
"""

import math

import torch
import torch.nn.functional as F
from flux_testing import make_inputs

EPS_QK = torch.finfo(torch.float32).eps  # torch.nn.RMSNorm(eps=None) as the reference runs it (fp32)


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS_QK) * weight


def layer_norm(x):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-6)


def rope_matrices(ids, axes_dim, theta):
    """[b, s, head_dim/2, 2, 2] rotations; each axis with its own frequencies."""
    out = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = ids[..., i, None].double() * omega
        cos, sin = angle.cos(), angle.sin()
        out.append(torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2))
    return torch.cat(out, dim=-3)


def attention(q, k, v, pe):
    """q, k, v [b, heads, s, d]: interleaved-pair RoPE on q and k, then unmasked softmax attention."""

    def rope(x):
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[:, None, ..., 0] * pairs[..., 0] + pe[:, None, ..., 1] * pairs[..., 1]).reshape(x.shape)

    q, k = rope(q), rope(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)  # [b, s, heads * d]


def split_heads(qkv, heads):
    """Megatron per-head rows [q_h, k_h, v_h] -> q, k, v [b, heads, s, d]."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, heads, 3, -1).permute(3, 0, 2, 1, 4)
    return q, k, v


def modulation(sd, name, vec, n):
    return linear(sd, name, F.silu(vec))[:, None, :].chunk(n, dim=-1)


def double_block(sd, p, img, txt, vec, pe, heads):
    mods = {s: modulation(sd, f"{p}{s}_mod.linear", vec, 6) for s in ("img", "txt")}
    qkv = {}
    for s, x in (("txt", txt), ("img", img)):
        shift, scale = mods[s][0], mods[s][1]
        q, k, v = split_heads(
            linear(sd, f"{p}self_attention.{s}_linear_qkv", (1 + scale) * layer_norm(x) + shift), heads
        )
        q = rms_norm(q, sd[f"{p}self_attention.{s}_q_layernorm.weight"])
        k = rms_norm(k, sd[f"{p}self_attention.{s}_k_layernorm.weight"])
        qkv[s] = (q, k, v)
    q, k, v = (torch.cat([qkv["txt"][i], qkv["img"][i]], dim=2) for i in range(3))
    attn = attention(q, k, v, pe)
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
    out = {}
    for s, x, a in (("img", img, img_attn), ("txt", txt, txt_attn)):
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[s]
        x = x + gate1 * linear(sd, f"{p}self_attention.{s}_linear_proj", a)
        hidden = F.gelu(
            linear(sd, f"{p}{s}_mlp.linear_fc1", (1 + scale2) * layer_norm(x) + shift2), approximate="tanh"
        )
        out[s] = x + gate2 * linear(sd, f"{p}{s}_mlp.linear_fc2", hidden)
    return out["img"], out["txt"]


def single_block(sd, p, x, vec, pe, heads, hidden):
    shift, scale, gate = modulation(sd, f"{p}modulation.linear", vec, 3)
    # BFL's fused linear1 = [qkv; mlp_in] and linear2 = [proj | mlp_out] (+ its one bias).
    w1 = torch.cat([sd[f"{p}self_attention.linear_qkv.weight"], sd[f"{p}mlp.linear_fc1.weight"]])
    b1 = torch.cat([sd[f"{p}self_attention.linear_qkv.bias"], sd[f"{p}mlp.linear_fc1.bias"]])
    w2 = torch.cat([sd[f"{p}self_attention.linear_proj.weight"], sd[f"{p}mlp.linear_fc2.weight"]], dim=1)
    qkv, mlp = F.linear((1 + scale) * layer_norm(x) + shift, w1, b1).split(
        [3 * hidden, w1.shape[0] - 3 * hidden], -1
    )
    q, k, v = split_heads(qkv, heads)
    q = rms_norm(q, sd[f"{p}self_attention.q_layernorm.weight"])
    k = rms_norm(k, sd[f"{p}self_attention.k_layernorm.weight"])
    out = F.linear(torch.cat([attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")], -1), w2)
    return x + gate * (out + sd[f"{p}mlp.linear_fc2.bias"])


def timestep_embedding(t, dim=256):
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = 1000 * t[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def reference_forward(sd, config, img, txt, y, timesteps, img_ids, txt_ids):
    heads, hidden = config.num_attention_heads, config.hidden_size
    img, txt = linear(sd, "img_in", img), linear(sd, "txt_in", txt)
    mlp_embed = lambda name, x: linear(sd, f"{name}.out_layer", F.silu(linear(sd, f"{name}.in_layer", x)))  # noqa: E731
    vec = mlp_embed("time_in", timestep_embedding(timesteps)) + mlp_embed("vector_in", y)
    pe = rope_matrices(torch.cat([txt_ids, img_ids], dim=1), config.axes_dim, config.theta)
    for i in range(config.num_double_blocks):
        img, txt = double_block(sd, f"double_blocks.{i}.", img, txt, vec, pe, heads)
    x = torch.cat([txt, img], dim=1)
    for i in range(config.num_single_blocks):
        x = single_block(sd, f"single_blocks.{i}.", x, vec, pe, heads, hidden)
    shift, scale = modulation(sd, "final_layer.adaLN_modulation.linear", vec, 2)
    return linear(sd, "final_layer.linear", (1 + scale) * layer_norm(x[:, txt.shape[1] :]) + shift)


def test_forward_matches_reference_formulas_float64(build):
    model = build(params_dtype=torch.float64, num_attention_heads=3, hidden_size=384)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    inputs = make_inputs(model.config, batch=2, h=3, w=4, txt_len=5, dtype=torch.float64)
    with torch.no_grad():
        out = model(**inputs)
        ref = reference_forward(sd, model.config, **inputs)
    assert out.dtype == torch.float64 and out.shape == ref.shape == (2, 12, 64)
    err = ((out - ref).abs().amax() / ref.abs().amax()).item()
    print(f"max relative error vs reference formulas: {err:.2e}")
    assert err < 1e-10
