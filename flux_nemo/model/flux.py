"""The Flux.1 DiT as a Megatron-Core module, and ``build_flux``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import Tensor, nn

from flux_nemo.model import sequence_parallel as sp
from flux_nemo.model.adaln import LastLayer
from flux_nemo.model.blocks import FluxSubmodules
from flux_nemo.model.config import FluxConfig
from flux_nemo.model.embeddings import EmbedND, MLPEmbedder, replicated_linear, timestep_embedding
from flux_nemo.model.init import init_flux_weights
from flux_nemo.model.specs import get_flux_spec
from flux_nemo.shims import ensure_megatron_initialized

# ``block_runner(block, *args)`` runs one block; training code uses it for recompute or an FP8 context. A runner
# with a ``blocks()`` method (a context manager) has it entered once around all blocks of a forward.
BlockRunner = Callable[..., object]


class Conditioning(NamedTuple):
    """The adaLN modulations of a batch: what the blocks and the final layer take from the conditioning vector
    ``vec`` (timestep and pooled text embeddings), each module's ``modulations(vec)``, every tensor ``[b, n*h]``.

    They depend on each sample's timestep and pooled text only, not on its tokens, so a training step can compute
    them once for all its micro-batches (:meth:`Flux.conditioning` on the step's batch) and give each micro-batch its
    rows (:meth:`rows`): the modulation weights (3.2 B of Flux.1's 11.9 B parameters) are then read, and their
    gradients accumulated, once per step instead of once per micro-batch.
    """

    double: tuple[tuple[Tensor, ...], ...]  # per double block: (img, txt)
    single: tuple[tuple[Tensor, ...], ...]  # per single block: (modulation,)
    final: tuple[Tensor, ...]  # the final layer's (modulation,)

    def groups(self) -> list[tuple[Tensor, ...]]:
        """Each module's modulations: the double blocks', the single blocks', then the final layer's."""
        return [*self.double, *self.single, self.final]

    def tensors(self) -> list[Tensor]:
        """Every tensor, in a fixed order (the order :meth:`map` keeps)."""
        return [t for group in self.groups() for t in group]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """The same structure with ``fn`` applied to each tensor."""
        return Conditioning(
            tuple(tuple(map(fn, g)) for g in self.double),
            tuple(tuple(map(fn, g)) for g in self.single),
            tuple(map(fn, self.final)),
        )

    def rows(self, start: int, stop: int) -> Conditioning:
        """The samples ``start:stop`` of the batch."""
        return self.map(lambda t: t[start:stop])


class BlockList(nn.ModuleList):
    """The double or single blocks. Megatron's distributed checkpoint treats a module without
    ``sharded_state_dict`` (a plain ``nn.ModuleList``) as replicated: every tensor-parallel shard inside it would be
    saved as tensor-parallel rank 0's tensor. This list asks each block instead (keys ``{prefix}{i}.…``)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        out = {}
        for i, block in enumerate(self):
            out.update(sharded_state_dict_default(block, f"{prefix}{i}.", sharded_offsets, metadata))
        return out


class Flux(MegatronModule):
    """Flux.1 transformer (BFL ``Flux``): double-stream blocks, then single-stream blocks on ``cat(txt, img)``.

    Args:
        config: the model configuration.
        submodules: block specs (see ``flux_nemo.model.specs``).
        block_runner: optional ``fn(block, *args)`` that runs each block (default: ``block(*args)``); the
            hook for activation recompute, FP8 contexts or CUDA graphs, so those stay out of the model. If it has
            a ``blocks()`` method, the forward enters that context once around all blocks (one FP8 autocast).
            It may also be set later through the ``block_runner`` attribute.
    """

    # Megatron's schedules (forward_backward_func) read this to choose their code path.
    model_type = ModelType.encoder_or_decoder

    def __init__(
        self, config: FluxConfig, submodules: FluxSubmodules, block_runner: BlockRunner | None = None
    ):
        super().__init__(config)
        self.block_runner = block_runner
        if config.sequence_parallel:
            submodules = sp.sequence_parallel_spec(submodules)
        h = config.hidden_size
        self.pe_embedder = EmbedND(config.axes_dim, config.theta)
        self.img_in = replicated_linear(config, config.in_channels, h)
        self.time_in = MLPEmbedder(config, in_dim=256)
        self.vector_in = MLPEmbedder(config, in_dim=config.vec_in_dim)
        self.txt_in = replicated_linear(config, config.context_in_dim, h)
        self.double_blocks = BlockList(
            build_module(submodules.double_block, config=config, layer_number=i + 1)
            for i in range(config.num_double_blocks)
        )
        self.single_blocks = BlockList(
            build_module(
                submodules.single_block, config=config, layer_number=config.num_double_blocks + i + 1
            )
            for i in range(config.num_single_blocks)
        )
        self.final_layer = LastLayer(config)
        if config.sequence_parallel:
            sp.mark_sequence_parallel_params(self.double_blocks)
            sp.mark_sequence_parallel_params(self.single_blocks)

    def conditioning(self, timesteps: Tensor, y: Tensor) -> Conditioning:
        """Every block's and the final layer's adaLN modulations of the conditioning vector: the part of
        :meth:`forward` that depends on the samples' timesteps and pooled text only (see :class:`Conditioning`).
        ``timesteps [b]`` in [0, 1], ``y [b, vec_in_dim]``."""
        return self.modulations(self.conditioning_vector(timesteps, y))

    def conditioning_vector(self, timesteps: Tensor, y: Tensor) -> Tensor:
        """``vec = time_in(timestep embedding) + vector_in(y)``, ``[b, h]``."""
        dtype = self.img_in.weight.dtype  # like the reference, inputs take the parameters' dtype
        return self.time_in(timestep_embedding(timesteps.to(dtype), 256)) + self.vector_in(y.to(dtype))

    def modulations(self, vec: Tensor) -> Conditioning:
        """Each block's and the final layer's ``modulations(vec)``."""
        return Conditioning(
            tuple(block.modulations(vec) for block in self.double_blocks),
            tuple(block.modulations(vec) for block in self.single_blocks),
            self.final_layer.modulations(vec),
        )

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        y: Tensor,
        timesteps: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        conditioning: Conditioning | None = None,
    ) -> Tensor:
        """Predict the flow-matching velocity of the image tokens.

        Args:
            img: packed noisy latents ``[b, s_img, in_channels]``.
            txt: text tokens ``[b, s_txt, context_in_dim]``.
            y: pooled vector ``[b, vec_in_dim]``.
            timesteps: ``[b]`` in [0, 1].
            img_ids: ``[b or 1, s_img, 3]`` (0, row, col) ids; txt_ids: ``[b or 1, s_txt, 3]`` (zeros).
                A batch size of 1 shares one RoPE table over the batch (lets the ``te`` spec use fused RoPE).
            conditioning: ``self.conditioning(timesteps, y)`` computed beforehand (for example the rows of a whole
                training step's); then ``y`` and ``timesteps`` are not read. Default: computed here.

        Returns:
            ``[b, s_img, in_channels]``, the whole sequence on every rank (also with sequence parallelism).

        Raises:
            ValueError: with sequence parallelism, if ``s_img`` or ``s_txt`` is not divisible by the
                tensor-parallel size.
        """
        seq_par = self.config.sequence_parallel
        if seq_par:
            sp.check_divisible(img=img.shape[1], txt=txt.shape[1])
        if conditioning is None:
            conditioning = self.conditioning(timesteps, y)
        # Like the reference, inputs take the parameters' dtype.
        dtype = self.img_in.weight.dtype
        img, txt = img.to(dtype), txt.to(dtype)
        img = self.img_in(img.transpose(0, 1))  # [s_img, b, h]
        txt = self.txt_in(txt.transpose(0, 1))  # [s_txt, b, h]
        pe = self.pe_embedder(_cat_ids(txt_ids, img_ids))  # [s_txt + s_img, b|1, 1, head_dim]
        single_pe = pe
        if seq_par:  # flux_nemo.model.sequence_parallel: each tensor-parallel rank keeps 1/tp of the tokens
            single_pe = sp.single_block_rope(pe, txt.shape[0])  # [txt_0, img_0, txt_1, img_1, ...] order
            img = sp.scatter_tokens(img, self.config)  # [s_img / tp, b, h]
            txt = sp.scatter_tokens(txt, self.config)  # [s_txt / tp, b, h]

        with self.blocks_scope():
            for block, modulations in zip(self.double_blocks, conditioning.double, strict=True):
                img, txt = self.run_block(block, img, txt, *modulations, pe)
            x = torch.cat([txt, img], dim=0)  # [s_txt + s_img, b, h] (sequence parallel: this rank's slices)
            for block, modulations in zip(self.single_blocks, conditioning.single, strict=True):
                x = self.run_block(block, x, *modulations, single_pe)
        img = x[txt.shape[0] :]  # [s_img, b, h]
        if seq_par:
            img = sp.gather_tokens(img)  # [s_img, b, h]: the final layer runs on every token on every rank

        img = self.final_layer(img, *conditioning.final)  # [s_img, b, in_channels]
        return img.transpose(0, 1)  # [b, s_img, in_channels]

    def blocks_scope(self) -> contextlib.AbstractContextManager:
        """The context around all blocks: the runner's ``blocks()`` if it has one, else nothing."""
        blocks = getattr(self.block_runner, "blocks", None)
        return contextlib.nullcontext() if blocks is None else blocks()

    def run_block(self, block: nn.Module, *args: Tensor):
        """Run one block, through ``block_runner`` if set."""
        if self.block_runner is None:
            return block(*args)
        return self.block_runner(block, *args)

    def set_input_tensor(self, input_tensor: list[Tensor | None]) -> None:
        """Megatron's schedules pass each pipeline stage its input here; Flux is a single stage."""
        if any(t is not None for t in input_tensor):
            raise RuntimeError(
                "Flux is not pipeline-parallel: it takes no input tensor from a previous stage"
            )

    def init_weights(self) -> None:
        """Apply the reference initialisation (``flux_nemo.model.init``); a fresh model then outputs 0."""
        init_flux_weights(self)


def _cat_ids(txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """``cat([txt_ids, img_ids], dim=1)``, broadcasting a batch size of 1."""
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    return torch.cat([txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)], dim=1)


def build_flux(config: FluxConfig, backend: str = "local", block_runner: BlockRunner | None = None) -> Flux:
    """Build a Flux model with the ``backend`` spec (``"local"`` or ``"te"``).

    Parameters go where Megatron puts them: under the caller's device context (meta, CPU) when
    ``config.use_cpu_initialization`` (the default without CUDA), on the meta device when
    ``config.init_model_with_meta_device`` (what the ``te`` backend needs for meta: TE takes its device from the
    config), else on the current GPU. A model with real parameters gets the reference initialisation
    (``Flux.init_weights``); on the meta device, call it after ``to_empty``. A single-process Megatron world is
    set up if none exists.
    """
    ensure_megatron_initialized()
    model = Flux(config, get_flux_spec(backend), block_runner=block_runner)
    if config.perform_initialization and not any(p.is_meta for p in model.parameters()):
        model.init_weights()
    return model
