"""FluxConfig: the Flux.1 DiT hyperparameters on top of Megatron-Core's TransformerConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from flux_nemo.model.recompute import MODULES as RECOMPUTE_MODULES


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, the MLP activation of Flux."""
    return F.gelu(x, approximate="tanh")


@dataclass
class FluxConfig(TransformerConfig):
    """Flux.1 DiT configuration (reference: torchtitan ``FluxModelArgs``, BFL ``FluxParams``).

    The derived Megatron fields are filled in from the Flux fields: ``num_layers`` is
    ``num_double_blocks + num_single_blocks``, ``ffn_hidden_size`` is ``hidden_size * mlp_ratio`` and
    ``kv_channels`` is the head dim. Leave them unset; a conflicting value raises.

    Parallelism (Megatron fields): ``tensor_model_parallel_size``, ``context_parallel_size`` and
    ``sequence_parallel`` (Megatron sequence parallelism, needs tensor parallelism; with context parallelism too:
    ``flux_nemo.model.sequence_parallel``). Pipeline parallelism is rejected.
    """

    ##################
    # Flux architecture
    ##################
    in_channels: int = 64
    """Channels of a packed latent token (16 latent channels x a 2x2 patch); also the output width."""

    vec_in_dim: int = 768
    """Width of the pooled conditioning vector (CLIP ViT-L/14 pooled output)."""

    context_in_dim: int = 4096
    """Width of the text tokens (T5-XXL hidden states)."""

    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``hidden_size``."""

    num_double_blocks: int = 19
    """Number of double-stream (MMDiT) blocks, with separate image and text weights."""

    num_single_blocks: int = 38
    """Number of single-stream blocks over the joint text + image sequence."""

    axes_dim: tuple[int, ...] = (16, 56, 56)
    """RoPE dims per position axis (id columns); must sum to the head dim. Each axis uses its own frequencies."""

    theta: int = 10_000
    """RoPE base."""

    qkv_bias: bool = True
    """Whether the QKV projections have a bias."""

    guidance_embed: bool = False
    """Guidance embedding (Flux.1-dev). Flux.1-schnell and the MLPerf reference have none; must be False."""

    modulation_fusion: bool = False
    """Run the blocks' LayerNorm + adaLN modulate and gated residual adds as fused ``torch.compile`` kernels
    (``flux_nemo.model.fusions``) instead of one eager kernel per op. Same math; a performance switch."""

    qk_norm_rope_fusion: bool = False
    """Take each attention's QKV projection to q, k and v in one ``torch.compile``'d op
    (``flux_nemo.model.fusions.qkv_norm_rope``, ``joint_qkv_norm_rope``): the QKV split, the QK RMSNorm + RoPE, and
    in the double blocks the text + image concatenation, instead of the spec's norm modules and RoPE function and
    eager copies. Same math and roundings, same parameters; a performance switch."""

    ##################
    # Megatron fields with Flux defaults
    ##################
    hidden_size: int = 3072
    """Transformer width."""

    num_attention_heads: int = 24
    """Attention heads."""

    hidden_dropout: float = 0.0
    """Flux uses no dropout."""

    attention_dropout: float = 0.0
    """Flux uses no attention dropout."""

    normalization: str = "RMSNorm"
    """The only learnable norm in Flux is the QK RMSNorm (its LayerNorms have no affine parameters)."""

    qk_layernorm: bool = True
    """Flux normalises q and k per head. Megatron's ``finalize_model_grads`` reads this flag to sum the QK-norm
    weight gradients over tensor-parallel ranks (each rank normalises only its own heads)."""

    layernorm_epsilon: float = 1e-6
    """Epsilon of the (non-affine) LayerNorms before modulation."""

    activation_func: Callable = gelu_tanh
    """MLP activation: GELU, tanh approximation."""

    rotary_interleaved: bool = True
    """RoPE rotates interleaved pairs (2k, 2k+1), as BFL does (not rotate-half)."""

    use_cpu_initialization: bool = field(default_factory=lambda: not torch.cuda.is_available())
    """Allocate parameters under the caller's device context (CPU or meta) rather than on the current GPU.
    Defaults to True when CUDA is unavailable."""

    def __post_init__(self) -> None:
        self._derive_megatron_fields()
        # Before Megatron's own check, whose message does not name the field.
        if self.sequence_parallel and self.tensor_model_parallel_size <= 1:
            raise ValueError(
                "FluxConfig.sequence_parallel needs tensor_model_parallel_size > 1 (it splits the tokens over the "
                f"tensor-parallel ranks), got tensor_model_parallel_size={self.tensor_model_parallel_size}"
            )
        self._check_recompute()  # before Megatron's checks, which assert on other module names
        super().__post_init__()
        self._validate()

    def _check_recompute(self) -> None:
        """Selective recompute (``flux_nemo.model.recompute``) with the Megatron module names Flux implements.

        Megatron-Core 0.16.1 accepts ``recompute_granularity`` None | "full" | "selective" and, for "selective",
        ``recompute_modules`` from {core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts}
        (default ``["core_attn"]``). Flux has no MoE or MLA, and whole-block ("full") recompute is applied by the
        training block runner (``parallel.recompute=block``), not through this config.
        """
        if self.recompute_granularity not in (None, "selective"):
            raise ValueError(
                f"FluxConfig.recompute_granularity must be None or 'selective', got {self.recompute_granularity!r} "
                "(whole-block recompute is the training block runner's parallel.recompute=block)"
            )
        if self.recompute_granularity == "selective":
            modules = ["core_attn"] if self.recompute_modules is None else list(self.recompute_modules)
            unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
            if unknown:
                raise ValueError(
                    f"FluxConfig.recompute_modules {unknown} not supported; choose from {list(RECOMPUTE_MODULES)}"
                )
            self.recompute_modules = modules

    def _derive_megatron_fields(self) -> None:
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ValueError(
                f"FluxConfig.hidden_size ({self.hidden_size}) and num_attention_heads ({self.num_attention_heads}) "
                "must be positive"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"FluxConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (
            min(self.num_double_blocks, self.num_single_blocks) < 0
            or self.num_double_blocks + self.num_single_blocks < 1
        ):
            raise ValueError(
                f"FluxConfig.num_double_blocks ({self.num_double_blocks}) and num_single_blocks "
                f"({self.num_single_blocks}) must be >= 0 with at least one block"
            )
        ffn = self.hidden_size * self.mlp_ratio
        if ffn != int(ffn):
            raise ValueError(
                f"FluxConfig.mlp_ratio ({self.mlp_ratio}) times hidden_size must be an integer, got {ffn}"
            )
        derived = {
            "num_layers": self.num_double_blocks + self.num_single_blocks,
            "ffn_hidden_size": int(ffn),
            "kv_channels": self.hidden_size // self.num_attention_heads,
        }
        unset = {"num_layers": 0, "ffn_hidden_size": None, "kv_channels": None}
        for name, value in derived.items():
            current = getattr(self, name)
            if current != unset[name] and current != value:
                raise ValueError(
                    f"FluxConfig.{name} ({current}) is derived from the Flux fields and must be {value}; leave it unset"
                )
            setattr(self, name, value)

    def _validate(self) -> None:
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        checks = [
            (
                self.guidance_embed,
                "guidance_embed",
                "must be False: Flux.1-schnell has no guidance embedding",
            ),
            (
                sum(self.axes_dim) != self.kv_channels,
                "axes_dim",
                f"{self.axes_dim} must sum to the head dim hidden_size / num_attention_heads = {self.kv_channels}",
            ),
            (any(d <= 0 or d % 2 for d in self.axes_dim), "axes_dim", "entries must be positive and even"),
            (
                self.hidden_size % self.tensor_model_parallel_size != 0,
                "hidden_size",
                f"({self.hidden_size}) must be divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size})",
            ),
            (
                self.ffn_hidden_size % self.tensor_model_parallel_size != 0,
                "ffn_hidden_size",
                f"({self.ffn_hidden_size}) must be divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size})",
            ),
            (
                self.num_query_groups != self.num_attention_heads,
                "num_query_groups",
                "must equal num_attention_heads (Flux uses multi-head attention)",
            ),
            (self.normalization != "RMSNorm", "normalization", "must be 'RMSNorm' (the QK norm)"),
            (self.gated_linear_unit, "gated_linear_unit", "must be False (Flux MLPs are not gated)"),
            (
                self.pipeline_model_parallel_size != 1,
                "pipeline_model_parallel_size",
                "must be 1: the Flux model is not pipeline-parallel",
            ),
            (
                min(self.in_channels, self.vec_in_dim, self.context_in_dim) <= 0,
                "in_channels",
                "vec_in_dim and context_in_dim must be > 0",
            ),
        ]
        for failed, name, message in checks:
            if failed:
                raise ValueError(f"FluxConfig.{name} {message}")

    @property
    def head_dim(self) -> int:
        """Attention head dim (``kv_channels``)."""
        return self.kv_channels

    @classmethod
    def from_flavor(cls, flavor: str, **overrides: Any) -> FluxConfig:
        """Build a named flavor (``"schnell"`` or ``"tiny"``), with any field overridden.

        Raises:
            ValueError: on an unknown flavor or override key.
        """
        if flavor not in FLAVORS:
            raise ValueError(f"unknown Flux flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
        _check_field_names(overrides, f"FluxConfig.from_flavor({flavor!r})")
        return cls(**{**FLAVORS[flavor], **overrides})

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> FluxConfig:
        """Build from the ``config.json`` of a diffusers ``FluxTransformer2DModel``.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are ignored; any other key this
        model does not understand raises, since it might change the architecture.
        """
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(cfg) - _DIFFUSERS_KEYS)
        if unknown:
            raise ValueError(f"unsupported diffusers FluxTransformer2DModel config keys: {unknown}")
        if cfg.get("guidance_embeds", False):
            raise ValueError("diffusers guidance_embeds=True (Flux.1-dev) is not supported: schnell has none")
        in_channels = cfg.get("in_channels", 64)
        out_channels = cfg.get("out_channels") or in_channels
        if out_channels != in_channels:
            raise ValueError(
                f"diffusers out_channels ({out_channels}) must equal in_channels ({in_channels})"
            )
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"diffusers patch_size must be 1 (latents come packed), got {cfg['patch_size']}")
        heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
        fields = dict(
            in_channels=in_channels,
            vec_in_dim=cfg.get("pooled_projection_dim", 768),
            context_in_dim=cfg.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim,
            num_attention_heads=heads,
            num_double_blocks=cfg.get("num_layers", 19),
            num_single_blocks=cfg.get("num_single_layers", 38),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
        )
        _check_field_names(overrides, "FluxConfig.from_diffusers_config")
        return cls(**{**fields, **overrides})


_DIFFUSERS_KEYS = {
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
}

FLAVORS: dict[str, dict[str, Any]] = {
    # Flux.1-schnell as trained by the MLPerf reference (torchtitan "flux-schnell"): 11,891,178,560 params.
    "schnell": dict(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_attention_heads=24,
        num_double_blocks=19,
        num_single_blocks=38,
        axes_dim=(16, 56, 56),
        theta=10_000,
        qkv_bias=True,
    ),
    # Same input widths and head dim (so the same data and RoPE), tiny width and depth: for tests and smoke runs.
    "tiny": dict(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=256,
        mlp_ratio=4.0,
        num_attention_heads=2,
        num_double_blocks=2,
        num_single_blocks=2,
        axes_dim=(16, 56, 56),
        theta=10_000,
        qkv_bias=True,
    ),
}


def _check_field_names(overrides: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(FluxConfig)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"{where}: unknown FluxConfig field {key!r}")
