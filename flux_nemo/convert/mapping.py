"""State-dict mapping between flux-nemo (Megatron names, docs/DESIGN.md), diffusers and BFL.

Every mapping is a list of rules. A rule ties a group of our keys to a group of the other format's keys and
carries two pure tensor functions, one per direction, that only slice, concatenate and reorder rows or columns,
so a conversion is lossless and a round trip is bit-exact. Only our layout is written out by hand
(:func:`megatron_layout`); the other formats' expected shapes are derived by running their rules on meta tensors,
so the shape checks of every format follow from the same rules that convert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

Tensors = list[torch.Tensor]
EXTRA_STATE_SUFFIX = "_extra_state"


class ConversionError(ValueError):
    """A state dict does not match the layout that its format and config imply."""


@dataclass(frozen=True)
class Dims:
    """The sizes a conversion needs, read from a FluxConfig (or any object with the same fields)."""

    hidden: int
    heads: int
    mlp: int
    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    num_double: int
    num_single: int
    qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config) -> Dims:
        if isinstance(config, Dims):
            return config
        if getattr(config, "guidance_embed", False):
            raise ConversionError("guidance_embed=True is not supported (Flux.1-schnell has no guidance_in)")
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        if hidden % heads:
            raise ConversionError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        mlp = getattr(config, "ffn_hidden_size", None) or int(hidden * config.mlp_ratio)
        return cls(
            hidden=hidden,
            heads=heads,
            mlp=int(mlp),
            in_channels=int(config.in_channels),
            vec_in_dim=int(config.vec_in_dim),
            context_in_dim=int(config.context_in_dim),
            num_double=int(config.num_double_blocks),
            num_single=int(config.num_single_blocks),
            qkv_bias=bool(getattr(config, "qkv_bias", True)),
        )


def megatron_layout(config) -> dict[str, tuple[int, ...]]:
    """Every key of our state dict and its shape (the contract of docs/DESIGN.md, `_extra_state` aside)."""
    d = Dims.from_config(config)
    H, C, mlp, hd = d.hidden, d.in_channels, d.mlp, d.head_dim
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    linear("img_in", H, C)
    linear("txt_in", H, d.context_in_dim)
    linear("time_in.in_layer", H, 256)
    linear("time_in.out_layer", H, H)
    linear("vector_in.in_layer", H, d.vec_in_dim)
    linear("vector_in.out_layer", H, H)
    for i in range(d.num_double):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            linear(f"{p}.{s}_mod.linear", 6 * H, H)
            linear(f"{p}.self_attention.{s}_linear_qkv", 3 * H, H, bias=d.qkv_bias)
            out[f"{p}.self_attention.{s}_q_layernorm.weight"] = (hd,)
            out[f"{p}.self_attention.{s}_k_layernorm.weight"] = (hd,)
            linear(f"{p}.self_attention.{s}_linear_proj", H, H)
            linear(f"{p}.{s}_mlp.linear_fc1", mlp, H)
            linear(f"{p}.{s}_mlp.linear_fc2", H, mlp)
    for i in range(d.num_single):
        p = f"single_blocks.{i}"
        linear(f"{p}.modulation.linear", 3 * H, H)
        linear(f"{p}.self_attention.linear_qkv", 3 * H, H, bias=d.qkv_bias)
        out[f"{p}.self_attention.q_layernorm.weight"] = (hd,)
        out[f"{p}.self_attention.k_layernorm.weight"] = (hd,)
        linear(f"{p}.self_attention.linear_proj", H, H, bias=False)
        linear(f"{p}.mlp.linear_fc1", mlp, H)
        linear(f"{p}.mlp.linear_fc2", H, mlp)
    linear("final_layer.adaLN_modulation.linear", 2 * H, H)
    linear("final_layer.linear", C, H)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tensor transforms (each pair is exactly inverse; outputs never share storage with each other)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _copy(ts: Tensors) -> Tensors:
    return list(ts)


def _swap_halves(ts: Tensors) -> Tensors:
    """(scale, shift) <-> (shift, scale) along rows: its own inverse."""
    (t,) = ts
    half = t.shape[0] // 2
    return [torch.cat([t[half:], t[:half]], dim=0)]


def _blocks_to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [q; k; v] (each heads x head_dim) -> Megatron per-head rows [q_h, k_h, v_h]."""
    rest = t.shape[1:]
    return _fresh(t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest))


def _heads_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return _fresh(t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest))


def _qkv_separate_to_ours(ts: Tensors, heads: int) -> Tensors:
    return [_blocks_to_heads(torch.cat(ts, dim=0), heads)]


def _qkv_ours_to_separate(ts: Tensors, heads: int) -> Tensors:
    return [_fresh(t) for t in _heads_to_blocks(ts[0], heads).chunk(3, dim=0)]


def _qkv_fused_to_ours(ts: Tensors, heads: int) -> Tensors:
    return [_blocks_to_heads(ts[0], heads)]


def _qkv_ours_to_fused(ts: Tensors, heads: int) -> Tensors:
    return [_heads_to_blocks(ts[0], heads)]


def _linear1_to_ours(ts: Tensors, heads: int, hidden: int) -> Tensors:
    """BFL single-block linear1 rows [qkv (3H) | mlp] -> (our per-head linear_qkv, mlp.linear_fc1)."""
    (t,) = ts
    return [_blocks_to_heads(t[: 3 * hidden], heads), _fresh(t[3 * hidden :])]


def _ours_to_linear1(ts: Tensors, heads: int) -> Tensors:
    qkv, fc1 = ts
    return [torch.cat([_heads_to_blocks(qkv, heads), fc1], dim=0)]


def _split_columns(ts: Tensors, first: int) -> Tensors:
    """[attention | mlp] input columns -> (attention linear_proj, mlp linear_fc2)."""
    (t,) = ts
    return [_fresh(t[:, :first]), _fresh(t[:, first:])]


def _cat_columns(ts: Tensors) -> Tensors:
    return [torch.cat(ts, dim=1)]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[[Tensors], Tensors] = _copy
    to_theirs: Callable[[Tensors], Tensors] = _copy


def _copy_linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [Rule((f"{ours}.{n}",), (f"{theirs}.{n}",)) for n in names]


# ---------------------------------------------------------------------------------------------------------------
# Rules per format


def _require_qkv_bias(d: Dims, why: str) -> None:
    if not d.qkv_bias:
        raise ConversionError(f"qkv_bias=False cannot be converted: {why}")


def diffusers_rules(config) -> list[Rule]:
    d = Dims.from_config(config)
    _require_qkv_bias(d, "diffusers Flux always has q/k/v biases")
    to_ours_qkv = partial(_qkv_separate_to_ours, heads=d.heads)
    to_theirs_qkv = partial(_qkv_ours_to_separate, heads=d.heads)
    rules = [
        *_copy_linear("img_in", "x_embedder"),
        *_copy_linear("txt_in", "context_embedder"),
        *_copy_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *_copy_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *_copy_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *_copy_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ]
    for i in range(d.num_double):
        p, q = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for s, norm, proj, qn, kn, out, ff in (
            ("img", "norm1", "to_{}", "norm_q", "norm_k", "to_out.0", "ff"),
            (
                "txt",
                "norm1_context",
                "add_{}_proj",
                "norm_added_q",
                "norm_added_k",
                "to_add_out",
                "ff_context",
            ),
        ):
            rules += _copy_linear(f"{p}.{s}_mod.linear", f"{q}.{norm}.linear")
            for n in ("weight", "bias"):
                theirs = tuple(f"{q}.attn.{proj.format(x)}.{n}" for x in "qkv")
                rules.append(
                    Rule((f"{p}.self_attention.{s}_linear_qkv.{n}",), theirs, to_ours_qkv, to_theirs_qkv)
                )
            rules.append(Rule((f"{p}.self_attention.{s}_q_layernorm.weight",), (f"{q}.attn.{qn}.weight",)))
            rules.append(Rule((f"{p}.self_attention.{s}_k_layernorm.weight",), (f"{q}.attn.{kn}.weight",)))
            rules += _copy_linear(f"{p}.self_attention.{s}_linear_proj", f"{q}.attn.{out}")
            rules += _copy_linear(f"{p}.{s}_mlp.linear_fc1", f"{q}.{ff}.net.0.proj")
            rules += _copy_linear(f"{p}.{s}_mlp.linear_fc2", f"{q}.{ff}.net.2")
    for i in range(d.num_single):
        p, q = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rules += _copy_linear(f"{p}.modulation.linear", f"{q}.norm.linear")
        for n in ("weight", "bias"):
            theirs = tuple(f"{q}.attn.to_{x}.{n}" for x in "qkv")
            rules.append(Rule((f"{p}.self_attention.linear_qkv.{n}",), theirs, to_ours_qkv, to_theirs_qkv))
        rules.append(Rule((f"{p}.self_attention.q_layernorm.weight",), (f"{q}.attn.norm_q.weight",)))
        rules.append(Rule((f"{p}.self_attention.k_layernorm.weight",), (f"{q}.attn.norm_k.weight",)))
        rules += _copy_linear(f"{p}.mlp.linear_fc1", f"{q}.proj_mlp")
        ours = (f"{p}.self_attention.linear_proj.weight", f"{p}.mlp.linear_fc2.weight")
        rules.append(
            Rule(ours, (f"{q}.proj_out.weight",), partial(_split_columns, first=d.hidden), _cat_columns)
        )
        rules.append(Rule((f"{p}.mlp.linear_fc2.bias",), (f"{q}.proj_out.bias",)))
    for n in ("weight", "bias"):
        rules.append(
            Rule(
                (f"final_layer.adaLN_modulation.linear.{n}",),
                (f"norm_out.linear.{n}",),
                _swap_halves,
                _swap_halves,
            )
        )
    rules += _copy_linear("final_layer.linear", "proj_out")
    return rules


def bfl_rules(config) -> list[Rule]:
    d = Dims.from_config(config)
    _require_qkv_bias(d, "BFL single blocks always have a linear1 bias, q/k/v part included")
    to_ours_qkv = partial(_qkv_fused_to_ours, heads=d.heads)
    to_theirs_qkv = partial(_qkv_ours_to_fused, heads=d.heads)
    rules = [
        *_copy_linear("img_in", "img_in"),
        *_copy_linear("txt_in", "txt_in"),
        *_copy_linear("time_in.in_layer", "time_in.in_layer"),
        *_copy_linear("time_in.out_layer", "time_in.out_layer"),
        *_copy_linear("vector_in.in_layer", "vector_in.in_layer"),
        *_copy_linear("vector_in.out_layer", "vector_in.out_layer"),
    ]
    for i in range(d.num_double):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            rules += _copy_linear(f"{p}.{s}_mod.linear", f"{p}.{s}_mod.lin")
            for n in ("weight", "bias"):
                ours, theirs = f"{p}.self_attention.{s}_linear_qkv.{n}", f"{p}.{s}_attn.qkv.{n}"
                rules.append(Rule((ours,), (theirs,), to_ours_qkv, to_theirs_qkv))
            for x, name in (("q", "query"), ("k", "key")):
                ours = f"{p}.self_attention.{s}_{x}_layernorm.weight"
                rules.append(Rule((ours,), (f"{p}.{s}_attn.norm.{name}_norm.scale",)))
            rules += _copy_linear(f"{p}.self_attention.{s}_linear_proj", f"{p}.{s}_attn.proj")
            rules += _copy_linear(f"{p}.{s}_mlp.linear_fc1", f"{p}.{s}_mlp.0")
            rules += _copy_linear(f"{p}.{s}_mlp.linear_fc2", f"{p}.{s}_mlp.2")
    for i in range(d.num_single):
        p = f"single_blocks.{i}"
        rules += _copy_linear(f"{p}.modulation.linear", f"{p}.modulation.lin")
        to_ours_l1 = partial(_linear1_to_ours, heads=d.heads, hidden=d.hidden)
        to_theirs_l1 = partial(_ours_to_linear1, heads=d.heads)
        for n in ("weight", "bias"):
            ours = (f"{p}.self_attention.linear_qkv.{n}", f"{p}.mlp.linear_fc1.{n}")
            rules.append(Rule(ours, (f"{p}.linear1.{n}",), to_ours_l1, to_theirs_l1))
        for x, name in (("q", "query"), ("k", "key")):
            rules.append(
                Rule((f"{p}.self_attention.{x}_layernorm.weight",), (f"{p}.norm.{name}_norm.scale",))
            )
        ours = (f"{p}.self_attention.linear_proj.weight", f"{p}.mlp.linear_fc2.weight")
        rules.append(
            Rule(ours, (f"{p}.linear2.weight",), partial(_split_columns, first=d.hidden), _cat_columns)
        )
        rules.append(Rule((f"{p}.mlp.linear_fc2.bias",), (f"{p}.linear2.bias",)))
    rules += _copy_linear("final_layer.adaLN_modulation.linear", "final_layer.adaLN_modulation.1")
    rules += _copy_linear("final_layer.linear", "final_layer.linear")
    return rules


# ---------------------------------------------------------------------------------------------------------------
# Checks and the generic conversion


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_state_dict(
    sd: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise ConversionError naming every unexpected key, missing key and shape mismatch (`_extra_state` ignored)."""
    keys = {k for k in sd if not k.endswith(EXTRA_STATE_SUFFIX)}
    problems = []
    unexpected = sorted(keys - layout.keys())
    missing = sorted(layout.keys() - keys)
    if unexpected:
        problems.append("unexpected key(s): " + ", ".join(unexpected))
    if missing:
        problems.append("missing key(s): " + ", ".join(missing))
    for k in sorted(keys & layout.keys()):
        actual = tuple(sd[k].shape)
        if actual != tuple(layout[k]):
            problems.append(f"shape mismatch for key {k}: expected {_fmt(layout[k])}, got {_fmt(actual)}")
    if problems:
        raise ConversionError(f"{what} state dict does not match its config:\n  " + "\n  ".join(problems))


def _apply(sd: Mapping[str, torch.Tensor], rules: list[Rule], forward: bool) -> dict[str, torch.Tensor]:
    """forward: ours -> theirs; else theirs -> ours. Every source key is used by exactly one rule."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        src, dst, fn = (r.ours, r.theirs, r.to_theirs) if forward else (r.theirs, r.ours, r.to_ours)
        results = fn([sd[k] for k in src])
        if len(results) != len(dst):
            raise AssertionError(f"rule {src} -> {dst} produced {len(results)} tensors")
        for k, t in zip(dst, results, strict=True):
            if k in out:
                raise AssertionError(f"two rules write {k}")
            out[k] = t
    return out


def derived_layout(
    rules: list[Rule], ours_layout: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The other format's expected shapes: our layout pushed through the rules on meta tensors."""
    meta = {k: torch.empty(s, device="meta") for k, s in ours_layout.items()}
    return {k: tuple(v.shape) for k, v in _apply(meta, rules, forward=True).items()}


def _to_ours(sd, config, rules_fn, what: str) -> dict[str, torch.Tensor]:
    layout = megatron_layout(config)
    rules = rules_fn(config)
    check_state_dict(sd, derived_layout(rules, layout), what)
    out = _apply(sd, rules, forward=False)
    check_state_dict(out, layout, f"converted ({what} -> flux-nemo)")
    return out


def _from_ours(sd, config, rules_fn, what: str) -> dict[str, torch.Tensor]:
    layout = megatron_layout(config)
    rules = rules_fn(config)
    check_state_dict(sd, layout, "flux-nemo")
    out = _apply(sd, rules, forward=True)
    check_state_dict(out, derived_layout(rules, layout), f"converted (flux-nemo -> {what})")
    return out


def diffusers_to_megatron(sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> ours (QKV interleave, proj_out split, norm_out swap)."""
    return _to_ours(sd, config, diffusers_rules, "diffusers")


def megatron_to_diffusers(sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Ours -> diffusers FluxTransformer2DModel state dict (exact inverse of diffusers_to_megatron)."""
    return _from_ours(sd, config, diffusers_rules, "diffusers")


def bfl_to_megatron(sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """BFL (flux1-schnell.safetensors) state dict -> ours (QKV block->per-head, linear1/linear2 split)."""
    return _to_ours(sd, config, bfl_rules, "BFL")


def megatron_to_bfl(sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Ours -> BFL state dict (exact inverse of bfl_to_megatron)."""
    return _from_ours(sd, config, bfl_rules, "BFL")
